"""Round-to-nearest: each group on its own min-max grid, no error feedback."""

from __future__ import annotations

import torch

from lwq.quant.grid import GridSpec, grid_params, quantize
from lwq.quant.types import QuantizedWeight


def rtn_quantize(
    W: torch.Tensor,
    spec: GridSpec,
    mask: torch.Tensor | None = None,
    hi: GridSpec | None = None,
) -> QuantizedWeight:
    """Quantize ``W`` (d_out, d_in); with ``mask``, masked weights use the ``hi`` grid."""
    assert W.dim() == 2, W.shape
    assert (mask is None) == (hi is None), "mask and hi grid go together"
    W = W.to(torch.float32)
    d_out, d_in = W.shape
    g = spec.group_len(d_in)
    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    hi_scales: list[torch.Tensor] = []
    hi_zeros: list[torch.Tensor] = []
    hi_values = None
    if mask is not None and hi is not None and hi.is_float:
        hi_values = torch.where(mask, W.to(torch.float16).to(torch.float32), 0.0)
    for c in range(0, d_in, g):
        w = W[:, c : c + g]  # (d_out, g)
        m = None if mask is None else mask[:, c : c + g]
        s, z = grid_params(w, spec, None if m is None else ~m)
        q = quantize(w, s[:, None], z[:, None], spec.maxq)
        scales.append(s)
        zeros.append(z)
        if m is not None and hi_values is not None:
            q = torch.where(m, torch.zeros_like(q), q)
        elif m is not None and hi is not None:
            assert hi.group_size == spec.group_size, "both grids share the group layout"
            sh, zh = grid_params(w, hi, m)
            q = torch.where(m, quantize(w, sh[:, None], zh[:, None], hi.maxq), q)
            hi_scales.append(sh)
            hi_zeros.append(zh)
        codes[:, c : c + g] = q.to(torch.uint8)
    return QuantizedWeight(
        lo=spec,
        codes=codes,
        scales=torch.stack(scales, dim=1),
        zeros=torch.stack(zeros, dim=1),
        hi=hi,
        mask=mask,
        hi_scales=torch.stack(hi_scales, dim=1) if hi_scales else None,
        hi_zeros=torch.stack(hi_zeros, dim=1) if hi_zeros else None,
        hi_values=hi_values,
    )
