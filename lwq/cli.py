"""The ``lwq`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import load_model_dir
    from lwq.textio import read_text

    model, tokenizer = load_model_dir(args.model)
    text = read_text(args.data)
    seq_len = args.seq_len or int(getattr(model.config, "max_position_embeddings", 2048))
    res = perplexity_of_text(model, tokenizer, text, seq_len, args.batch_size, progress=True)
    print(
        f"{args.model}: perplexity {res.perplexity:.4f} on {args.data} "
        f"({res.n_tokens:,} predicted tokens, {res.n_windows} windows of {res.seq_len})"
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

    ev = sub.add_parser(
        "eval",
        help="perplexity of a model directory on a text file",
        description="Perplexity with the GPTQ/AWQ protocol: the text is tokenised once and "
        "cut into non-overlapping windows of the model's context length.",
    )
    ev.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    ev.add_argument("--data", type=Path, required=True, help="UTF-8 text file")
    ev.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length (default: the model's max_position_embeddings)",
    )
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ev.set_defaults(func=_cmd_eval)
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
