"""Uniform integer grids per (row, group of input columns).

A grid of ``bits`` bits maps w to the code q = clamp(round(w / s) + z, 0, 2^b - 1)
and back to s * (q - z). A 16-bit "grid" is no grid: its weights are stored as
float16 values (the dense-and-sparse outliers of SqueezeLLM/SpQR); it serves
only as the high-impact grid of a masked layer. Scales are rounded to float16
when they are computed, because that is how the packed format stores them:
dequantising a packed checkpoint then gives exactly the weights that were
evaluated.

Groups are consecutive runs of ``group_size`` input columns; when the group
size does not divide d_in, the last group of each row is shorter (its scale
and zero are stored like any other). ``group_size = -1`` means one group per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lwq.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_BITS = 16  # float16 storage, for the high-impact weights only


@dataclass(frozen=True)
class GridSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS and self.bits != FLOAT_BITS:
            raise ConfigError(f"bits={self.bits} is not supported: choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(
                f"group_size={self.group_size}: use a positive number of input columns "
                "(64 or 128 are usual) or -1 for one group per row"
            )

    @property
    def is_float(self) -> bool:
        """Weights stored as float16 values, no scales or zeros."""
        return self.bits == FLOAT_BITS

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_len(self, d_in: int) -> int:
        return d_in if self.group_size == -1 else self.group_size

    def n_groups(self, d_in: int) -> int:
        g = self.group_len(d_in)
        return (d_in + g - 1) // g

    def group_index(self, d_in: int, device: torch.device | None = None) -> torch.Tensor:
        """g_idx: the group of each input column, (d_in,) long."""
        return torch.arange(d_in, device=device) // self.group_len(d_in)


# The clipping search of ``grid_params``: ranges shrunk to 1 - k / CLIP_STEPS of the
# min-max range, k < CLIP_STEPS * CLIP_MAX_SHRINK (GPTQ's reference search grid).
CLIP_STEPS = 100
CLIP_MAX_SHRINK = 0.8
# Elements of the (factors, d_out, g) temporaries of one step of that search.
CLIP_CHUNK_ELEMENTS = 1 << 20


def grid_params(
    w: torch.Tensor,
    spec: GridSpec,
    select: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of ``w`` (d_out, g) -> (d_out,), (d_out,).

    ``select`` (d_out, g) bool restricts the range to the selected weights (the
    two grids of a masked layer); a row with nothing selected gets scale 1,
    zero 0, which no weight uses. As in GPTQ, the range always contains 0.

    Without ``weight`` the range is min-max. With ``weight`` (g,), the importance
    of each column (the Hessian diagonal: the output error of a rounding error
    there), the range of each row is the min-max range shrunk by the factor
    that minimises the weighted squared rounding error of its (selected)
    weights: clipping a few extreme weights buys a finer step for the rest.
    """
    xmin, xmax = _range(w, spec, select)
    if weight is None:
        return _params(xmin, xmax, spec)
    wt = weight.to(w.dtype).clamp(min=0)[None, :].expand_as(w)
    if select is not None:
        wt = wt * select.to(w.dtype)
    # Every shrink factor at once (factor 1, min-max, first), in chunks that bound the
    # (factors, d_out, g) temporaries; the first factor of least error wins, as in
    # GPTQ's sequential search.
    factors = 1 - torch.arange(int(CLIP_STEPS * CLIP_MAX_SHRINK), dtype=w.dtype) / CLIP_STEPS
    chunks = factors.to(w.device).split(max(1, CLIP_CHUNK_ELEMENTS // max(1, w.numel())))
    rows = torch.arange(w.shape[0], device=w.device)

    def least(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's least error over the factors ``part``, with its scale and zero."""
        s, z = _params(part[:, None] * xmin, part[:, None] * xmax, spec)  # (k, d_out)
        s3, z3 = s[..., None], z[..., None]
        # dequantize(quantize(w)) - w, weighted and squared, in the codes' own buffer
        err = quantize(w, s3, z3, spec.maxq).sub_(z3).mul_(s3).sub_(w).square_().mul_(wt)
        e, k = err.sum(2).min(0)
        return e, s[k, rows], z[k, rows]

    best, scale, zero = least(chunks[0])
    for part in chunks[1:]:
        e, s, z = least(part)
        better = e < best
        best = torch.where(better, e, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _range(
    w: torch.Tensor, spec: GridSpec, select: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's [xmin, xmax]: its (selected) weights' range, widened to hold 0."""
    if select is None:
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
    else:
        inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
        lo = torch.where(select, w, inf).min(dim=1).values
        hi = torch.where(select, w, -inf).max(dim=1).values
        empty = ~select.any(dim=1)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
    xmin = lo.clamp(max=0.0)
    xmax = hi.clamp(min=0.0)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = xmax == xmin
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    return xmin, xmax


def _params(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the range [xmin, xmax]: a float16 scale and an integer zero."""
    scale = ((xmax - xmin) / spec.maxq).to(torch.float16).to(torch.float32)
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny)
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (same shape as w, float dtype) for broadcastable scale/zero: a new
    tensor, transformed in place (one allocation)."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
