"""What a sweep of several budgets costs against a single ``--method lwq`` run.

Runs ``lwq.quantize.quantize`` (one budget) and ``lwq.sweep.sweep`` (five
budgets, no evaluation) on the same model and calibration set, alternating,
``--repeats`` times in this process, and prints the medians and their ratio
(target: at most 2). Both write their checkpoints under ``--work``.

    python benchmarks/sweep_cost.py [--model llama-6l-128d] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def config(model: str, out: Path, args: argparse.Namespace) -> Any:
    from lwq.config import make_config
    from lwq.method.reverse import profile_capacity

    return make_config(
        {
            "model": str(ZOO / model),
            "out": str(out),
            "overwrite": True,
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
            },
            "quant": {"method": "lwq"},
            # As many profile sequences as the calibration set holds, up to the default.
            "method": {
                "budget": 2.5,
                "profile_samples": min(256, profile_capacity(args.n_samples, args.seq_len, 128)),
            },
        }
    )


def main() -> None:
    from lwq.quantize import quantize
    from lwq.sweep import sweep

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama-6l-128d")
    ap.add_argument("--budgets", default="2.25,2.5,2.75,3.0,3.25")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/sweep-cost"))
    ap.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "sweep_cost.json"
    )
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    single, multi = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        quantize(config(args.model, args.work / "single", args), progress=False)
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        sweep(config(args.model, args.work / "sweep", args), budgets, None, progress=False)
        multi.append(time.perf_counter() - t)
    s, m = statistics.median(single), statistics.median(multi)
    print("| run | budgets | median s | runs (s) |")
    print("|---|---|---|---|")
    print(f"| quantize --method lwq | 1 | {s:.1f} | {', '.join(f'{x:.1f}' for x in single)} |")
    print(f"| sweep | {len(budgets)} | {m:.1f} | {', '.join(f'{x:.1f}' for x in multi)} |")
    print(f"\nsweep / single = {m / s:.2f} (target <= 2)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"budgets": budgets, "single": single, "sweep": multi, "ratio": m / s}) + "\n"
    )


if __name__ == "__main__":
    main()
