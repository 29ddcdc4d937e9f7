"""llm-compressor's GPTQ on a zoo model, for the parity check (peer environment only).

Runs in a separate virtual environment that has llm-compressor (it pins its
own transformers); lwq is imported from the repository for the calibration
windows and the perplexity protocol, so both tools see the same calibration
tokens and are evaluated by the same code. GPT-2's Conv1D layers are replaced
by equivalent nn.Linear modules first, because llm-compressor targets Linear.

    PYTHONPATH=. /path/to/peer-venv/bin/python benchmarks/peers/llmcompressor_gptq.py \\
        --model zoo/llama-6l-128d --bits 4 --group-size 128
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common`
from common import ZOO, conv1d_to_linear, evaluate, evaluate_real


def main() -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lwq.calibration import build_calibration_set

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    ap.add_argument("--calib", type=Path, default=ZOO / "data" / "calibration.txt")
    ap.add_argument("--kl", action="store_true", help="also KL to the full-precision model")
    ap.add_argument(
        "--eval",
        choices=["zoo", "real"],
        default="zoo",
        help="zoo: validation slice, WikiText-2, KL; real: benchmarks/real.py's protocol",
    )
    ap.add_argument("--full", action="store_true", help="real: also the whole WikiText-2 test")
    ap.add_argument(
        "--actorder",
        choices=["none", "static"],
        default="none",
        help="GPTQ's activation order (static: columns by decreasing Hessian diagonal, "
        "grids fitted up front, as lwq's act order); none for the parity check",
    )
    args = ap.parse_args()
    actorder = None if args.actorder == "none" else args.actorder

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    converted = conv1d_to_linear(model)
    fp = copy.deepcopy(model) if args.kl else None
    calib = build_calibration_set(tok, args.calib, args.n_samples, args.seq_len, seed=args.seed)
    ids = calib.input_ids.tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    scheme = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": args.bits,
            "type": "int",
            "symmetric": args.symmetric,
            "strategy": "group",
            "group_size": args.group_size,
            "actorder": actorder,
        },
    }
    modifier = GPTQModifier(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        actorder=actorder,
        dampening_frac=0.01,
        block_size=128,
    )
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=args.n_samples,
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - t
    seq = int(model.config.max_position_embeddings)
    res = {
        "tool": "llm-compressor",
        "model": str(args.model),
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": args.symmetric,
        "actorder": args.actorder,
        "calib_sha256": calib.sha256,
        "conv1d_converted": converted,
        "seconds": seconds,
        # As lwq packs the same grid: a float16 scale and a b-bit zero per group.
        "bits_per_weight": args.bits
        + (16 + (0 if args.symmetric else args.bits)) / args.group_size,
        **(
            evaluate_real(model, tok, args.full)
            if args.eval == "real"
            else evaluate(model, tok, seq, fp_model=fp)
        ),
    }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
