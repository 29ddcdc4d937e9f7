"""HQQ (half-quadratic quantization, calibration-free) on a zoo model (peer environment only).

HQQ 0.2.8 through its own layer API on the CPU (``HQQLinear`` on every linear
of the decoder blocks; ``AutoHQQHFModel`` knows only some architectures and the
transformers ``HqqConfig`` route is not implemented in this version), with
float32 compute. Bits per weight are counted as HQQ stores a layer with float16
metadata: nbits per weight plus a 16-bit scale and a 16-bit zero per group
(HQQ's optimised zero is fractional, so it cannot be packed into nbits).

    PYTHONPATH=. /path/to/peer-venv/bin/python benchmarks/peers/hqq_quant.py \\
        --model zoo/llama-6l-128d --bits 2 --group-size 64
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
from common import conv1d_to_linear, evaluate, evaluate_real


def main() -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument(
        "--eval",
        choices=["zoo", "real"],
        default="zoo",
        help="zoo: validation slice, WikiText-2, KL; real: benchmarks/real.py's protocol",
    )
    ap.add_argument("--full", action="store_true", help="real: also the whole WikiText-2 test")
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    converted = conv1d_to_linear(fp)
    model = copy.deepcopy(fp)
    cfg = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size, axis=1)
    t = time.perf_counter()
    n = groups = 0
    # HQQ's own layer quantizer on every linear of the decoder blocks (its
    # AutoHQQHFModel knows only some architectures); the LM head stays float.
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        d_out, d_in = mod.weight.shape
        hq = HQQLinear(
            copy.deepcopy(mod), quant_config=cfg, compute_dtype=torch.float32, device="cpu"
        )
        # Evaluate with the dequantised weight in the plain Linear: the same
        # numbers as HQQLinear's forward, without dequantising every call.
        with torch.no_grad():
            mod.weight.copy_(hq.dequantize().reshape(d_out, d_in).float())
        n += d_out * d_in
        groups += d_out * d_in // args.group_size
    seconds = time.perf_counter() - t
    if n == 0:
        raise SystemExit("HQQ quantized no layer")
    bits = (n * args.bits + groups * 32) / n
    seq = int(model.config.max_position_embeddings)
    res = {
        "tool": "hqq",
        "model": str(args.model),
        "bits_setting": args.bits,
        "group_size": args.group_size,
        "bits": bits,
        "conv1d_converted": converted,
        "seconds": seconds,
        **(
            evaluate_real(model, tok, args.full)
            if args.eval == "real"
            else evaluate(model, tok, seq, fp_model=fp)
        ),
    }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
