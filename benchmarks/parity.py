"""Parity of lwq's GPTQ with llm-compressor's, same calibration windows.

For each zoo model at W4 g128 and W3 g128 (asymmetric, act-order off in both,
dampening 0.01, sequential), quantizes with lwq in this process and with
llm-compressor in the peer environment (``--peer-python``), and prints both
perplexities and their ratio. Both tools get the same 128 x 256 windows
(``lwq.calibration`` with seed 0; the peer script prints the windows' hash so
it can be checked) and are scored by the same perplexity code.

    python benchmarks/parity.py --peer-python /work/peers-venv/bin/python --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `baselines`


def ours(
    model: str, bits: int, group: int, work: Path, n: int, seq: int, seed: int
) -> dict[str, Any]:
    """lwq's GPTQ with the baselines' settings and evaluation (same code path)."""
    from baselines import evaluate, run_row
    from transformers import AutoTokenizer

    from lwq.calibration import build_calibration_set

    res = run_row(model, "gptq", bits, group, work, n, seq, seed)
    tok = AutoTokenizer.from_pretrained(ZOO / model)
    calib = build_calibration_set(tok, ZOO / "data" / "calibration.txt", n, seq, seed=seed)
    return {**res, **evaluate(work, seq), "calib_sha256": calib.sha256}


def peer(
    python: str, model: str, bits: int, group: int, n: int, seq: int, seed: int
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [python, str(REPO / "benchmarks" / "peers" / "llmcompressor_gptq.py")]
    cmd += ["--model", str(ZOO / model), "--bits", str(bits), "--group-size", str(group)]
    cmd += ["--n-samples", str(n), "--seq-len", str(seq), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor failed: {proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])  # type: ignore[no-any-return]


def print_rows(rows: list[dict[str, Any]], metrics: list[str]) -> None:
    head = ["model", "setting", "seed"]
    for m in metrics:
        head += [f"lwq {m}", f"llm-compressor {m}", f"ratio {m}"]
    head += ["lwq s", "llm-compressor s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        a, b = r["lwq"], r["llm_compressor"]
        cells = [r["model"], f"W{r['bits']} g{r['group']}", str(r["seed"])]
        for m in metrics:
            cells += [f"{a[m]:.3f}", f"{b[m]:.3f}", f"{a[m] / b[m]:.4f}"]
        cells += [f"{a['seconds']:.0f}", f"{b['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def print_summary(rows: list[dict[str, Any]], metrics: list[str]) -> None:
    """Per setting: ratio of the seed means, and each tool's seed-to-seed spread."""
    head = ["model", "setting", "seeds"]
    for m in metrics:
        head += [f"ratio of means {m}", f"lwq spread {m}", f"llm-compressor spread {m}"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    keys = sorted({(r["model"], r["bits"], r["group"]) for r in rows}, key=str)
    for model, bits, group in keys:
        sel = [r for r in rows if (r["model"], r["bits"], r["group"]) == (model, bits, group)]
        cells = [model, f"W{bits} g{group}", str(len(sel))]
        for m in metrics:
            a = [r["lwq"][m] for r in sel]
            b = [r["llm_compressor"][m] for r in sel]
            cells += [
                f"{statistics.fmean(a) / statistics.fmean(b):.4f}",
                f"{(max(a) - min(a)) / min(a):.2%}",
                f"{(max(b) - min(b)) / min(b):.2%}",
            ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peer-python", required=True, help="python of the llm-compressor venv")
    ap.add_argument("--models", nargs="+", default=["llama-6l-128d", "gpt2-6l-128d"])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sampling seeds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/parity"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "parity.json")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for bits, group in ((4, 128), (3, 128)):
            for seed in args.seeds:
                work = args.work / f"{model}-w{bits}"
                a = ours(model, bits, group, work, args.n_samples, args.seq_len, seed)
                b = peer(args.peer_python, model, bits, group, args.n_samples, args.seq_len, seed)
                assert a["calib_sha256"] == b["calib_sha256"], "calibration windows differ"
                rows.append(
                    {
                        "model": model,
                        "bits": bits,
                        "group": group,
                        "seed": seed,
                        "lwq": a,
                        "llm_compressor": b,
                    }
                )
    metrics = ["ppl_validation"] + (["ppl_wikitext2"] if WIKITEXT.is_file() else [])
    print_rows(rows, metrics)
    print_summary(rows, metrics)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
