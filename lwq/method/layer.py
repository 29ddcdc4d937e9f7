"""Quantizing one layer at its ratio: 4-bit high-impact weights, 2-bit rest."""

from __future__ import annotations

import torch

from lwq.method.saliency import top_mask
from lwq.quant.gptq import GPTQSettings, gptq_quantize
from lwq.quant.grid import GridSpec
from lwq.quant.lwc import LWCSettings, learn_clipping
from lwq.quant.rtn import rtn_quantize
from lwq.quant.types import QuantizedWeight

DEFAULT_GPTQ = GPTQSettings()


def quantize_at_ratio(
    W: torch.Tensor,
    H: torch.Tensor | None,
    order: torch.Tensor,
    ratio: float,
    lo: GridSpec,
    hi: GridSpec,
    gptq: GPTQSettings | None = DEFAULT_GPTQ,
    name: str = "layer",
    lwc: LWCSettings | None = None,
) -> QuantizedWeight:
    """The top ``ratio`` of ``order`` on the ``hi`` grid, the rest on ``lo``.

    One mixed-precision GPTQ pass when ``gptq`` is given (and H), else RTN. At
    ratio 0 the layer is a plain ``lo`` layer (no mask is stored). ``lwc``
    learns the high grid's clipping first (needs H and GPTQ).
    """
    shape = (int(W.shape[0]), int(W.shape[1]))
    mask = top_mask(order, shape, ratio) if ratio > 0 else None
    if mask is not None and not bool(mask.any()):
        mask = None
    if gptq is None or H is None:
        return rtn_quantize(W, lo) if mask is None else rtn_quantize(W, lo, mask, hi)
    if mask is None:
        return gptq_quantize(W, H, lo, gptq, name=name).weight
    hi_grid = None
    if lwc is not None and not hi.is_float:
        hi_grid = learn_clipping(W, H, mask, hi, lwc)
    return gptq_quantize(W, H, lo, gptq, mask=mask, hi=hi, name=name, hi_grid=hi_grid).weight
