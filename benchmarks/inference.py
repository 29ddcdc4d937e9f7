"""Inference from packed checkpoints: prefill and batch-1 decode speed, memory.

For each model, rows: the float32 original, the dequantised load
(``load_quantized``) of the W4 checkpoint, and the packed path
(``load_quantized(packed_modules=True)``, what ``lwq.load``/``lwq serve`` use)
of W4 g128, W3 g128, W2 g64 and the method at 2.5 and 3.0 bits.

Speed: every model is loaded in one process and the rows are measured in turn,
``--repeats`` rounds (interleaved, so the machine's noise falls on all rows
alike); the table gives medians and ratios to the float32 original's median.
Prefill: one forward pass of ``--prefill`` tokens. Decode: ``--decode`` greedy
steps of one token with the KV cache after a 32-token prompt.

Memory: each row is loaded again in a fresh process: the bytes of its weights
in memory (parameters and buffers, shared ones once) against the bytes of its
weight files on disk, the RSS the load added, and the process's peak RSS
after one prefill and the decode steps.

Uniform rows are RTN checkpoints (the speed does not depend on the quantizer);
the method's rows are made with ``lwq quantize --method lwq`` unless given with
``--checkpoint MODEL/LABEL=PATH`` (SmolLM2-135M's take about 15 minutes each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realmodel import REPO, lwq_cmd, run_child

UNIFORM = {"W4 g128": (4, 128), "W3 g128": (3, 128), "W2 g64": (2, 64)}
METHOD = {"lwq 2.5": 2.5, "lwq 3.0": 3.0}
PROMPT = 32


def status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process; the peak is per process image,
    where ru_maxrss keeps the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.numel() == 0:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def load(kind: str, path: Path) -> Any:
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import load_quantized

    if kind == "fp32":
        model = load_model_dir(path)[0]
    else:
        model = load_quantized(path, packed_modules=kind == "packed")[0]
    return model.eval()


@torch.no_grad()
def prefill_seconds(model: Any, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def decode_seconds(model: Any, prompt: torch.Tensor, steps: int) -> float:
    out = model(input_ids=prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def inputs(model: Any, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, model.config.vocab_size - 100, (1, n), generator=g)


def memory_child(kind: str, path: Path, prefill: int, decode: int) -> dict[str, float]:
    import transformers  # noqa: F401  (imported before the baseline, like the runtime)

    import lwq.pack.checkpoint  # noqa: F401

    base = status_mib("VmRSS")
    model = load(kind, path)
    loaded = status_mib("VmRSS")
    prefill_seconds(model, inputs(model, prefill))
    decode_seconds(model, inputs(model, PROMPT), decode)
    return {
        "weight_bytes": weight_bytes(model),
        "disk_bytes": disk_bytes(path),
        "load_rss_mib": loaded - base,
        "peak_rss_mib": status_mib("VmHWM"),
    }


def checkpoints(args: argparse.Namespace, model: str, model_dir: Path) -> dict[str, Path]:
    given = {}
    for spec in args.checkpoint:
        key, _, path = spec.partition("=")
        name, _, label = key.rpartition("/")
        if name == model:
            given[label] = Path(path)
    work = args.work / Path(model).name
    out: dict[str, Path] = {}
    for label, (bits, group) in UNIFORM.items():
        out[label] = given.get(label) or work / f"rtn-W{bits}-g{group}"
        if not (out[label] / "lwq_manifest.json").is_file():
            cmd = lwq_cmd("quantize", "--model", str(model_dir), "--method", "rtn")
            cmd += ["--bits", str(bits), "--group-size", str(group), "--out", str(out[label])]
            run_child([*cmd, "--overwrite", "-q"])
    for label, budget in METHOD.items():
        out[label] = given.get(label) or work / f"lwq-{budget}"
        if not (out[label] / "lwq_manifest.json").is_file():
            print(f"{model}: quantizing {label} (lwq quantize --method lwq)", flush=True)
            cmd = lwq_cmd("quantize", "--model", str(model_dir), "--method", "lwq")
            cmd += ["--bits", str(budget), "--out", str(out[label]), "--overwrite", "-q"]
            run_child(cmd)
    return out


def bench_model(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    from lwq.realmodels import resolve_model

    model_dir = resolve_model(model)
    ckpts = checkpoints(args, model, model_dir)
    rows = [
        ("float32 original", "fp32", model_dir),
        ("dequantised W4 g128", "dequantised", ckpts["W4 g128"]),
    ]
    rows += [(f"packed {label}", "packed", path) for label, path in ckpts.items()]
    loaded = {name: load(kind, path) for name, kind, path in rows}
    ids = inputs(loaded["float32 original"], args.prefill)
    prompt = inputs(loaded["float32 original"], PROMPT)
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in loaded}
    for m in loaded.values():  # warm up: kernels built, caches allocated
        prefill_seconds(m, ids[:, :64])
        decode_seconds(m, prompt, 2)
    for rep in range(args.repeats):
        for name, m in loaded.items():
            times[name]["prefill"].append(args.prefill / prefill_seconds(m, ids))
            times[name]["decode"].append(args.decode / decode_seconds(m, prompt, args.decode))
        print(f"{model}: round {rep + 1}/{args.repeats} done", flush=True)
    del loaded
    out = []
    for name, kind, path in rows:
        child = run_child(
            [
                sys.executable,
                __file__,
                "--memory-child",
                kind,
                str(path),
                "--prefill",
                str(args.prefill),
                "--decode",
                str(args.decode),
            ]
        )
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        bits = None
        if kind != "fp32":
            bits = json.loads((path / "lwq_manifest.json").read_text())["bits"]["from_bytes"]
        out.append(
            {
                "model": model,
                "row": name,
                "bits": bits,
                "prefill_tok_s": statistics.median(times[name]["prefill"]),
                "decode_tok_s": statistics.median(times[name]["decode"]),
                "prefill_runs": times[name]["prefill"],
                "decode_runs": times[name]["decode"],
                **mem,
            }
        )
    base = out[0]
    for row in out:
        row["prefill_ratio"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["weights_vs_disk"] = row["weight_bytes"] / row["disk_bytes"]
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        "| model | row | bits | prefill tok/s | x fp32 | decode tok/s | x fp32 | weights MiB "
        "| disk MiB | weights/disk | load RSS MiB | peak RSS MiB |"
    )
    print(head)
    print("|" + "---|" * 12)
    for r in rows:
        bits = "" if r["bits"] is None else f"{r['bits']:.3f}"
        print(
            f"| {Path(r['model']).name} | {r['row']} | {bits} | {r['prefill_tok_s']:.0f} "
            f"| {r['prefill_ratio']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} "
            f"| {r['weight_bytes'] / 2**20:.1f} | {r['disk_bytes'] / 2**20:.1f} "
            f"| {r['weights_vs_disk']:.2f} | {r['load_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--models", nargs="+", default=["smollm2-135m", str(REPO / "zoo" / "llama-6l-128d")]
    )
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL/LABEL=PATH")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the prefill pass")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/inference"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        kind, path = args.memory_child
        print(json.dumps(memory_child(kind, Path(path), args.prefill, args.decode)))
        return
    from lwq.runtime import native

    k = native.kernels()
    print(
        f"native kernels: {k.path if k else 'not built (pure-torch path)'}; "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = [row for model in args.models for row in bench_model(args, model)]
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
