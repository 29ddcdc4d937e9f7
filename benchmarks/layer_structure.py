"""Single weights or whole columns, on real layers: relative output error at equal bytes.

For layers of SmolLM2-135M with their full-precision input Hessians (a
``HessianStore`` written by a parallel-mode run of ``benchmarks/real.py``),
each layer is quantized at a per-layer budget of 2.5, 3.0 and 3.5 bits (the
largest ratio whose exact packed bytes fit) with 2-bit and 4-bit grids, group
128, and the error tr(dW H dW^T) / tr(W H W^T) is measured for:

  weights          the top single weights by saliency (obs), Elias-Fano mask
  ..., act order   (here and below) GPTQ's columns by decreasing Hessian diagonal
  columns          the top input columns by summed saliency, column map
  columns, static  the same columns left to right, every group's grids fitted
                   up front (as the next variant must)
  columns, hi last the same columns, GPTQ quantizing the 2-bit columns first
                   so that the 4-bit columns absorb their error
  ..., act order   each part by decreasing Hessian diagonal (gptq.act_order)

against uniform GPTQ W2 and W3 (group 128) as reference. It prints the median
over layers (and the ratio each gets), and saves the table as JSON.

``--checkpoints BUDGET`` also quantizes the whole model with every layer at
that many bits (no allocation: each layer at the largest ratio that fits), once
per structure, in parallel mode from the same Hessians, and reports WikiText-2
perplexity (first quarter, as benchmarks/real.py): the structures compared
without the profile and the QP in between.

    python benchmarks/layer_structure.py \
        --hessians /tmp/lwq-bench/real/lwq-2-4-g128-r0.6-parallel/hessians
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realmodel import REPO, model_dir

from lwq.loading import read_layer_weights
from lwq.method.cost import LayerCost, layer_cost
from lwq.method.layer import job_at_ratio
from lwq.method.saliency import Structure, ranking, saliency
from lwq.method.state import HessianStore
from lwq.quant.gptq import GPTQSettings
from lwq.quant.grid import GridSpec
from lwq.quant.layer import LayerJob, quantize_layer

LO, HI = GridSpec(2, 128), GridSpec(4, 128)


def ratio_for(cost: LayerCost, budget: float) -> float:
    """The largest ratio (to 1e-4) whose packed layer is at most ``budget`` bits per weight."""
    lo, hi = 0.0, 1.0
    if cost.bits(0.0) / cost.n > budget:
        return 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.bits(mid) / cost.n <= budget else (lo, mid)
    return lo


def layer_rows(name: str, W: torch.Tensor, H: torch.Tensor, budgets: list[float]) -> dict[str, Any]:
    gptq, static = GPTQSettings(), GPTQSettings(static_groups=True)
    act = GPTQSettings(act_order=True)
    shape = (int(W.shape[0]), int(W.shape[1]))
    scores = saliency(W, H, "obs")
    out: dict[str, Any] = {}
    for bits in (2, 3):
        job = LayerJob(name, GridSpec(bits, 128))
        out[f"gptq W{bits}"] = quantize_layer(W, H, job, gptq, measure_error=True).output_error
        out[f"gptq W{bits} act order"] = quantize_layer(
            W, H, job, act, measure_error=True
        ).output_error
    for structure in ("weights", "columns"):
        s: Structure = structure  # type: ignore[assignment]
        order = ranking(scores, structure=s)
        cost = layer_cost(name, order, shape, LO, HI, s)
        for b in budgets:
            r = ratio_for(cost, b)
            job = job_at_ratio(name, order, shape, r, LO, HI, s)
            variants = [(structure, dataclasses.replace(job, hi_last=False), gptq)]
            if structure == "weights":
                variants.append(("weights, act order", job, act))
            if structure == "columns" and job.mask is not None:
                variants.append(("columns, static", variants[0][1], static))
                last = LayerJob(name, LO, HI, job.mask, True)
                variants.append(("columns, hi last", last, gptq))
                variants.append(("columns, hi last, act order", last, act))
            for label, j, settings in variants:
                res = quantize_layer(W, H, j, settings, measure_error=True)
                out[f"{label} @{b}"] = {"ratio": r, "error": res.output_error}
    return out


@dataclasses.dataclass
class EqualBitsPlan:
    """Every layer at ``budget`` bits: the largest ratio of its ranking that fits."""

    store: HessianStore
    weights: dict[str, torch.Tensor]
    structure: Structure
    budget: float
    method: str = "lwq"
    measure_error: bool = True

    def job(self, name: str) -> LayerJob:
        W, H = self.weights[name], self.store.get(name).to(torch.float32)
        shape = (int(W.shape[0]), int(W.shape[1]))
        order = ranking(saliency(W, H, "obs"), structure=self.structure)
        r = ratio_for(layer_cost(name, order, shape, LO, HI, self.structure), self.budget)
        return job_at_ratio(name, order, shape, r, LO, HI, self.structure)

    def allocation(self, errors: dict[str, float | None]) -> Any:
        return None


def checkpoint_rows(store: HessianStore, budget: float, work: Path) -> dict[str, Any]:
    from realmodel import perplexity, quarter_ids

    from lwq.config import make_config
    from lwq.pack.checkpoint import load_quantized
    from lwq.quantize import quantize_model

    model = model_dir()
    weights = read_layer_weights(model, list(store.index))
    cfg = make_config(
        {
            "model": str(model),
            "overwrite": True,
            "calib": {"mode": "parallel"},
            "quant": {"method": "lwq"},
            "method": {"lo_bits": LO.bits, "hi_bits": HI.bits, "group_size": LO.group_size},
        }
    )
    rows = {}
    for structure in ("weights", "columns"):
        plan = EqualBitsPlan(store, weights, structure, budget)  # type: ignore[arg-type]
        out = work / f"{structure}-{budget}"
        report = quantize_model(model, out, plan, None, cfg, False, store)
        qmodel, tok, _ = load_quantized(out)
        errors = [r.output_error for r in report.layers if r.output_error is not None]
        rows[f"{structure} @{budget}, every layer"] = {
            "bits": report.bits,
            "ppl_quarter": perplexity(qmodel, quarter_ids(tok)),
            "mean_output_error": sum(errors) / len(errors),
            "seconds": report.seconds,
        }
        print(structure, rows[f"{structure} @{budget}, every layer"], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hessians", type=Path, required=True)
    ap.add_argument("--blocks", nargs="+", type=int, default=[0, 29])
    ap.add_argument("--budgets", nargs="+", type=float, default=[3.0])
    ap.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "layer_structure.json"
    )
    ap.add_argument("--checkpoints", type=float, help="also whole models at these bits")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/layer-structure"))
    args = ap.parse_args()
    store = HessianStore.open(args.hessians)
    if args.checkpoints is not None:
        rows = checkpoint_rows(store, args.checkpoints, args.work)
        path = args.json.with_name(args.json.stem + "_models.json")
        path.write_text(json.dumps(rows, indent=1) + "\n")
        return
    names = [n for n in store.index if int(n.split(".")[2]) in args.blocks]
    weights = read_layer_weights(model_dir(), names)
    rows = {}
    for name in names:
        H = store.get(name).to(torch.float32)
        rows[name] = layer_rows(name, weights[name], H, args.budgets)
        print(name, json.dumps(rows[name])[:200], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(next(iter(rows.values())))
    print(f"\n{len(names)} layers of blocks {args.blocks}: median relative output error")
    print("| variant | median ratio | median error |\n|---|---|---|")
    for k in keys:
        vals = [r[k] for r in rows.values()]
        if isinstance(vals[0], dict):
            ratio = statistics.median(v["ratio"] for v in vals)
            err = statistics.median(v["error"] for v in vals)
            print(f"| {k} | {ratio:.3f} | {err:.4f} |")
        else:
            print(f"| {k} | - | {statistics.median(vals):.4f} |")


if __name__ == "__main__":
    main()
