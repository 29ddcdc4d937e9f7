"""Quality on a real model (issue 13): SmolLM2-135M at 2.5, 3.0 and 3.5 bits per weight.

Every row uses the same calibration tokens (64 x 512 of zoo/data/calibration.txt)
and the same evaluation: WikiText-2 perplexity on the first quarter of
wiki.test.raw (20 windows of 2048 tokens; ``--full`` adds the whole test set),
bits per quantized weight from the checkpoint's bytes, wall time and peak RSS
of the quantizing process (measured by wait4 on the child that quantizes).

Rows:
  fp          the float16 model, evaluated in float32
  uniform     lwq's RTN and GPTQ at W2 g32/g64, W3 g64/g128, W4 g128
  lwq         the method and its ablations at each budget, per (lo, hi, group)
              configuration: the QP (``lwq``), ``diagonal`` (no cross-layer
              terms), ``fixed`` (one ratio), ``chord`` (no fitted curves), and
              float16 high-impact weights at a fixed 0.45 % (SqueezeLLM-style).
              One process per configuration prepares the method's state once and
              quantizes every row from it (as ``lwq sweep`` does); its wall time
              is reported as prepare (shared) + the row's own quantization.
  peers       HQQ and llm-compressor's GPTQ, in their own environment
              (``--peer-python``), at the uniform settings they accept

Results are saved after every row (``--json``) and rows already there are
skipped, so an interrupted run continues where it stopped. ``--add-full ROW ...``
adds the whole test set to saved rows whose checkpoints are still in ``--work``.

    python benchmarks/real.py --parts fp uniform lwq --peer-python /work/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realmodel import (
    N_SAMPLES,
    REPO,
    SEQ_LEN,
    WIKITEXT,
    add_calib_arg,
    calib_args,
    calib_source,
    fmt_ppl,
    lwq_cmd,
    model_dir,
    perplexity,
    quarter_ids,
    run_child,
    stream_child,
    wikitext_ids,
)

UNIFORM = [(2, 32), (2, 64), (3, 64), (3, 128), (4, 128)]
PEERS = {"hqq": UNIFORM, "llm-compressor": [(2, 32), (2, 64), (3, 64), (4, 64)]}
FP16_RATIO = 0.0045


def evaluate(path: Path, full: bool, quarter: bool = True) -> dict[str, float]:
    """Perplexities of a model directory or packed checkpoint (dequantised, float32)."""
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import MANIFEST, load_quantized

    if (path / MANIFEST).is_file():
        model, tok, _ = load_quantized(path)
    else:
        model, tok = load_model_dir(path)
    out = {"ppl_quarter": perplexity(model, quarter_ids(tok))} if quarter else {}
    if full:
        out["ppl_full"] = perplexity(model, wikitext_ids(tok))
    return out


def eval_child(path: Path, full: bool, quarter: bool = True) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--eval-child", str(path)] + (["--full"] if full else [])
    cmd += [] if quarter else ["--no-quarter"]
    res = run_child(cmd)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def bits_of(path: Path) -> float:
    from lwq.pack.checkpoint import read_manifest

    return read_manifest(path, verify=False).bits.from_bytes


def uniform_rows(args: argparse.Namespace, done: dict[str, Any]) -> Any:
    for method in ("rtn", "gptq"):
        for bits, group in UNIFORM:
            setting = f"{method} W{bits} g{group}"  # what --uniform names
            key = setting + (" act-order" if method == "gptq" and args.act_order else "")
            key += " mse" if method == "gptq" and args.clip == "mse" else ""
            if key in done or (args.uniform and setting not in args.uniform):
                continue
            out = args.work / key.replace(" ", "-")
            cmd = lwq_cmd("quantize", "--model", str(args.model), "--method", method)
            cmd += ["--bits", str(bits), "--group-size", str(group), "--out", str(out)]
            cmd += ["--overwrite", "-q"] + ([] if method == "rtn" else calib_args(args.calib_path))
            if method == "gptq":
                cmd.append("--act-order" if args.act_order else "--no-act-order")
                cmd += ["--clip", args.clip]
            run = run_child(cmd)
            yield (
                key,
                {
                    "family": "uniform",
                    "method": method,
                    "bits": bits_of(out),
                    "seconds": run.seconds,
                    "peak_rss_mib": run.peak_rss_mib,
                    **eval_child(out, args.full),
                },
            )


def lwq_child(spec: dict[str, Any]) -> None:
    """One configuration: prepare once, then every budget and variant; JSON lines.

    Each row is evaluated (in a process of its own, so the row's peak RSS stays the
    quantization's) and printed before the next one starts; rows named in
    ``spec["done"]`` are skipped.
    """
    import resource

    from lwq.config import make_config
    from lwq.method.state import HessianStore, allocate, fixed_allocation
    from lwq.models import load_model_dir
    from lwq.quantize import MethodPlan, prepare_method, quantize_model

    work = Path(spec["work"])
    widths = [int(b) for b in str(spec["lo"]).split("+")]  # 2+3: each layer's base chosen
    method: dict[str, Any] = {"hi_bits": spec["hi"], "group_size": spec["group"]}
    method |= {"lo_bits": widths[0]} if len(widths) == 1 else {"bases": widths}
    if spec.get("r_max") is not None:
        method["r_max"] = spec["r_max"]
    if len(widths) > 1 and spec.get("base_floor", "budget") != "budget":
        method["base_floor"] = spec["base_floor"]
    if spec.get("structure", "weights") != "weights":
        method["structure"] = spec["structure"]

    def config(**extra: Any) -> Any:
        return make_config(
            {
                "model": spec["model"],
                "overwrite": True,
                "calib": {
                    "source": spec["calib"],
                    "n_samples": N_SAMPLES,
                    "seq_len": SEQ_LEN,
                    "mode": spec["mode"],
                    "seed": spec.get("seed", 0),
                },
                "quant": {"method": "lwq"},
                "gptq": {"act_order": bool(spec.get("act_order", False)), "clip": spec["clip"]},
                "method": {**method, **extra},
            }
        )

    t = time.perf_counter()
    model, tok = load_model_dir(Path(spec["model"]))
    keep = work / "hessians" if spec["mode"] == "parallel" else None
    prep = prepare_method(model, tok, config(), progress=False, hessians=keep)
    del model
    store = None if keep is None else HessianStore.open(keep)
    prepare_s = time.perf_counter() - t
    state = prep.state
    chord = dataclasses.replace(state.profile, gamma=None)
    for variant, budget in planned_rows(spec["variants"], spec["budgets"], len(widths) == 1):
        if row_name(variant, budget) not in spec["done"]:
            t = time.perf_counter()
            cfg = config(budget=budget)
            if variant == "fp16":
                from lwq.method.cost import layer_cost
                from lwq.quant.grid import FLOAT_BITS, GridSpec

                lo, hi = state.lo, GridSpec(FLOAT_BITS, state.lo.group_size)
                costs = tuple(
                    layer_cost(c.name, state.orders[c.name], c.shape, lo, hi, c.structure)
                    for c in state.costs
                )
                s16 = dataclasses.replace(state, hi=hi, costs=costs)
                plan = MethodPlan(s16, fixed_allocation(s16, FP16_RATIO))
            elif variant == "fixed":
                cfg = config(budget=budget, objective="fixed")
                plan = MethodPlan(state, allocate(state, cfg))
            elif variant == "diagonal":
                cfg = config(budget=budget, objective="diagonal")
                plan = MethodPlan(state, allocate(state, cfg))
            elif variant == "chord":
                s_chord = dataclasses.replace(state, profile=chord)
                plan = MethodPlan(s_chord, allocate(s_chord, cfg))
            else:
                plan = MethodPlan(state, allocate(state, cfg))
            out = work / f"{variant}-{budget}"
            report = quantize_model(Path(spec["model"]), out, plan, prep.calib, cfg, False, store)
            print(
                json.dumps(
                    {
                        "variant": variant,
                        "budget": budget,
                        "out": str(out),
                        "bits": report.bits,
                        "seconds": time.perf_counter() - t,
                        "predicted_kl": plan.alloc.predicted_loss,
                        "mean_ratio": sum(plan.alloc.ratios) / len(plan.alloc.ratios),
                        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "prepare_seconds": prepare_s,
                        "stages": state.seconds,
                        **eval_child(out, spec["full"]),
                    }
                ),
                flush=True,
            )


def planned_rows(variants: list[str], budgets: list[float], one_base: bool) -> Any:
    """(variant, budget) of a configuration's rows: each variant at every budget in turn."""
    for variant in variants:
        for budget in budgets:
            if variant == "fp16" and budget != budgets[0]:
                continue  # one fixed ratio: one row whatever the budget
            if variant in ("fp16", "fixed") and not one_base:
                continue  # one ratio for all layers needs one base
            yield variant, budget


def row_name(variant: str, budget: float) -> str:
    return variant if variant == "fp16" else f"{variant} {budget}"


def lwq_rows(args: argparse.Namespace, done: dict[str, Any]) -> Any:
    for config in args.lwq_configs:
        lo, hi, group, *rest = config.split("/")
        r_max = float(rest[0]) if rest else None
        tag = f"lwq {lo}/{hi} g{group}" + (f" r{r_max:g}" if rest else "")
        tag += " columns" if args.structure == "columns" else ""
        tag += f" floor-{args.base_floor}" if args.base_floor != "budget" and "+" in lo else ""
        tag += " mse" if args.clip == "mse" else ""
        tag += (" act-order" if args.act_order else "") + f" {args.mode}"
        tag += f" seed{args.seed}" if args.seed else ""
        one_base = "+" not in lo
        names = [row_name(*vb) for vb in planned_rows(args.variants, args.budgets, one_base)]
        if all(f"{tag} {name}" in done for name in names):
            continue
        spec = {
            "model": str(args.model),
            "work": str(args.work / tag.replace(" ", "-").replace("/", "-")),
            "lo": lo,
            "hi": int(hi),
            "group": int(group),
            "r_max": r_max,
            "structure": args.structure,
            "base_floor": args.base_floor,
            "seed": args.seed,
            "act_order": args.act_order,
            "mode": args.mode,
            "budgets": args.budgets,
            "variants": args.variants,
            "done": [name for name in names if f"{tag} {name}" in done],
            "calib": str(args.calib_path),
            "clip": args.clip,
            "full": args.full,
        }
        for line in stream_child([sys.executable, __file__, "--lwq-child", json.dumps(spec)]):
            if line.startswith("{"):
                row = json.loads(line)
                name = row_name(row["variant"], row["budget"])
                yield f"{tag} {name}", {"family": "lwq", "config": tag, **row}


def peer_rows(args: argparse.Namespace, done: dict[str, Any]) -> Any:
    if not args.peer_python:
        return
    scripts = {"hqq": "hqq_quant.py", "llm-compressor": "llmcompressor_gptq.py"}
    for tool, settings in PEERS.items():
        if tool not in args.peer_tools:
            continue
        for bits, group in settings:
            key = f"{tool} W{bits} g{group}"
            key += " act-order" if tool == "llm-compressor" and args.act_order else ""
            if key in done:
                continue
            cmd = [args.peer_python, str(REPO / "benchmarks" / "peers" / scripts[tool])]
            cmd += ["--model", str(args.model), "--bits", str(bits), "--group-size", str(group)]
            cmd += ["--eval", "real"] + (["--full"] if args.full else [])
            if tool == "llm-compressor":
                cmd += ["--calib", str(args.calib_path)]
                cmd += ["--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN)]
                cmd += ["--actorder", "static" if args.act_order else "none"]
            try:
                run = run_child(cmd, env={"PYTHONPATH": str(REPO)})
            except RuntimeError as err:
                yield key, {"family": "peer", "tool": tool, "error": str(err)[-500:]}
                continue
            res = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
            yield (
                key,
                {
                    "family": "peer",
                    "tool": tool,
                    "bits": res.get("bits_per_weight", res.get("bits")),
                    "seconds": res["seconds"],
                    "peak_rss_mib": run.peak_rss_mib,
                    **{k: v for k, v in res.items() if k.startswith("ppl_")},
                },
            )


def checkpoint_of(args: argparse.Namespace, key: str, row: dict[str, Any]) -> Path:
    """Where a saved row's model is: the checkpoint its run wrote, or the model itself."""
    if row.get("family") == "fp":
        return Path(args.model)
    if "out" in row:  # lwq rows record their checkpoint
        return Path(row["out"])
    if row.get("family") == "uniform":
        return Path(args.work) / key.replace(" ", "-")
    raise SystemExit(f"row {key!r} ({row.get('family')}) keeps no checkpoint: rerun it with --full")


def add_full(args: argparse.Namespace, rows: dict[str, Any], save: Any) -> None:
    """The whole test set for rows already saved, from the checkpoints they left in --work."""
    missing = [key for key in args.add_full if key not in rows]
    if missing:
        raise SystemExit(f"--add-full: no saved rows {missing} in {args.json}")
    paths = {key: checkpoint_of(args, key, rows[key]) for key in args.add_full}
    gone = [str(p) for p in paths.values() if not p.is_dir()]
    if gone:
        raise SystemExit(f"--add-full: checkpoints no longer there: {gone}; rerun those rows")
    for key, path in paths.items():
        if "ppl_full" not in rows[key]:
            save(key, {**rows[key], **eval_child(path, full=True, quarter=False)})


def print_table(rows: dict[str, Any]) -> None:
    print(
        "\n| row | bits (bytes) | ppl WikiText-2 quarter | ppl full test | seconds | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    for key, r in sorted(rows.items(), key=lambda kv: (kv[1].get("bits", 99), kv[0])):
        if "error" in r:
            print(f"| {key} | - | error: {r['error'][-80:]} | | | |")
            continue
        full = fmt_ppl(r["ppl_full"]) if "ppl_full" in r else "-"
        secs = r.get("seconds", 0.0)
        if "prepare_seconds" in r:
            secs_s = f"{r['prepare_seconds']:.0f} + {secs:.0f}"
        else:
            secs_s = f"{secs:.0f}"
        rss = r.get("peak_rss_mib", float("nan"))
        print(
            f"| {key} | {r.get('bits', 16.0):.3f} | {fmt_ppl(r['ppl_quarter'])} | {full} "
            f"| {secs_s} | {rss:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["fp", "uniform", "lwq", "peers"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    ap.add_argument(
        "--lwq-configs",
        nargs="+",
        default=["2/4/128/0.6"],
        help="LO/HI/GROUP[/R_MAX] of the method (r_max must reach the budget's mean ratio)",
    )
    ap.add_argument("--variants", nargs="+", default=["lwq", "diagonal", "fixed", "chord", "fp16"])
    ap.add_argument(
        "--uniform",
        nargs="+",
        help='only these uniform rows, e.g. "gptq W3 g128" (default: all of them)',
    )
    ap.add_argument(
        "--base-floor",
        choices=["budget", "none"],
        default="budget",
        help="method.base_floor of the configurations with several bases (LO as 2+3)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="calib.seed of the method rows: with a saved calibration set it draws the "
        "profile's sequences and sampled labels only (repeats of a configuration)",
    )
    ap.add_argument("--mode", choices=["parallel", "sequential"], default="sequential")
    ap.add_argument(
        "--structure",
        choices=["weights", "columns"],
        default="weights",
        help="method.structure of the lwq rows: single high-impact weights or whole columns",
    )
    ap.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gptq.act_order of the GPTQ and lwq rows (default on, as in lwq)",
    )
    ap.add_argument(
        "--clip", choices=["minmax", "mse"], default="mse", help="gptq.clip of our rows"
    )
    ap.add_argument("--peer-python", help="python of the peer venv (HQQ, llm-compressor)")
    ap.add_argument(
        "--peer-tools",
        nargs="+",
        choices=list(PEERS),
        default=list(PEERS),
        help="the peers to run (HQQ needs no calibration: its rows do not depend on --calib)",
    )
    ap.add_argument("--full", action="store_true", help="also the whole WikiText-2 test set")
    add_calib_arg(ap)
    ap.add_argument("--work", type=Path, help="default /tmp/lwq-bench/real-CALIB")
    ap.add_argument("--json", type=Path, help="default benchmarks/results/real_CALIB.json")
    ap.add_argument(
        "--add-full",
        nargs="+",
        metavar="ROW",
        help="only add the whole test set to these saved rows (checkpoints still in --work)",
    )
    ap.add_argument("--eval-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-quarter", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lwq-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.eval_child:
        print(json.dumps(evaluate(args.eval_child, args.full, not args.no_quarter)))
        return
    if args.lwq_child:
        lwq_child(json.loads(args.lwq_child))
        return
    if not WIKITEXT.is_file():
        raise SystemExit(f"WikiText-2 not found at {WIKITEXT}")
    args.model = model_dir()
    args.work = args.work or Path(f"/tmp/lwq-bench/real-{args.calib}")
    args.json = args.json or REPO / "benchmarks" / "results" / f"real_{args.calib}.json"
    args.calib_path = calib_source(args.calib)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}

    def save(key: str, row: dict[str, Any]) -> None:
        if args.json.is_file():  # rows another run saved meanwhile are kept
            rows.update({k: v for k, v in json.loads(args.json.read_text()).items() if k != key})
        rows[key] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{key}: {json.dumps(row)[:300]}", flush=True)

    if args.add_full:
        add_full(args, rows, save)
        print_table(rows)
        return
    if "fp" in args.parts and "fp" not in rows:
        save("fp", {"family": "fp", "bits": 16.0, **eval_child(args.model, args.full)})
    parts = {"uniform": uniform_rows, "lwq": lwq_rows, "peers": peer_rows}
    for part, rows_of in parts.items():
        if part in args.parts:
            for key, row in rows_of(args, rows):
                save(key, row)
    print_table(rows)


if __name__ == "__main__":
    main()
