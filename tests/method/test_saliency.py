"""Saliency scores on hand-built cases, and top-r masks."""

from __future__ import annotations

import pytest
import torch

from lwq.errors import ConfigError
from lwq.method.saliency import n_protected, ranking, saliency, top_mask


def test_obs_with_diagonal_hessian_is_w2_times_h() -> None:
    W = torch.randn(4, 6)
    d = torch.rand(6) + 0.5
    s = saliency(W, torch.diag(d), "obs", damp=1e-9)
    torch.testing.assert_close(s, W.square() * d[None, :], rtol=1e-4, atol=1e-6)


def test_obs_sees_correlated_inputs() -> None:
    # Two perfectly redundant inputs: removing one weight costs little because
    # the other can take over, so OBS ranks them below an independent input.
    H = torch.tensor([[2.0, 1.99, 0.0], [1.99, 2.0, 0.0], [0.0, 0.0, 2.0]])
    s = saliency(torch.ones(1, 3), H, "obs")
    assert s[0, 2] > 10 * s[0, 0]


def test_act_and_fisher() -> None:
    W = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    H = torch.diag(torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(saliency(W, H, "act"), torch.tensor([[2.0, 2.0], [1.0, 0.0]]))
    g2 = torch.rand(2, 2)
    assert torch.equal(saliency(W, None, "fisher", fisher=g2), g2)
    with pytest.raises(ConfigError, match="fisher"):
        saliency(W, H, "fisher")


def test_top_mask_counts_ceil_r_n() -> None:
    s = torch.arange(100.0).view(10, 10)
    order = ranking(s)
    mask = top_mask(order, (10, 10), 0.055)
    assert int(mask.sum()) == n_protected(100, 0.055) == 6
    assert mask.view(-1)[-6:].all()
    assert int(top_mask(order, (10, 10), 0.0).sum()) == 0
