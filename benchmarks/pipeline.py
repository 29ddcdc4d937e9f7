"""What the workflow costs on top of the library, and what its caches save.

In one process, on a zoo model, ``--repeats`` times:

bare     the library alone: ``quantize`` with ``--method lwq`` in parallel mode
         (what the flow computes), then the perplexity of the full-precision and
         the quantized model on the validation slice (what the flow evaluates);
flow     ``flows.compress.run`` on a fresh work folder against the embedded
         defaults (Prefect's ephemeral server, MLflow on sqlite, local storage),
         same settings; the first call of a process also starts the server,
         reported separately as the first repeat;
rebudget the flow again with another budget (calibration and sensitivity cached).

Prints the medians and the ratios flow/bare (target <= 1.15) and
rebudget/flow (target <= 0.40).

    python benchmarks/pipeline.py [--model llama-6l-128d] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def config(model: str, work: Path, budget: float, args: argparse.Namespace) -> Any:
    from lwq.config import make_config

    return make_config(
        {
            "model": str(ZOO / model),
            "out": str(work / "bare"),
            "overwrite": True,
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "mode": "parallel",
            },
            "quant": {"method": "lwq"},
            "method": {"budget": budget},
            "pipeline": {
                "work_dir": str(work / "flow"),
                "eval_data": str(ZOO / "data" / "validation.txt"),
                "registry_name": f"bench-{work.name}",
            },
        }
    )


def bare(cfg: Any) -> float:
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import load_quantized
    from lwq.quantize import quantize
    from lwq.textio import read_text

    t = time.perf_counter()
    report = quantize(cfg, progress=False)
    text = read_text(Path(str(cfg.pipeline.eval_data)))
    q, tok, _ = load_quantized(report.out)
    seq = int(q.config.max_position_embeddings)
    perplexity_of_text(q, tok, text, seq, batch_size=8)
    fp, _ = load_model_dir(Path(str(cfg.model)))
    perplexity_of_text(fp, tok, text, seq, batch_size=8)
    return time.perf_counter() - t


def flow(cfg: Any) -> float:
    from flows.compress import run

    t = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama-6l-128d")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/pipeline"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"bare": [], "flow": [], "rebudget": []}
    for i in range(args.repeats + 1):  # repeat 0 warms up the ephemeral server
        work = args.work / f"r{i}"
        shutil.rmtree(work, ignore_errors=True)
        b = bare(config(args.model, work, 2.5, args))
        f = flow(config(args.model, work, 2.5, args))
        r = flow(config(args.model, work, 3.0, args))
        print(f"repeat {i}: bare {b:.1f} s, flow {f:.1f} s, rebudget {r:.1f} s", flush=True)
        if i > 0:
            times["bare"].append(b)
            times["flow"].append(f)
            times["rebudget"].append(r)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| run | median s | runs (s) |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    print(f"\nflow / bare = {med['flow'] / med['bare']:.3f} (target <= 1.15)")
    print(f"rebudget / flow = {med['rebudget'] / med['flow']:.3f} (target <= 0.40)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"times": times, "median": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
