"""``lwq run``: the workflow command (Prefect flows, MLflow registry, checkpoint storage)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.options import add_quantize_args, config_from_args, parse_budgets
from lwq.config import with_overrides
from lwq.errors import LwqError


def prefect_env() -> None:
    # Prefect's ephemeral server needs more than its default 20 s on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Flags that are not settings: they may go with --manifest.
NOT_SETTINGS = {"command", "func", "manifest", "verbose", "quiet"}


def _run_manifest(args: argparse.Namespace) -> int:
    given = [k for k, v in vars(args).items() if k not in NOT_SETTINGS and v not in (None, False)]
    if given:
        flags = ", ".join("--" + ("bits" if k == "budgets" else k.replace("_", "-")) for k in given)
        raise LwqError(
            f"--manifest takes every setting from the manifest (its defaults and entries); "
            f"remove {flags} or put it in the manifest"
        )
    try:
        from flows.zoo import FAILED, table, zoo
        from tasks.tracking import fetch_base
    except ImportError as err:
        raise LwqError(f"lwq run needs the pipeline packages (tasks, flows): {err}") from err
    from lwq.zoofile import load_manifest

    jobs = load_manifest(args.manifest, resolve=fetch_base)  # every problem, before any work
    print(f"{args.manifest}: {len(jobs)} entries checked")
    rows = zoo(str(args.manifest.resolve()))
    print(table(rows))
    failed = sum(r.status == FAILED for r in rows)
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    prefect_env()
    if args.manifest is not None:
        return _run_manifest(args)
    config = config_from_args(args, method=args.method or "lwq")
    config = with_overrides(
        config,
        {
            "pipeline.work_dir": None if args.work_dir is None else str(args.work_dir),
            "pipeline.storage": args.storage,
            "pipeline.registry_name": args.registry_name,
            "pipeline.eval_data": None if args.data is None else str(args.data),
            "pipeline.task_runner": args.task_runner,
            "pipeline.dask_address": args.dask_address,
            "pipeline.dask_workers": args.dask_workers,
        },
    )
    budgets = None if args.budgets is None else parse_budgets(args.budgets)
    try:
        from flows.compress import run
    except ImportError as err:
        raise LwqError(f"lwq run needs the pipeline packages (tasks, flows): {err}") from err
    q = config.quant
    for res in run(config, budgets):
        r, reg = res.report, res.registered
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
        fp_ppl = "-" if r.perplexity_fp is None else f"{r.perplexity_fp:.3f}"
        label = (
            f"budget {res.budget:g}"
            if q.method == "lwq"
            else f"{q.method} W{res.budget:g} g{q.group_size}"
        )
        kl = "" if q.method != "lwq" else f", predicted KL {r.predicted_kl:.4f}"
        print(f"{label}: checkpoint {res.uri}")
        print(
            f"  registered {reg.name} version {reg.version} "
            f"({', '.join(reg.aliases) or 'no alias'}{'' if reg.new else ', already registered'})"
        )
        print(f"  bits {r.bits:.4f} (from bytes), perplexity {ppl} (full precision {fp_ppl}){kl}")
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
        print(f"  stages: {stages}")
        print(f"  cache: {', '.join(f'{k} {v}' for k, v in res.cache.items())}")
    return 0


def add_run_parser(sub: Any) -> None:
    rn = sub.add_parser(
        "run",
        help="the workflow: quantize, evaluate, store and register (Prefect + MLflow)",
        description=(
            "Run the Prefect flow calibrate -> sensitivity -> QP solve -> per-layer "
            "quantization -> pack -> evaluate -> upload -> register (rtn and gptq: "
            "calibrate -> Hessians -> per-layer quantization -> pack -> evaluate -> upload "
            "-> register). With nothing configured it runs locally: Prefect's ephemeral "
            "server, MLflow on WORK_DIR/mlflow.db with its artifacts in "
            "WORK_DIR/mlartifacts, checkpoints in WORK_DIR/store. Point it at servers with "
            "PREFECT_API_URL, MLFLOW_TRACKING_URI (or pipeline.tracking_uri) and --storage "
            "s3://BUCKET/PREFIX with AWS_ENDPOINT_URL. Stages are cached by content and by "
            "the code version that computed them: a rerun, or a rerun after a crash, "
            "recomputes only what changed (inputs or code), and registers nothing twice. "
            "Layers are quantized independently from full-precision Hessians (parallel mode)."
        ),
    )
    rn.add_argument(
        "--manifest",
        type=Path,
        help="a zoo manifest (YAML: defaults and entries of model, method, bits, "
        "registry_name, config): every entry not yet registered with the same fingerprint "
        "is compressed and registered; a failed entry does not stop the others; a summary "
        "table follows. Every entry is checked before any work starts. Exit status 1 when "
        "an entry failed",
    )
    rn.add_argument(
        "--method",
        choices=["rtn", "gptq", "lwq"],
        help="quant.method (default lwq): the layer-wise method, or a uniform baseline (rtn, "
        "gptq) through the same stages, storage and registry",
    )
    rn.add_argument(
        "--bits",
        dest="budgets",
        help="lwq: method.budget, or several comma-separated budgets (a sweep sharing the "
        "profile); rtn/gptq: quant.bits, or several widths (e.g. 3,4; the Hessians are shared)",
    )
    rn.add_argument(
        "--data",
        type=Path,
        help="pipeline.eval_data: text for the perplexities (a zoo model: its validation slice)",
    )
    rn.add_argument("--work-dir", type=Path, help="pipeline.work_dir (default .lwq)")
    rn.add_argument("--storage", help="pipeline.storage: a folder or s3://BUCKET/PREFIX")
    rn.add_argument("--registry-name", help="pipeline.registry_name (default lwq-<model>)")
    rn.add_argument(
        "--task-runner",
        choices=["local", "dask"],
        help="pipeline.task_runner (default local). dask needs a Prefect server "
        "(PREFECT_API_URL) and quantizes layers on a Dask cluster",
    )
    rn.add_argument(
        "--dask-address",
        help="pipeline.dask_address: an existing Dask scheduler (its workers started with "
        "--preload tasks.worker, sharing WORK_DIR); default a local cluster",
    )
    rn.add_argument(
        "--dask-workers",
        type=int,
        help="pipeline.dask_workers: single-threaded worker processes of the local cluster "
        "(default 2)",
    )
    add_quantize_args(rn, "run")
    rn.set_defaults(func=cmd_run)
