"""Learnable clipping of the high-impact grid."""

from __future__ import annotations

import pytest
import torch

from lwq.method.layer import job_at_ratio
from lwq.method.saliency import ranking, saliency
from lwq.quant.gptq import GPTQSettings
from lwq.quant.grid import GridSpec
from lwq.quant.layer import quantize_layer
from lwq.quant.lwc import LWCSettings, grid_params_masked, learn_clipping


def _masked_error(
    W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, hi: GridSpec, s: torch.Tensor,
    z: torch.Tensor,
) -> float:  # fmt: skip
    g = hi.group_index(W.shape[1])
    q = torch.clamp(torch.round(W / s[:, g]) + z[:, g], 0, hi.maxq)
    dW = mask * (W - s[:, g] * (q - z[:, g]))
    return float(((dW @ H) * dW).sum())


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 96, generator=gen)
    W[torch.rand(32, 96, generator=gen) < 0.02] *= 8  # heavy tails: clipping pays
    X = torch.randn(512, 96, generator=gen) * (torch.rand(96, generator=gen) + 0.5)
    H = 2 * X.T @ X / X.shape[0]
    mask = torch.rand(32, 96, generator=gen) < 0.3
    return W, H, mask


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_clipping_never_worse_than_min_max(symmetric: bool) -> None:
    W, H, mask = _problem()
    hi = GridSpec(3, 32, symmetric)
    s0, z0 = grid_params_masked(W, hi, mask)
    s1, z1 = learn_clipping(W, H, mask, hi, LWCSettings(steps=100))
    assert s1.shape == s0.shape == (32, 3)
    base = _masked_error(W, H, mask, hi, s0, z0)
    learned = _masked_error(W, H, mask, hi, s1, z1)
    assert learned <= base
    assert torch.equal(s1.half().float(), s1)  # storable as float16


def test_learned_clipping_gains_on_gaussian_groups() -> None:
    """Min-max wastes a 2-bit grid's levels on the tails of a Gaussian group."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 96, generator=gen)
    X = torch.randn(512, 96, generator=gen) * (torch.rand(96, generator=gen) + 0.5)
    H = 2 * X.T @ X / X.shape[0]
    mask = torch.rand(32, 96, generator=gen) < 0.5
    hi = GridSpec(2, -1)
    base = _masked_error(W, H, mask, hi, *grid_params_masked(W, hi, mask))
    learned = _masked_error(W, H, mask, hi, *learn_clipping(W, H, mask, hi))
    assert learned < 0.85 * base


def test_layer_with_lwc_keeps_the_bytes_and_mask() -> None:
    W, H, _ = _problem(1)
    order = ranking(saliency(W, H, "obs"))
    lo, hi = GridSpec(2, 32), GridSpec(4, 32)
    job = job_at_ratio("l", order, (int(W.shape[0]), int(W.shape[1])), 0.1, lo, hi)
    plain = quantize_layer(W, H, job, GPTQSettings()).weight
    lwc = quantize_layer(W, H, job, GPTQSettings(), LWCSettings(steps=50)).weight
    assert plain.mask is not None and lwc.mask is not None
    assert torch.equal(plain.mask, lwc.mask)
    assert plain.hi_scales is not None and lwc.hi_scales is not None
    assert not torch.equal(plain.hi_scales, lwc.hi_scales)
    assert torch.isfinite(lwc.dequantize()).all()
