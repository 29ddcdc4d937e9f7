"""The ``lwq`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lwq.errors import LwqError


def _cmd_zoo_build(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.zoo.build import ZOO_SPECS, build_zoo

    specs = [s for s in ZOO_SPECS if not args.models or s.name in args.models]
    unknown = set(args.models or ()) - {s.name for s in ZOO_SPECS}
    if unknown:
        names = ", ".join(s.name for s in ZOO_SPECS)
        raise LwqError(f"--models: unknown model(s) {sorted(unknown)}; the zoo has {names}")
    if args.steps is not None:
        specs = [dataclasses.replace(s, steps=args.steps) for s in specs]
    command = shlex.join(["lwq", *argv])
    cards = build_zoo(args.out, deb=args.deb, specs=specs, command=command)
    print(f"zoo written to {args.out.resolve()}")
    header = (
        "model",
        "parameters",
        "tokens seen",
        "train time (s)",
        "final loss",
        "validation ppl",
        "vocab",
    )
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for c in cards:
        print(
            f"| {c.name} | {c.n_params:,} | {c.tokens_seen:,} | {c.train_seconds:.0f} | "
            f"{c.final_train_loss:.3f} | {c.validation_perplexity:.2f} | {c.vocab_size} |"
        )
    return 0


def _load_any(path: Path) -> tuple[Any, Any]:
    """A packed lwq checkpoint or a plain Hugging Face model directory."""
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import MANIFEST, load_quantized

    if (path / MANIFEST).is_file():
        model, tokenizer, _ = load_quantized(path)
        return model, tokenizer
    return load_model_dir(path)


def _cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.textio import read_text

    model, tokenizer = _load_any(args.model)
    if args.tasks:
        from lwq.eval.harness import evaluate_tasks

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = evaluate_tasks(
            model, tokenizer, tasks, data=args.data, max_length=args.seq_len, limit=args.limit
        )
        print(json.dumps(results, indent=1))
        return 0
    if args.data is None:
        raise LwqError("lwq eval needs --data TEXT_FILE (perplexity) or --tasks")
    text = read_text(args.data)
    seq_len = args.seq_len or int(getattr(model.config, "max_position_embeddings", 2048))
    res = perplexity_of_text(model, tokenizer, text, seq_len, args.batch_size, progress=True)
    print(
        f"{args.model}: perplexity {res.perplexity:.4f} on {args.data} "
        f"({res.n_tokens:,} predicted tokens, {res.n_windows} windows of {res.seq_len})"
    )
    return 0


def _config_from_args(args: argparse.Namespace, method: str | None = None) -> Any:
    """The configuration: --config, then the flags that were given."""
    from lwq.config import load_config, with_overrides

    base = load_config(args.config)
    method = method or args.method or base.quant.method
    bits_key = "method.budget" if method == "lwq" else "quant.bits"
    bits_arg = getattr(args, "bits", None)
    if bits_arg is not None and method != "lwq" and not float(bits_arg).is_integer():
        raise LwqError(
            f"--bits {bits_arg}: rtn and gptq take whole bits (2, 3, 4, 8); "
            "a fractional budget needs --method lwq"
        )
    bits = None if bits_arg is None else (bits_arg if method == "lwq" else int(bits_arg))
    return with_overrides(
        base,
        {
            "model": None if args.model is None else str(args.model),
            "out": None if args.out is None else str(args.out),
            "overwrite": True if args.overwrite else None,
            "device": args.device,
            "calib.source": args.calib,
            "calib.n_samples": args.n_samples,
            "calib.seq_len": args.seq_len,
            "calib.seed": args.seed,
            "calib.mode": args.mode,
            "quant.method": method if method != base.quant.method else None,
            bits_key: bits,
            "method.objective": args.objective,
            "method.curve": args.curve,
            "method.hi_bits": args.hi_bits,
            "method.lo_bits": args.lo_bits,
            "method.scoring": args.scoring,
            "method.ties": args.ties,
            "method.hi_refine": args.hi_refine,
            ("method.group_size" if method == "lwq" else "quant.group_size"): args.group_size,
            "quant.symmetric": True if args.symmetric else None,
            "gptq.act_order": True if args.act_order else None,
            "gptq.damp": args.damp,
        },
    )


def _cmd_quantize(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.quantize import quantize

    config = _config_from_args(args)
    report = quantize(config, progress=not args.quiet)
    bits = report.manifest["bits"]
    print(f"checkpoint: {report.out}")
    if config.quant.method == "lwq":
        a = report.manifest["allocation"]
        ratios = [x["ratio"] for x in a["layers"]]
        print(
            f"{len(ratios)} layers quantized (lwq, {config.method.hi_bits}/"
            f"{config.method.lo_bits}-bit, objective {a['objective']}) in {report.seconds:.1f} s; "
            f"ratios {min(ratios):.2%}..{max(ratios):.2%}, predicted KL {a['predicted_kl']:.4f}"
        )
    else:
        print(
            f"{len(report.layers)} layers quantized ({config.quant.method}, "
            f"{config.quant.bits}-bit, group {config.quant.group_size}) in {report.seconds:.1f} s"
        )
    print(
        f"bits per quantized weight: {bits['from_bytes']:.4f} measured from the files "
        f"({bits['from_model']:.4f} by the cost model)"
    )
    return 0


def _parse_budgets(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise LwqError(f"--bits {text!r}: give comma-separated numbers, e.g. 2.25,2.5,3.0") from err


def _cmd_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.sweep import sweep

    config = _config_from_args(args, method="lwq")
    report = sweep(config, _parse_budgets(args.budgets), args.data, progress=not args.quiet)
    print(report.table())
    print(
        f"\n{len(report.rows)} checkpoints under {report.out} in {report.seconds:.1f} s "
        f"(sensitivity profile once: {report.prepare_seconds:.1f} s); "
        "pareto.md, pareto.json, pareto.png, allocation.png beside them"
    )
    return 0


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import os

    # Prefect's ephemeral server needs more than its default 20 s on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    config = _config_from_args(args, method="lwq")
    overrides = {
        "pipeline.work_dir": None if args.work_dir is None else str(args.work_dir),
        "pipeline.storage": args.storage,
        "pipeline.registry_name": args.registry_name,
        "pipeline.eval_data": None if args.data is None else str(args.data),
        "pipeline.task_runner": args.task_runner,
        "pipeline.dask_address": args.dask_address,
        "pipeline.dask_workers": args.dask_workers,
    }
    from lwq.config import with_overrides

    config = with_overrides(config, overrides)
    zoo_data = Path(str(config.model)).parent / "data"
    if config.calib.source is None and (zoo_data / "calibration.txt").is_file():
        # A zoo model: its calibration slice, and its validation slice for the metrics.
        config = with_overrides(config, {"calib.source": str(zoo_data / "calibration.txt")})
        if config.pipeline.eval_data is None and (zoo_data / "validation.txt").is_file():
            config = with_overrides(
                config, {"pipeline.eval_data": str(zoo_data / "validation.txt")}
            )
    budgets = None if args.budgets is None else _parse_budgets(args.budgets)
    try:
        from flows.compress import run
    except ImportError as err:
        raise LwqError(f"lwq run needs the pipeline packages (tasks, flows): {err}") from err
    for res in run(config, budgets):
        r, reg = res.report, res.registered
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
        fp_ppl = "-" if r.perplexity_fp is None else f"{r.perplexity_fp:.3f}"
        print(f"budget {res.budget:g}: checkpoint {res.uri}")
        print(
            f"  registered {reg.name} version {reg.version} "
            f"({', '.join(reg.aliases) or 'no alias'}{'' if reg.new else ', already registered'})"
        )
        print(
            f"  bits {r.bits:.4f} (from bytes), perplexity {ppl} (full precision {fp_ppl}), "
            f"predicted KL {r.predicted_kl:.4f}"
        )
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
        print(f"  stages: {stages}")
    return 0


def _cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.pack.checkpoint import read_manifest

    m = read_manifest(args.checkpoint, verify=not args.no_verify)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    q, bits = m["quantization"], m["bits"]
    print(
        f"{args.checkpoint}: {m['format']} v{m['format_version']}, "
        f"{m['config'].get('model_type')} ({len(m['layers'])} quantized layers)"
    )
    print(
        f"base model: {m['base_model']['path']} (weights sha256 "
        f"{m['base_model']['weights_sha256'][:16]}...)"
    )
    print(f"method: {q['method']}; calibration: {q['calibration']}")
    print(
        f"bits per quantized weight: {bits['from_bytes']:.4f} from bytes, "
        f"{bits['from_model']:.4f} from the cost model, over {bits['n_quantized_weights']:,} "
        f"weights; unquantized tensors {bits['unquantized_bytes']:,} bytes; total "
        f"{bits['total_bytes']:,} bytes"
    )
    print("files verified against their SHA-256" if not args.no_verify else "files not verified")
    print()
    print("| layer | shape | lo grid | hi grid | high-impact | bytes | bits/weight |")
    print("|---|---|---|---|---|---|---|")
    for name, lm in m["layers"].items():
        n = lm["shape"][0] * lm["shape"][1]
        lo = f"{lm['lo']['bits']}b g{lm['lo']['group_size']}"
        hi = "-" if lm["hi"] is None else f"{lm['hi']['bits']}b g{lm['hi']['group_size']}"
        print(
            f"| {name} | {lm['shape'][0]}x{lm['shape'][1]} | {lo} | {hi} | "
            f"{lm['n_hi'] / n:.2%} | {lm['nbytes']:,} | {lm['nbytes'] * 8 / n:.3f} |"
        )
    return 0


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by quantize and sweep (each overrides its --config key)."""
    p.add_argument("--config", type=Path, default=None, help="YAML configuration file")
    p.add_argument("--model", type=Path, help="Hugging Face model directory (model)")
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (out): the checkpoint, or for sweep the folder of checkpoints",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing checkpoint in --out (overwrite)",
    )
    p.add_argument(
        "--objective",
        choices=["full", "diagonal", "fixed"],
        help="lwq: method.objective (default full: with cross-layer terms)",
    )
    p.add_argument(
        "--curve",
        choices=["power", "chord"],
        help="lwq: method.curve, each layer's output change against its ratio (default "
        "power: fitted from a third probe at method.r_mid; chord: linear)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="quant.group_size (lwq: method.group_size): input columns per scale, "
        "-1 per row (default 128)",
    )
    p.add_argument("--symmetric", action="store_true", help="quant.symmetric grid")
    p.add_argument("--calib", help="calib.source: text file, folder, or hf://NAME/CONFIG/SPLIT")
    p.add_argument("--n-samples", type=int, help="calib.n_samples (default 128)")
    p.add_argument(
        "--seq-len", type=int, help="calib.seq_len (default min(2048, the model's context))"
    )
    p.add_argument("--seed", type=int, help="calib.seed (default 0)")
    p.add_argument(
        "--mode", choices=["parallel", "sequential"], help="calib.mode (default sequential)"
    )
    p.add_argument("--act-order", action="store_true", help="gptq.act_order")
    p.add_argument("--damp", type=float, help="gptq.damp (default 0.01)")
    p.add_argument("--device", help="device (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--hi-bits",
        type=int,
        help="method.hi_bits of the high-impact weights (default 4; 16 = float16 values)",
    )
    p.add_argument("--lo-bits", type=int, help="method.lo_bits of the other weights (default 2)")
    p.add_argument(
        "--scoring",
        choices=["obs", "act", "fisher"],
        help="method.scoring of high-impact weights (default obs)",
    )
    p.add_argument(
        "--ties",
        choices=["none", "inputs", "block"],
        help="method.ties: one ratio for layers sharing an input or a block (default none)",
    )
    p.add_argument(
        "--hi-refine",
        choices=["none", "lwc"],
        help="method.hi_refine: lwc learns the high grid's clipping (default none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwq",
        description="Post-training quantization of causal LMs with layer-wise "
        "high-impact ratios (arXiv:2511.17801).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the reference model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser(
        "build",
        help="fetch the corpus from Debian, train the tokenizer and the zoo models",
        description="Fetch python3.11-doc from the Debian registry, split it by file, "
        "train a byte-level BPE tokenizer and the reference models on the CPU, and write "
        "Hugging Face directories with model cards. The previous zoo is replaced only "
        "when the whole build succeeded.",
    )
    build.add_argument("--out", type=Path, default=Path("zoo"), help="zoo directory (default: zoo)")
    build.add_argument(
        "--deb",
        type=Path,
        default=None,
        help="use this python3.11-doc .deb instead of downloading it",
    )
    build.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="build only these models (default: all)",
    )
    build.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the number of training steps (for quick trials)",
    )
    build.set_defaults(func=_cmd_zoo_build)

    ev = sub.add_parser(
        "eval",
        help="perplexity or lm-eval tasks of a model or packed checkpoint",
        description="Perplexity with the GPTQ/AWQ protocol: the text is tokenised once and "
        "cut into non-overlapping windows of the model's context length. With --tasks, "
        "runs lm-evaluation-harness on the in-memory model instead.",
    )
    ev.add_argument(
        "--model",
        type=Path,
        required=True,
        help="Hugging Face model directory or packed lwq checkpoint",
    )
    ev.add_argument("--data", type=Path, help="UTF-8 text file (or folder of .txt files)")
    ev.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks instead of the built-in "
        "perplexity: lwq_text_perplexity (over --data, offline) or standard "
        "tasks such as piqa,arc_easy,hellaswag,winogrande (need the hub)",
    )
    ev.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    ev.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length (default: the model's max_position_embeddings)",
    )
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ev.set_defaults(func=_cmd_eval)

    qz = sub.add_parser(
        "quantize",
        help="quantize a model into a packed checkpoint",
        description="Quantize every linear layer of the decoder blocks (embeddings and the "
        "head stay 16-bit) and write a packed checkpoint whose manifest reports the bits "
        "per weight measured from the files. Settings come from --config (YAML, unknown "
        "keys are errors) and the flags below, which override it.",
    )
    qz.add_argument(
        "--method",
        choices=["rtn", "gptq", "lwq"],
        help="quant.method (default gptq); lwq: the layer-wise ratio method",
    )
    qz.add_argument(
        "--bits",
        type=float,
        help="rtn/gptq: quant.bits, 2, 3, 4 or 8 (default 4); lwq: method.budget, "
        "average bits per weight measured from the files (default 2.5)",
    )
    _add_quantize_args(qz)
    qz.set_defaults(func=_cmd_quantize)

    sw = sub.add_parser(
        "sweep",
        help="lwq at several budgets: one sensitivity profile, a checkpoint per budget",
        description="Compute the sensitivity profile once, then solve the QP and quantize at "
        "every budget of --bits, writing OUT/bits-B/ per budget and, in OUT, a Pareto table "
        "(pareto.md, pareto.json), pareto.png (bits against perplexity on --data) and "
        "allocation.png (ratio per layer and budget, coloured by module type).",
    )
    sw.add_argument(
        "--bits",
        dest="budgets",
        required=True,
        help="comma-separated budgets, average bits per weight from bytes (e.g. 2.25,2.5,3.0)",
    )
    sw.add_argument("--data", type=Path, help="text to measure each checkpoint's perplexity on")
    _add_quantize_args(sw)
    sw.set_defaults(func=_cmd_sweep)

    rn = sub.add_parser(
        "run",
        help="the workflow: quantize, evaluate, store and register (Prefect + MLflow)",
        description="Run the Prefect flow calibrate -> sensitivity -> QP solve -> per-layer "
        "quantization -> pack -> evaluate -> upload -> register. With nothing configured it "
        "runs locally: Prefect's ephemeral server, MLflow on WORK_DIR/mlflow.db, checkpoints "
        "in WORK_DIR/store. Point it at servers with PREFECT_API_URL, MLFLOW_TRACKING_URI "
        "(or pipeline.tracking_uri) and --storage s3://BUCKET/PREFIX with AWS_ENDPOINT_URL. "
        "Stages are cached by content: a rerun, or a rerun after a crash, recomputes only "
        "what changed, and registers nothing twice.",
    )
    rn.add_argument(
        "--bits",
        dest="budgets",
        help="method.budget, or several comma-separated budgets (a sweep)",
    )
    rn.add_argument("--data", type=Path, help="pipeline.eval_data: text for the perplexities")
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
    _add_quantize_args(rn)
    rn.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="show a packed checkpoint's manifest, bits and layers")
    info.add_argument("checkpoint", type=Path, help="packed checkpoint directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args, argv))
    except LwqError as err:
        print(f"lwq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
