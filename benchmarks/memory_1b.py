"""Peak memory of GPTQ on a ~1B-parameter LLaMA-architecture model.

Writes a randomly initialised LLaMA of TinyLlama-1.1B's shape (22 layers,
hidden 2048, MLP 5632, 32 heads with 4 KV heads, vocabulary 32000) as bf16
safetensors shards (about 2.2 GB), then quantizes it with GPTQ (W4 g128,
parallel mode, 16 x 512 calibration tokens from the zoo slice) in a fresh
process, and reports that process's peak RSS, the time per block, and the
model's own size in bf16 and float32.

    python benchmarks/memory_1b.py [--work /tmp/lwq-bench/1b] [--layers 22]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"


def make_model(path: Path, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="500MB")
    AutoTokenizer.from_pretrained(ZOO / "llama-6l-128d").save_pretrained(path)
    return n


def quantize_child(model: Path, out: Path) -> None:
    from lwq.config import make_config
    from lwq.quantize import quantize

    cfg = make_config(
        {
            "model": str(model),
            "out": str(out),
            "overwrite": True,
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": 16,
                "seq_len": 512,
                "batch_size": 4,
                "mode": "parallel",
            },
            "quant": {"method": "gptq", "bits": 4, "group_size": 128},
        }
    )
    t = time.perf_counter()
    report = quantize(cfg, progress=False)
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": time.perf_counter() - t,
                "block_seconds": report.block_seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "bits": report.manifest.bits.from_bytes,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/1b"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model, out = args.work / "model", args.work / "ckpt"
    if args.child:
        quantize_child(model, out)
        return
    meta = args.work / "model.json"
    if not meta.is_file():
        gen = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                "from benchmarks.memory_1b import make_model; from pathlib import Path; "
                f"print(make_model(Path({str(model)!r}), {args.layers}))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"n_params": int(gen.stdout.strip().splitlines()[-1])}))
    n_params = json.loads(meta.read_text())["n_params"]
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--work", str(args.work)],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    blocks = res["block_seconds"]
    print("| quantity | value |")
    print("|---|---|")
    print(f"| parameters | {n_params:,} |")
    print(f"| weights on disk (bf16 safetensors) | {disk / 2**20:,.0f} MiB |")
    print(f"| model in float32 | {n_params * 4 / 2**20:,.0f} MiB |")
    print(f"| peak RSS of the quantize process | {res['peak_rss_mib']:,.0f} MiB |")
    print(f"| total quantize time | {res['seconds']:.0f} s |")
    print(f"| time per block (median of {len(blocks)}) | {statistics.median(blocks):.1f} s |")
    print(f"| bits per quantized weight (from bytes) | {res['bits']:.4f} |")
    out_json = REPO / "benchmarks" / "results" / "memory_1b.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"n_params": n_params, "disk_bytes": disk, **res}, indent=1))


if __name__ == "__main__":
    main()
