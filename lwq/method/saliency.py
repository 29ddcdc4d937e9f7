"""Which weights are high-impact: saliency scores and top-r masks.

Scores of weight (j, k) of a layer with weight W (d_out, d_in) and input
Hessian H (d_in, d_in):

- ``obs`` (default; OBS/SpQR): w_jk^2 / [H^-1]_kk, the loss increase of
  removing the weight with the other weights re-fitted;
- ``act`` (Wanda/AWQ): |w_jk| * ||x_k||, with ||x_k|| = sqrt(N H_kk / 2);
- ``fisher`` (SqueezeLLM): g_jk^2, the diagonal of the Fisher information,
  from gradients accumulated over the calibration set (``fisher`` argument).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lwq.errors import ConfigError
from lwq.quant.gptq import inverse_hessian_cholesky

Scoring = Literal["obs", "act", "fisher"]


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


def ranking(scores: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
    """Flat indices (row-major) of the weights from most to least salient.

    With ``keep`` < 1 only the top ``n_protected(n, keep)`` are returned, as
    int32: a state keeps the top r_max of every layer (4 bytes per protected
    weight at most, instead of 8 per weight).
    """
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    if keep >= 1.0:
        return order
    return order[: n_protected(order.numel(), keep)].to(torch.int32)


def top_mask(order: torch.Tensor, shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """The mask of the top ceil(r * n) weights of a ``ranking``: (d_out, d_in) bool."""
    n = shape[0] * shape[1]
    k = n_protected(n, ratio)
    if k > order.numel():
        raise ValueError(
            f"ratio {ratio} needs {k} ranked weights, the ranking holds {order.numel()}"
        )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k].long()] = True
    return mask.view(shape)
