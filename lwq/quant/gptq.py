"""GPTQ (Frantar et al., 2023), with an optional second grid for masked weights.

Columns are quantized left to right; the rounding error of column j is spread
over the columns not yet quantized through the inverse Hessian (Alg. 1 of the
paper), in blocks of ``block_size`` columns whose updates to the rest of the
matrix are applied lazily (Sec. 3, "lazy batch-updates"), with Hinv taken as
the upper Cholesky factor of H^-1 (Sec. 3, "Cholesky reformulation").

With a ``mask`` and a ``hi`` grid (the method of arXiv:2511.17801), each weight
is rounded on the grid its mask assigns: one pass, one error feedback, two
grids per group, each fitted to the weights it serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lwq.errors import NumericalError
from lwq.quant.grid import GridSpec, dequantize, grid_params, quantize
from lwq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQSettings:
    block_size: int = 128
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool = False  # columns by decreasing diag(H); groups then fixed up front
    # Fit every group's grid on the original weights before any update (always
    # so with act_order). Off: a group's grid is fitted when GPTQ reaches it, on
    # weights that already carry the earlier columns' error, as in the paper.
    static_groups: bool = False
    # Each group's range: "minmax", or "mse": shrunk to minimise the rounding error
    # weighted by the Hessian diagonal (grid_params with weights).
    clip: str = "minmax"


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    # GPTQ's proxy loss sum_j (w_j - q_j)^2 / (2 [Hinv]_jj^2), summed over rows.
    loss: float


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1.

    If H is not positive definite at the requested dampening, retry at 10x
    and 100x (with a warning) before giving up with an error naming the layer.
    """
    mean_diag = float(H.diagonal().mean())
    for attempt in range(3):
        d = damp * 10**attempt
        # One (d_in, d_in) working copy at a time: for a 5632-wide MLP input each
        # is 127 MB, so intermediates are dropped as soon as they are used.
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info2) == 0:
                if attempt:
                    log.warning("%s: Hessian needed dampening %.3g to invert", name, d)
                return U
    raise NumericalError(
        f"{name}: the input Hessian is not positive definite even with dampening "
        f"{damp * 100:.3g}; raise gptq.damp or use more calibration samples"
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: GridSpec,
    settings: GPTQSettings = GPTQSettings(),
    mask: torch.Tensor | None = None,
    hi: GridSpec | None = None,
    name: str = "layer",
    hi_grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    column_order: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``W`` (d_out, d_in) given its input Hessian ``H`` (d_in, d_in).

    ``hi_grid`` fixes the high grid's (scales, zeros), each (d_out, n_groups),
    e.g. from learned clipping (``lwq.quant.lwc``); by default it is min-max.
    ``column_order`` is the order in which the columns are quantized (a
    permutation of range(d_in); it overrides ``settings.act_order``); the
    grids are then fitted up front, as with act_order.
    """
    assert W.dim() == 2 and H.shape == (W.shape[1], W.shape[1]), (W.shape, H.shape)
    assert (mask is None) == (hi is None), "mask and hi grid go together"
    if hi is not None:
        assert hi.group_size == spec.group_size, "both grids share the group layout"
    if not torch.isfinite(H).all() or not torch.isfinite(W).all():
        raise NumericalError(f"{name}: NaN or inf in the weight or its input Hessian")
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    d_out, d_in = W.shape
    g = spec.group_len(d_in)
    n_groups = spec.n_groups(d_in)

    # Inputs that never fire carry no information: fix their weights at 0.
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(d_out, n_groups, device=W.device)
    zeros = torch.zeros_like(scales)
    grid_hi = hi is not None and not hi.is_float
    hi_scales = torch.zeros_like(scales) if grid_hi else None
    hi_zeros = torch.zeros_like(scales) if grid_hi else None
    hi_values = torch.zeros_like(W) if hi is not None and hi.is_float else None

    hdiag = H.diagonal().clone() if settings.clip == "mse" else None

    def fit_group(grp: int, w: torch.Tensor, m: torch.Tensor | None) -> None:
        # w holds the group's columns in their own order, as does hdiag[sl]
        wt = None if hdiag is None else hdiag[grp * g : grp * g + w.shape[1]]
        scales[:, grp], zeros[:, grp] = grid_params(w, spec, None if m is None else ~m, wt)
        if hi is not None and hi_scales is not None and hi_zeros is not None:
            if hi_grid is not None:
                hi_scales[:, grp], hi_zeros[:, grp] = hi_grid[0][:, grp], hi_grid[1][:, grp]
            else:
                hi_scales[:, grp], hi_zeros[:, grp] = grid_params(w, hi, m, wt)

    static = settings.static_groups or settings.act_order or column_order is not None
    if static:
        # With columns out of order a group's weights are not contiguous in
        # time, so its grid is fitted once, before any update.
        for grp in range(n_groups):
            sl = slice(grp * g, (grp + 1) * g)
            fit_group(grp, W[:, sl], None if mask is None else mask[:, sl])
    perm: torch.Tensor | None = None
    if column_order is not None:
        assert torch.equal(torch.sort(column_order).values, torch.arange(d_in)), "a permutation"
        perm = column_order.to(W.device)
    elif settings.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    m_all = None if mask is None else (mask[:, perm] if perm is not None else mask)
    order = perm if perm is not None else torch.arange(d_in, device=W.device)
    group_of = order // g  # group of the column at each (permuted) position

    Hinv = inverse_hessian_cholesky(H, settings.damp, name)  # (d_in, d_in), upper
    del H  # our copy; only Hinv is used from here on
    # Group starts must coincide with block starts or lie inside one block, so
    # a group's grid is fitted on weights that already carry all earlier updates.
    B = settings.block_size
    B = (B // g) * g if g <= B else (B if g % B == 0 else g)

    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(d_out, device=W.device)
    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        W1 = W[:, i1:i2].clone()  # (d_out, b) the block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(group_of[col])
            if not static and col % g == 0:
                if i + g <= i2 - i1:  # the group lies inside this block
                    ahead = W1[:, i : i + g]
                else:  # it starts this block and runs past it (g > block size)
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                fit_group(grp, ahead, None if m_all is None else m_all[:, col : col + g])
            w = W1[:, i]  # (d_out,)
            s, z = scales[:, grp], zeros[:, grp]
            q = quantize(w, s, z, spec.maxq)
            deq = dequantize(q, s, z)
            if m_all is not None and hi_values is not None:  # float16 outliers
                m = m_all[:, col]
                w16 = w.to(torch.float16).to(torch.float32)
                q = torch.where(m, torch.zeros_like(q), q)
                deq = torch.where(m, w16, deq)
                hi_values[:, order[col]] = torch.where(m, w16, torch.zeros_like(w16))
            elif m_all is not None and hi is not None:
                assert hi_scales is not None and hi_zeros is not None
                m = m_all[:, col]
                qh = quantize(w, hi_scales[:, grp], hi_zeros[:, grp], hi.maxq)
                q = torch.where(m, qh, q)
                deq = torch.where(m, dequantize(qh, hi_scales[:, grp], hi_zeros[:, grp]), deq)
            codes[:, col] = q.to(torch.uint8)
            d = Hinv1[i, i]
            err = (w - deq) / d  # (d_out,)
            losses += err.square() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    weight = QuantizedWeight(
        lo=spec,
        codes=codes,
        scales=scales,
        zeros=zeros,
        hi=hi,
        mask=mask,
        hi_scales=hi_scales,
        hi_zeros=hi_zeros,
        hi_values=hi_values,
    )
    return GPTQResult(weight, float(losses.sum()))
