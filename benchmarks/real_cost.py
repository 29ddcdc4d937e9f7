"""What the method costs on a real model (issue 13): time against GPTQ, memory, depth.

ratio   ``lwq quantize --method lwq --bits 3.0`` against ``lwq quantize --method
        gptq --bits 3 --group-size 128`` on SmolLM2-135M with the same 64 x 512
        calibration tokens, alternated, each in its own process (wall time and
        peak RSS by wait4); medians of ``--repeats`` and the median of the
        per-repeat ratios.
depth   The method's preparation (calibration pass, saliency, probes,
        sensitivity profile) on copies of SmolLM2 truncated to 8, 16 and 30
        blocks: the profile's time should grow linearly with depth.

Run it alone: two jobs on two cores corrupt every timing.

    python benchmarks/real_cost.py --parts ratio depth --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realmodel import (
    N_SAMPLES,
    REPO,
    SEQ_LEN,
    add_calib_arg,
    calib_args,
    calib_source,
    lwq_cmd,
    median,
    model_dir,
    run_child,
)


def truncated(src: Path, blocks: int, dest: Path) -> Path:
    """A copy of ``src`` with its first ``blocks`` decoder blocks (float16)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    config.num_hidden_layers = blocks
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    keep = {
        k: v
        for k, v in full.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks
    }
    model.load_state_dict(keep)
    model.tie_weights()
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def prepare_child(model: str, out: str, calib: str) -> None:
    """The method's preparation alone; prints its stage seconds as JSON."""
    import resource
    import time

    from lwq.config import make_config
    from lwq.models import load_model_dir
    from lwq.quantize import prepare_method

    cfg = make_config(
        {
            "model": model,
            "calib": {"source": calib, "n_samples": N_SAMPLES, "seq_len": SEQ_LEN},
            "quant": {"method": "lwq"},
        }
    )
    t = time.perf_counter()
    m, tok = load_model_dir(Path(model))
    prep = prepare_method(m, tok, cfg, progress=False)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "stages": prep.state.seconds, "peak_rss_mib": rss}))


def part_ratio(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"gptq": [], "lwq": []}
    ratios = []
    for i in range(args.repeats):
        for method in ("gptq", "lwq"):
            bits = ["--bits", "3", "--group-size", "128"] if method == "gptq" else ["--bits", "3.0"]
            if method == "lwq":
                bits += args.lwq_flags
            out = args.work / f"ratio-{method}"
            cmd = lwq_cmd("quantize", "--model", str(args.model), "--method", method, *bits)
            cmd += [*calib_args(args.calib_path), "--out", str(out), "--overwrite", "-q"]
            res = run_child(cmd)
            runs[method].append({"seconds": res.seconds, "peak_rss_mib": res.peak_rss_mib})
            print(
                f"repeat {i} {method}: {res.seconds:.0f} s, {res.peak_rss_mib:.0f} MiB", flush=True
            )
        ratios.append(runs["lwq"][-1]["seconds"] / runs["gptq"][-1]["seconds"])
    med = {m: median([r["seconds"] for r in v]) for m, v in runs.items()}
    rss = {m: max(r["peak_rss_mib"] for r in v) for m, v in runs.items()}
    print("\n| command | median s | runs (s) | peak RSS MiB |")
    print("|---|---|---|---|")
    for m, v in runs.items():
        secs = ", ".join(f"{r['seconds']:.0f}" for r in v)
        print(f"| lwq quantize --method {m} | {med[m]:.0f} | {secs} | {rss[m]:.0f} |")
    print(
        f"\nlwq / gptq: {med['lwq'] / med['gptq']:.2f} (medians), per repeat "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (median {median(ratios):.2f})"
    )
    return {
        "runs": runs,
        "medians": med,
        "ratios": ratios,
        "peak_rss_mib": rss,
        "lwq_flags": args.lwq_flags,
    }


def part_depth(args: argparse.Namespace) -> dict[str, Any]:
    rows = {}
    for blocks in args.depths:
        path = truncated(args.model, blocks, args.cache / f"smollm2-135m-{blocks}b")
        cmd = [sys.executable, __file__, "--prepare-child", str(path), "--calib", args.calib]
        res = run_child(cmd)
        rows[blocks] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{blocks} blocks: {rows[blocks]}", flush=True)
    print("\n| blocks | calibration s | saliency s | probes s | profile s | profile s / block |")
    print("|---|---|---|---|---|---|")
    for blocks, r in rows.items():
        s = r["stages"]
        print(
            f"| {blocks} | {s['calibration']:.0f} | {s['saliency']:.0f} | {s['probes']:.0f} "
            f"| {s['sensitivity']:.0f} | {s['sensitivity'] / blocks:.1f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["ratio", "depth"], choices=["ratio", "depth"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depths", nargs="+", type=int, default=[8, 16, 30])
    ap.add_argument(
        "--lwq-flags",
        type=str.split,
        default=[],
        help='more flags of the lwq command of part ratio, e.g. "--profile-samples 128"',
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/real-cost"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lwq-bench/truncated"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "real_cost.json")
    add_calib_arg(ap)
    ap.add_argument("--prepare-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.calib_path = calib_source(args.calib)
    if args.prepare_child:
        prepare_child(args.prepare_child, "", str(args.calib_path))
        return
    args.model = model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if "ratio" in args.parts:
        result["ratio"] = part_ratio(args)
    if "depth" in args.parts:
        result["depth"] = part_depth(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
