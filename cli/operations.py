"""Operations: ``lwq deploy`` (the zoo on a schedule), ``lwq register-base`` (base models in
the registry), ``lwq trigger`` (registry events to runs) and ``lwq serve`` (a checkpoint over
HTTP)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.workflow import prefect_env
from lwq.config import with_overrides
from lwq.errors import LwqError


def _pipeline() -> Any:
    try:
        import flows.deployments
        import tasks.tracking
    except ImportError as err:
        raise LwqError(f"this command needs the pipeline packages (tasks, flows): {err}") from err
    return flows.deployments, tasks.tracking


def cmd_deploy(args: argparse.Namespace, argv: Sequence[str]) -> int:
    prefect_env()
    deployments, tracking = _pipeline()
    from lwq.zoofile import load_manifest

    deployments.check_schedule(args.cron, args.interval, args.timezone)
    jobs = load_manifest(args.manifest, resolve=tracking.fetch_base)  # refused before serving
    url = deployments.prefect_api()
    name = args.name
    zoo = deployments.zoo_deployment(
        args.manifest, name, cron=args.cron, interval=args.interval, timezone=args.timezone
    )
    registered = deployments.registered_deployment(args.manifest, name)
    when = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(
        f"serving on {url}: {deployments.ZOO_FLOW}/{name} ({len(jobs)} entries of "
        f"{args.manifest.resolve()}, {when}) and {deployments.REGISTERED_FLOW}/{name} "
        "(registered base models, started by lwq trigger serve); one run at a time; "
        "Ctrl-C stops and pauses the schedule",
        flush=True,
    )
    deployments.serve(zoo, registered)
    return 0


def add_deploy_parser(sub: Any) -> None:
    dp = sub.add_parser(
        "deploy",
        help="compress a zoo manifest on a schedule (a Prefect deployment served here)",
        description=(
            "Create the Prefect deployment lwq-zoo/NAME that runs 'lwq run --manifest "
            "MANIFEST' on a schedule, on the Prefect server at PREFECT_API_URL, and serve it "
            "from this process until Ctrl-C (which pauses the schedule). Beside it, "
            "lwq-registered/NAME compresses one registered base model with the manifest's "
            "defaults when the registry trigger (lwq trigger serve) starts it. The manifest is "
            "checked first and read again at every run. A run skips what is already "
            "registered, so a rerun of a finished manifest registers nothing; a tick that "
            "comes while a run is going is cancelled. For a team, a process work pool and "
            "worker run it instead (infra/prefect.yaml)."
        ),
    )
    dp.add_argument("manifest", type=Path, help="the zoo manifest (see lwq run --manifest)")
    when = dp.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="a cron schedule, e.g. '0 3 * * *' (03:00 every day)")
    when.add_argument("--interval", type=float, help="run every so many seconds instead")
    dp.add_argument("--timezone", help="the cron schedule's time zone (default UTC)")
    dp.add_argument(
        "--name",
        default="lwq",
        help="the deployments' name (default lwq): lwq-zoo/NAME on the schedule and "
        "lwq-registered/NAME for the registry trigger",
    )
    dp.set_defaults(func=cmd_deploy)


def cmd_register_base(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.config import load_config
    from lwq.realmodels import resolve_model

    _, tracking = _pipeline()
    config = with_overrides(
        load_config(args.config),
        {
            "pipeline.work_dir": None if args.work_dir is None else str(args.work_dir),
            "pipeline.tracking_uri": args.tracking_uri,
        },
    )
    model_dir = resolve_model(str(args.dir))
    reg = tracking.register_base(model_dir, args.name, config)
    state = "registered" if reg.new else "already registered (same weights)"
    where = tracking.tracking_uri(config)
    print(f"{model_dir}: {state} as models:/{reg.name}/{reg.version} in {where}")
    return 0


def add_register_base_parser(sub: Any) -> None:
    rb = sub.add_parser(
        "register-base",
        help="log a Hugging Face model folder as a version of a registered base model",
        description=(
            "Log the folder (config, tokenizer, weights) as a new version of the registered "
            "model NAME, tagged lwq.role=base with its weights' SHA-256; the same weights "
            "registered again give the existing version. A manifest entry or a trigger "
            "compresses it as models:/NAME/VERSION."
        ),
    )
    rb.add_argument(
        "dir",
        type=Path,
        help="Hugging Face model directory, .gguf file or real model name (smollm2-135m)",
    )
    rb.add_argument("--name", required=True, help="the registered model's name")
    rb.add_argument("--config", type=Path, help="YAML configuration (its pipeline.* settings)")
    rb.add_argument("--work-dir", type=Path, help="pipeline.work_dir (default .lwq)")
    rb.add_argument(
        "--tracking-uri",
        help="pipeline.tracking_uri (default MLFLOW_TRACKING_URI, else WORK_DIR/mlflow.db)",
    )
    rb.set_defaults(func=cmd_register_base)


def cmd_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import logging

    from lwq.serving import ModelServer, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.public:
        raise LwqError(
            f"--host {args.host}: the server has no authentication; to listen beyond this "
            "machine add --public (behind your own gateway)"
        )
    logging.getLogger("lwq").setLevel(logging.INFO)
    t = time.perf_counter()
    server = ModelServer(args.source, args.device, packed=not args.dequantize)
    h = server.health()
    print(
        f"serving {h['model']} ({h['method']}, {h['bits']:.3f} bits) from {args.source} on "
        f"http://{args.host}:{args.port} (loaded in {time.perf_counter() - t:.1f} s); "
        f"POST /generate, /perplexity, /invocations; GET /health",
        flush=True,
    )
    try:
        serve(server, args.host, args.port, args.reload_seconds)
    except KeyboardInterrupt:
        pass
    return 0


def add_serve_parser(sub: Any) -> None:
    sv = sub.add_parser(
        "serve",
        help="answer generation and perplexity requests for a packed checkpoint over HTTP",
        description=(
            "Load a packed checkpoint (a folder, or models:/NAME@ALIAS or models:/NAME/VERSION "
            "from the MLflow registry at MLFLOW_TRACKING_URI) and answer POST /generate "
            '({"prompt": ..., "max_new_tokens": 32, "temperature": 0, "top_p": 1, "seed": 0}), '
            'POST /perplexity ({"text": ...} or {"texts": [...]}, any length) and POST '
            "/invocations (MLflow's payloads: inputs, instances, dataframe_split, "
            'dataframe_records, with params such as {"task": "generate"}). A bad request gets '
            "400 and the reason. An alias is checked every --reload-seconds: when it moves, "
            "the new version is loaded and served without a restart."
        ),
    )
    sv.add_argument("source", help="checkpoint folder or models:/NAME@ALIAS")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sv.add_argument("--public", action="store_true", help="allow a --host other than loopback")
    sv.add_argument(
        "--reload-seconds",
        type=float,
        default=30.0,
        help="how often the source is checked for a moved alias (default 30)",
    )
    sv.add_argument("--device", default="cpu", help="device (default cpu)")
    sv.add_argument(
        "--dequantize",
        action="store_true",
        help=(
            "hold float32 weights instead of computing from the packed codes (the original "
            "model's memory; by default the layers stay packed, see LWQ_KERNELS in the README)"
        ),
    )
    sv.set_defaults(func=cmd_serve)


def cmd_trigger_setup(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tasks.trigger import EVENTS, secret_from_env, setup_webhook

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://")):
        raise LwqError(
            "lwq trigger setup needs an MLflow tracking server: set MLFLOW_TRACKING_URI or "
            "--tracking-uri to its http(s):// URL (webhooks are sent by the server)"
        )
    hook, created = setup_webhook(uri, args.url, secret_from_env(), args.name)
    state = "created" if created else "updated"
    events = ", ".join(EVENTS)
    print(f"webhook {args.name} ({hook.webhook_id}) {state} on {uri}: {events} -> {args.url}")
    return 0


def cmd_trigger_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import logging

    from lwq.serving import json_http_server
    from tasks.trigger import Receiver, prefect_starter, secret_from_env

    prefect_env()
    deployments, _ = _pipeline()
    secret = secret_from_env()
    url = deployments.prefect_api()
    deployment = f"{deployments.REGISTERED_FLOW}/{args.deployment}"
    logging.getLogger("tasks").setLevel(logging.INFO)
    receiver = Receiver(secret, frozenset(args.watch or ()), prefect_starter(deployment))
    http = json_http_server(receiver, args.host, args.port)
    watched = ", ".join(args.watch or ()) or "none"
    print(
        f"receiving MLflow webhooks on http://{args.host}:{args.port}/hook; starting "
        f"{deployment} on {url} for new base models and champions of: {watched}",
        flush=True,
    )
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
    return 0


def add_trigger_parser(sub: Any) -> None:
    tr = sub.add_parser(
        "trigger",
        help="start compression runs from MLflow registry events (webhook and receiver)",
        description=(
            "A base model registered with lwq register-base, or the champion alias moved on "
            "a watched name, starts lwq-registered/NAME (served by lwq deploy) with the "
            "manifest's defaults. Both commands read the shared secret from the environment "
            "variable LWQ_WEBHOOK_SECRET. Deliveries missed while the receiver is down are "
            "caught up by the scheduled manifest run when it lists the base as "
            "models:/NAME/latest or models:/NAME@champion."
        ),
    )
    tsub = tr.add_subparsers(dest="trigger_command", required=True)
    st = tsub.add_parser(
        "setup",
        help="create or update the MLflow webhook (idempotent)",
        description="Create the webhook NAME on the MLflow tracking server, or update it in "
        "place (URL, events, secret): running it twice leaves one webhook.",
    )
    st.add_argument("--url", required=True, help="the receiver's URL, e.g. http://HOST:8788/hook")
    st.add_argument(
        "--name", default="lwq-trigger", help="the webhook's name (default lwq-trigger)"
    )
    st.add_argument("--tracking-uri", help="the MLflow server (default MLFLOW_TRACKING_URI)")
    st.set_defaults(func=cmd_trigger_setup)
    sv = tsub.add_parser(
        "serve",
        help="receive webhook deliveries and start compression runs",
        description="Answer POST /hook: a delivery with a wrong or missing signature, or "
        "older than 5 minutes, gets 401; lwq's own registrations are ignored; a run is started "
        "once per base name and version (Prefect idempotency key).",
    )
    sv.add_argument("--port", type=int, default=8788, help="port (default 8788)")
    sv.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sv.add_argument(
        "--watch",
        action="append",
        metavar="NAME",
        help="a registered base model name whose champion alias starts a run (repeatable)",
    )
    sv.add_argument(
        "--deployment",
        default="lwq",
        help="the NAME of lwq deploy --name (default lwq): runs lwq-registered/NAME",
    )
    sv.set_defaults(func=cmd_trigger_serve)
