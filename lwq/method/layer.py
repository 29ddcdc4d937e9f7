"""A layer at its ratio: the top-r salient weights on the high grid, the rest on the low."""

from __future__ import annotations

import torch

from lwq.method.saliency import Structure, top_mask
from lwq.quant.grid import GridSpec
from lwq.quant.layer import LayerJob


def job_at_ratio(
    name: str,
    order: torch.Tensor,
    shape: tuple[int, int],
    ratio: float,
    lo: GridSpec,
    hi: GridSpec,
    structure: Structure = "weights",
) -> LayerJob:
    """The ``LayerJob`` of layer ``name`` at ``ratio`` of its saliency ``order``.

    At ratio 0 (or a ratio that protects no weight) it is a plain ``lo`` layer:
    no mask is stored, exactly as the cost model counts it. A mask of whole
    columns is quantized high columns last (docs/method.md, "The high-impact
    set's structure").
    """
    mask = top_mask(order, shape, ratio, structure) if ratio > 0 else None
    if mask is None or not bool(mask.any()):
        return LayerJob(name, lo)
    return LayerJob(name, lo, hi, mask, hi_last=structure == "columns")
