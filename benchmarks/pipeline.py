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

With ``--dask``, instead: starts ``prefect server`` on 127.0.0.1 and times the
flow's quantize stage with the default local runner and on a Dask LocalCluster
of 1 and of 2 single-threaded worker processes (fresh work folders, so nothing
is cached; target: 2 workers at least 1.6x faster than 1, and not slower than
local). The zoo model's layers are 128 wide: a layer's task computes for tens
of milliseconds, less than a task's own cost. ``--synthetic 1024`` times the
runners on a randomly initialised LLaMA of hidden size 1024 instead (2 blocks,
MLP 2816, 16 heads with 4 KV heads, the zoo tokenizer), whose layers cost what a
small real model's do; ``--hi-refine lwc`` makes each layer's task heavier. The
quantize stage is timed from the first layer task submitted to the last result
(the cluster and its workers start with the flow, before it); the whole flow's
seconds are reported too.

    python benchmarks/pipeline.py [--model llama-6l-128d] [--repeats 2] [--dask]
    python benchmarks/pipeline.py --dask --synthetic 1024 --n-samples 32 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def config(model: str, work: Path, budget: float, args: argparse.Namespace) -> Any:
    from lwq.config import make_config
    from lwq.method.reverse import profile_capacity

    return make_config(
        {
            "model": str(ZOO / model) if not Path(model).is_absolute() else model,
            "out": str(work / "bare"),
            "overwrite": True,
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "mode": "parallel",
            },
            "quant": {"method": "lwq"},
            # As many profile sequences as the calibration set holds, up to the default.
            "method": {
                "budget": budget,
                "profile_samples": min(256, profile_capacity(args.n_samples, args.seq_len, 128)),
            },
            "pipeline": {
                "work_dir": str(work / "flow"),
                "eval_data": str(ZOO / "data" / "validation.txt"),
                "registry_name": f"bench-{work.name}",
            },
        }
    )


def bare(cfg: Any) -> float:
    from lwq.config import PipelineConfig
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import context_window, load_model_dir
    from lwq.pack.checkpoint import load_quantized
    from lwq.quantize import quantize
    from lwq.textio import read_text

    t = time.perf_counter()
    text = read_text(Path(str(cfg.pipeline.eval_data)))
    # The library call takes no pipeline settings (they are the workflow's).
    report = quantize(cfg.model_copy(update={"pipeline": PipelineConfig()}), progress=False)
    q, tok, _ = load_quantized(report.out)
    seq = context_window(q.config)
    perplexity_of_text(q, tok, text, seq, batch_size=8)
    fp, _ = load_model_dir(Path(str(cfg.model)))
    perplexity_of_text(fp, tok, text, seq, batch_size=8)
    return time.perf_counter() - t


def flow(cfg: Any) -> float:
    from flows.compress import run

    t = time.perf_counter()
    run(workflow(cfg))
    return time.perf_counter() - t


def workflow(cfg: Any) -> Any:
    """The same settings for ``lwq run``: no --out, parallel mode is implied."""
    return cfg.model_copy(update={"out": None, "overwrite": False})


def start_prefect_server(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return server, f"http://127.0.0.1:{port}/api"
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("prefect server did not start")


def synthetic_model(path: Path, hidden: int) -> str:
    """A random LLaMA of the given width (2 blocks), float32, with the zoo tokenizer."""
    if (path / "config.json").is_file():
        return str(path)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ZOO / "llama-6l-128d")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def dask_part(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize-stage seconds: local runner, Dask with 1 and with 2 workers."""
    server, api = start_prefect_server(args.work)
    os.environ["PREFECT_API_URL"] = api  # before prefect is imported
    from flows.compress import run

    model = args.model
    if args.synthetic:
        model = synthetic_model(args.work / f"llama-2l-{args.synthetic}d", args.synthetic)
    times: dict[str, list[float]] = {"local": [], "dask-1": [], "dask-2": []}
    flow_times: dict[str, list[float]] = {k: [] for k in times}
    try:
        for i in range(args.repeats):
            for label in times:
                work = args.work / f"dask-r{i}-{label}"
                shutil.rmtree(work, ignore_errors=True)
                cfg = config(model, work, 2.5, args)
                if args.synthetic:  # a random model: its perplexity means nothing, keep it short
                    short = args.work / "eval-short.txt"
                    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")
                    short.write_text(text[:20000], encoding="utf-8")
                    pipe = cfg.pipeline.model_copy(update={"eval_data": str(short)})
                    cfg = cfg.model_copy(update={"pipeline": pipe})
                runner = "local" if label == "local" else "dask"
                pipe = cfg.pipeline.model_copy(
                    update={"task_runner": runner, "dask_workers": int(label[-1:] or 1)}
                    if runner == "dask"
                    else {"task_runner": runner}
                )
                method = cfg.method.model_copy(update={"hi_refine": args.hi_refine})
                cfg = cfg.model_copy(update={"pipeline": pipe, "method": method})
                t = time.perf_counter()
                (res,) = run(workflow(cfg))
                flow_times[label].append(time.perf_counter() - t)
                times[label].append(res.seconds["quantize"])
                print(
                    f"repeat {i} {label}: quantize {res.seconds['quantize']:.1f} s, "
                    f"flow {flow_times[label][-1]:.1f} s",
                    flush=True,
                )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in times.items()}
    flow_med = {k: statistics.median(v) for k, v in flow_times.items()}
    print(f"\nmodel {model}, hi_refine {args.hi_refine}, {args.repeats} repeats")
    print("| runner | median quantize s | runs (s) | median flow s |")
    print("|---|---|---|---|")
    for k, v in times.items():
        runs = ", ".join(f"{x:.1f}" for x in v)
        print(f"| {k} | {med[k]:.1f} | {runs} | {flow_med[k]:.1f} |")
    print(f"\ndask-1 / dask-2 = {med['dask-1'] / med['dask-2']:.2f} (target >= 1.6)")
    print(f"dask-2 / local = {med['dask-2'] / med['local']:.2f} (target <= 1.0)")
    return {
        "model": model,
        "times": times,
        "median": med,
        "flow_times": flow_times,
        "flow_median": flow_med,
        "hi_refine": args.hi_refine,
    }


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama-6l-128d")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/pipeline"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dask", action="store_true", help="time the Dask runner instead")
    ap.add_argument("--hi-refine", default="none", choices=["none", "lwc"])
    ap.add_argument(
        "--synthetic", type=int, default=0, help="with --dask: a random LLaMA of this width"
    )
    args = ap.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.dask:
        out = dask_part(args)
        tag = f"_{args.synthetic}d" if args.synthetic else ""
        path = args.json or results / f"pipeline_dask_{args.hi_refine}{tag}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        return
    args.json = args.json or results / "pipeline.json"
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
