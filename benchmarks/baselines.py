"""Baselines on the zoo models: FP32, RTN and GPTQ at W4/W3/W2 grids.

For every zoo model and setting, quantizes with ``lwq.quantize`` in a fresh
subprocess (so its peak RSS is its own), then evaluates the packed checkpoint:
perplexity on the zoo validation slice and, when ../shared is present, on the
WikiText-2 test split. Prints a markdown table and writes JSON.

    python benchmarks/baselines.py [--models llama-6l-128d ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SETTINGS = [  # (method, bits, group size)
    ("rtn", 4, 128),
    ("gptq", 4, 128),
    ("rtn", 3, 128),
    ("gptq", 3, 128),
    ("rtn", 2, 128),
    ("gptq", 2, 128),
    ("rtn", 2, 64),
    ("gptq", 2, 64),
]


def run_row(
    model: str,
    method: str,
    bits: int,
    group: int,
    out: Path,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    act_order: bool = False,
) -> dict[str, Any]:
    """Quantize in this process and return timing and peak RSS (KiB -> MiB).

    GPTQ's act order is off unless asked for: the recorded zoo tables and the
    parity with llm-compressor were measured without it.
    """
    from lwq.config import make_config
    from lwq.quantize import quantize

    data: dict[str, Any] = {
        "model": str(ZOO / model),
        "out": str(out),
        "overwrite": True,
        "quant": {"method": method, "bits": bits, "group_size": group},
    }
    if method != "rtn":  # RTN reads no calibration data
        data["calib"] = {
            "source": str(ZOO / "data" / "calibration.txt"),
            "n_samples": n_samples,
            "seq_len": seq_len,
            "seed": seed,
            "mode": "sequential",
        }
        data["gptq"] = {"act_order": act_order}
    cfg = make_config(data)
    t = time.perf_counter()
    report = quantize(cfg, progress=False)
    return {
        "seconds": time.perf_counter() - t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bits": report.manifest.bits.from_bytes,
        "bits_model": report.manifest.bits.from_model,
    }


def evaluate(path: Path, seq_len: int) -> dict[str, float]:
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import MANIFEST, load_quantized
    from lwq.textio import read_text

    if (path / MANIFEST).is_file():
        model, tok, _ = load_quantized(path)
    else:
        model, tok = load_model_dir(path)
    out = {
        "ppl_validation": perplexity_of_text(
            model, tok, read_text(ZOO / "data" / "validation.txt"), seq_len, batch_size=8
        ).perplexity
    }
    if WIKITEXT.is_file():
        out["ppl_wikitext2"] = perplexity_of_text(
            model, tok, read_text(WIKITEXT), seq_len, batch_size=8
        ).perplexity
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-6l-128d", "gpt2-6l-128d"])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/baselines"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/baselines.json"))
    ap.add_argument(
        "--row", nargs=4, metavar=("MODEL", "METHOD", "BITS", "GROUP"), help=argparse.SUPPRESS
    )  # internal: one quantization in a subprocess
    args = ap.parse_args()
    if args.row:
        model, method, bits, group = args.row
        res = run_row(
            model,
            method,
            int(bits),
            int(group),
            Path(args.work) / "ckpt",
            args.n_samples,
            args.seq_len,
        )
        print("ROW " + json.dumps(res))
        return
    rows = []
    for model in args.models:
        fp = evaluate(ZOO / model, args.seq_len)
        rows.append(
            {
                "model": model,
                "method": "fp32",
                "bits": 16.0,
                "group": "-",
                **fp,
                "seconds": 0.0,
                "peak_rss_mib": 0.0,
            }
        )
        for method, bits, group in SETTINGS:
            work = args.work / f"{model}-{method}-w{bits}g{group}"
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--row",
                    model,
                    method,
                    str(bits),
                    str(group),
                    "--work",
                    str(work),
                    "--n-samples",
                    str(args.n_samples),
                    "--seq-len",
                    str(args.seq_len),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ},
            )
            line = next(x for x in proc.stdout.splitlines() if x.startswith("ROW "))
            row = {"model": model, "method": method, "group": group, **json.loads(line[4:])}
            row.update(evaluate(work / "ckpt", args.seq_len))
            rows.append(row)
            print(f"{model} {method} w{bits}g{group}: {row}", file=sys.stderr)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"rows": rows, "n_samples": args.n_samples, "seq_len": args.seq_len}, indent=1)
        + "\n"
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    wiki = any("ppl_wikitext2" in r for r in rows)
    head = ["model", "method", "group", "bits (bytes)", "ppl validation"]
    head += ["ppl WikiText-2"] if wiki else []
    head += ["quantize s", "peak RSS MiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["model"],
            r["method"],
            str(r["group"]),
            f"{r['bits']:.3f}",
            f"{r['ppl_validation']:.3f}",
        ]
        cells += [f"{r.get('ppl_wikitext2', float('nan')):.2f}"] if wiki else []
        cells += [f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
