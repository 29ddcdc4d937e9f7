"""Command-line options shared by quantize, sweep and run, and their mapping to settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lwq.errors import LwqError

CALIB_HELP = (
    "calib.source: text file, folder, hf://NAME/CONFIG/SPLIT, a set saved by 'lwq calibrate' "
    "(.safetensors), or self: text the model generates itself (the default for a model "
    "outside the zoo; for a zoo model, the zoo's data/calibration.txt)"
)


def config_from_args(args: argparse.Namespace, method: str | None = None) -> Any:
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
            "out": None if getattr(args, "out", None) is None else str(args.out),
            "overwrite": True if getattr(args, "overwrite", False) else None,
            "device": args.device,
            "calib.source": args.calib,
            "calib.n_samples": args.n_samples,
            "calib.seq_len": args.seq_len,
            "calib.seed": args.seed,
            "calib.mode": getattr(args, "mode", None),
            "quant.method": method if method != base.quant.method else None,
            bits_key: bits,
            "method.objective": args.objective,
            "method.curve": args.curve,
            "method.hi_bits": args.hi_bits,
            "method.lo_bits": args.lo_bits,
            "method.bases": args.bases,
            "method.base_floor": args.base_floor,
            "method.r_max": args.r_max,
            "method.structure": args.structure,
            "method.scoring": args.scoring,
            "method.ties": args.ties,
            "method.hi_refine": args.hi_refine,
            "method.profile": args.profile,
            "method.profile_samples": args.profile_samples,
            "method.profile_seq_len": args.profile_seq_len,
            ("method.group_size" if method == "lwq" else "quant.group_size"): args.group_size,
            "quant.symmetric": True if getattr(args, "symmetric", False) else None,
            "gptq.act_order": args.act_order,
            "gptq.true_sequential": args.true_sequential,
            "gptq.damp": args.damp,
            "gptq.clip": args.clip,
        },
    )


def parse_widths(text: str) -> list[int]:
    """'2,3' -> [2, 3] (argparse type of --bases)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: give widths such as 2,3") from err


def parse_budgets(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise LwqError(f"--bits {text!r}: give comma-separated numbers, e.g. 2.25,2.5,3.0") from err


def add_calib_args(p: argparse.ArgumentParser) -> None:
    """The calibration set's flags (quantize, sweep, run and calibrate)."""
    p.add_argument("--calib", help=CALIB_HELP)
    p.add_argument("--n-samples", type=int, help="calib.n_samples (default 128)")
    p.add_argument(
        "--seq-len",
        type=int,
        help="calib.seq_len (default: the model's context, at most 2048 tokens)",
    )
    p.add_argument("--seed", type=int, help="calib.seed (default 0)")


def add_quantize_args(p: argparse.ArgumentParser, command: str) -> None:
    """Flags of quantize, sweep and run (each overrides its --config key).

    A command gets only the flags that apply to it: run writes to
    pipeline.storage (no --out) and always quantizes layers in parallel mode
    (no --mode); sweep and run always run the method (no --symmetric).
    """
    p.add_argument("--config", type=Path, default=None, help="YAML configuration file")
    p.add_argument(
        "--model",
        type=Path,
        help="Hugging Face model directory, .gguf file or real model name such as "
        "smollm2-135m (model); for a zoo model the zoo's data/calibration.txt is the "
        "default --calib",
    )
    if command != "run":
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
        help=(
            "quant.group_size (lwq: method.group_size): input columns per scale, "
            "-1 per row (default 128)"
            if command == "quantize"
            else "method.group_size: input columns per scale of both grids (default 128)"
        ),
    )
    if command == "quantize":
        p.add_argument(
            "--symmetric", action="store_true", help="quant.symmetric grid (rtn and gptq)"
        )
    add_calib_args(p)
    if command != "run":
        p.add_argument(
            "--mode", choices=["parallel", "sequential"], help="calib.mode (default sequential)"
        )
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gptq.act_order: GPTQ's columns by decreasing Hessian diagonal, grids fitted "
        "up front (default on)",
    )
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gptq.true_sequential: in sequential mode each group of layers reading one input "
        "(q/k/v, o, gate/up, down) takes its Hessian after the groups before it are quantized "
        "(default off)",
    )
    p.add_argument("--damp", type=float, help="gptq.damp (default 0.01)")
    p.add_argument(
        "--clip",
        choices=["minmax", "mse"],
        help="gptq.clip, each group's grid range: mse (default: the min-max range shrunk "
        "to minimise the rounding error weighted by the Hessian diagonal) or minmax",
    )
    p.add_argument("--device", help="device (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--hi-bits",
        type=int,
        help="method.hi_bits of the high-impact weights (default 4; 16 = float16 values)",
    )
    p.add_argument(
        "--lo-bits",
        type=int,
        help="method.lo_bits: one base width for the other weights of every layer "
        "(default: each layer chooses 2 or 3 bits, see --bases)",
    )
    p.add_argument(
        "--bases",
        type=parse_widths,
        help="method.bases, the widths each layer's base is chosen from together with its "
        "ratio (default 2,3; --lo-bits sets one base for all, as --objective fixed, "
        "--profile forward and --ties need)",
    )
    p.add_argument(
        "--base-floor",
        choices=["budget", "none"],
        help="method.base_floor: budget (default) offers no base narrower than the widest "
        "whose uniform grid fits the budget with 0.1 bits to spare (from 3.25 bits at group "
        "128 every layer keeps 3 bits or more); none offers every base at every budget",
    )
    p.add_argument(
        "--r-max",
        type=float,
        help="method.r_max, the largest ratio of a layer (default 0.3); a high-impact "
        "weight costs 7-9 bits beyond lo_bits (code, mask, scales), so 2/4 bits at "
        "r_max 0.3 reach about 3.9 bits per weight",
    )
    p.add_argument(
        "--structure",
        choices=["weights", "columns"],
        help="method.structure of the high-impact set: single weights (default) or whole "
        "input columns, located by one bit per column instead of 5-7 bits per weight",
    )
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
        "--profile",
        choices=["reverse", "forward"],
        help="lwq: method.profile, how the sensitivity profile is measured (default reverse: "
        "one backward pass per profile sequence, cost linear in depth)",
    )
    p.add_argument(
        "--profile-samples",
        type=int,
        help="lwq: method.profile_samples, profile sequences cut from the calibration windows "
        "(default 128)",
    )
    p.add_argument(
        "--profile-seq-len",
        type=int,
        help="lwq: method.profile_seq_len, tokens per profile sequence (default 128)",
    )
    p.add_argument(
        "--hi-refine",
        choices=["none", "lwc"],
        help="method.hi_refine: lwc learns the high grid's clipping (default none)",
    )
