"""Which weights are high-impact: saliency scores and top-r masks.

Scores of weight (j, k) of a layer with weight W (d_out, d_in) and input
Hessian H (d_in, d_in):

- ``obs`` (default; OBS/SpQR): w_jk^2 / [H^-1]_kk, the loss increase of
  removing the weight with the other weights re-fitted;
- ``act`` (Wanda/AWQ): |w_jk| * ||x_k||, with ||x_k|| = sqrt(N H_kk / 2);
- ``fisher`` (SqueezeLLM): g_jk^2, the diagonal of the Fisher information,
  from gradients accumulated over the calibration set (``fisher`` argument).

The high-impact set is made of single weights (``structure="weights"``: the
top weights by score, wherever they are) or of whole input columns
(``"columns"``: the columns with the largest summed score, every weight of a
chosen column on the high grid). A ratio r protects ceil(r n) of the layer's
units, so r stays the fraction of its weights either way. Columns cost one
bit per column to locate instead of about log2(1/r) + 2 bits per weight
(docs/method.md, "The high-impact set's structure").
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lwq.errors import ConfigError
from lwq.quant.gptq import inverse_hessian_cholesky

Scoring = Literal["obs", "act", "fisher"]
Structure = Literal["weights", "columns"]


def saliency(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scoring: Scoring = "obs",
    fisher: torch.Tensor | None = None,
    damp: float = 0.01,
    name: str = "layer",
) -> torch.Tensor:
    """Score of every weight, (d_out, d_in) float32; larger means more important."""
    W = W.to(torch.float32)
    if scoring == "fisher":
        if fisher is None:
            raise ConfigError("method.scoring=fisher needs the Fisher diagonal (gradients)")
        assert fisher.shape == W.shape
        return fisher.to(torch.float32)
    if H is None:
        raise ConfigError(f"method.scoring={scoring} needs the layer's input Hessian")
    if scoring == "act":
        return W.abs() * H.diagonal().clamp(min=0).sqrt()[None, :]
    if scoring == "obs":
        U = inverse_hessian_cholesky(H.to(torch.float32), damp, name)  # H^-1 = U^T U
        hinv_diag = U.square().sum(dim=0)  # (d_in,) diag of U^T U
        return W.square() / hinv_diag[None, :]
    raise ConfigError(f"method.scoring={scoring!r}: choose obs, act or fisher")


def n_protected(n: int, ratio: float) -> int:
    """How many weights a ratio protects: ceil(r * n), as the cost model counts."""
    return min(n, math.ceil(ratio * n - 1e-9)) if ratio > 0 else 0


def n_units(shape: tuple[int, int], structure: Structure = "weights") -> int:
    """How many units a ranking of a (d_out, d_in) layer orders: weights or columns."""
    return shape[1] if structure == "columns" else shape[0] * shape[1]


def ranking(
    scores: torch.Tensor, keep: float = 1.0, structure: Structure = "weights"
) -> torch.Tensor:
    """Indices of the units (flat row-major weights, or columns) from most to least salient.

    A column's score is the sum of its weights' scores. With ``keep`` < 1 only
    the top ``n_protected(units, keep)`` are returned, as int32: a state keeps
    the top r_max of every layer (4 bytes per protected unit at most, instead
    of 8 per unit).
    """
    flat = scores.sum(dim=0) if structure == "columns" else scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    if keep >= 1.0:
        return order
    return order[: n_protected(order.numel(), keep)].to(torch.int32)


def top_mask(
    order: torch.Tensor, shape: tuple[int, int], ratio: float, structure: Structure = "weights"
) -> torch.Tensor:
    """The mask of the top ceil(r * units) units of a ``ranking``: (d_out, d_in) bool."""
    n = n_units(shape, structure)
    k = n_protected(n, ratio)
    if k > order.numel():
        raise ValueError(
            f"ratio {ratio} needs {k} ranked {structure}, the ranking holds {order.numel()}"
        )
    if structure == "columns":
        cols = torch.zeros(n, dtype=torch.bool)
        cols[order[:k].long()] = True
        return cols[None, :].expand(shape).contiguous()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k].long()] = True
    return mask.view(shape)
