"""Learnable weight clipping of the high-impact grid (OmniQuant's LWC, Shao et al. 2024).

The "advanced" quantizer of docs/method.md ("Quantization of one layer"),
spent on the high-impact weights only: each (row, group) of the high grid gets
two clipping factors, sigmoid(gamma) for the top of its min-max range and
sigmoid(beta) for the bottom, learned by Adam to minimise the output error the
masked weights cause on the layer's calibration inputs,

    sum_g tr(dW_g H_gg dW_g^T),   dW = mask * (W - Q_hi(W)),

with straight-through rounding. H_gg is the group's diagonal block of the input
Hessian: clipping a group changes only that group's weights, and the block
keeps a step at O(d_out * d_in * g) instead of O(d_out * d_in^2). Factors
start at sigmoid(4) = 0.982, so the result starts next to the min-max grid; the
best grid seen during training is returned, and the min-max grid when no step
improves on it, so LWC never does worse on its own objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lwq.quant.grid import GridSpec, grid_params


@dataclass(frozen=True)
class LWCSettings:
    steps: int = 200
    lr: float = 2e-2
    init: float = 4.0  # initial logit of the clipping factors


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grouped(x: torch.Tensor, g: int, n_groups: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, n_groups, g), zero-padding a short last group."""
    d_out, d_in = x.shape
    x = torch.nn.functional.pad(x, (0, n_groups * g - d_in))
    return x.view(d_out, n_groups, g)


def learn_clipping(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    hi: GridSpec,
    settings: LWCSettings = LWCSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (d_out, n_groups) of the high grid with learned clipping."""
    assert not hi.is_float, "a float16 high grid has no range to clip"
    W = W.to(torch.float32)
    d_in = W.shape[1]
    g, n_groups = hi.group_len(d_in), hi.n_groups(d_in)
    Wg = _grouped(W, g, n_groups)  # (d_out, G, g)
    Mg = _grouped(mask.to(torch.float32), g, n_groups)
    Hp = torch.nn.functional.pad(H.to(torch.float32), (0, n_groups * g - d_in) * 2)
    Hg = torch.stack([Hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n_groups)])
    inf = torch.tensor(float("inf"))
    sel = Mg > 0
    xmax = torch.where(sel, Wg, -inf).amax(dim=2).clamp(min=0.0)  # (d_out, G)
    xmin = torch.where(sel, Wg, inf).amin(dim=2).clamp(max=0.0)
    live = sel.any(dim=2)
    xmax = torch.where(live, xmax, torch.zeros_like(xmax))
    xmin = torch.where(live, xmin, torch.zeros_like(xmin))

    def params(gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = torch.sigmoid(gamma) * xmax
        bot = torch.sigmoid(beta) * xmin
        if hi.symmetric:
            top = torch.maximum(top, -bot)
            bot = -top
        scale = ((top - bot) / hi.maxq).clamp(min=torch.finfo(torch.float16).tiny)
        zero = (
            torch.full_like(scale, (hi.maxq + 1) // 2)
            if hi.symmetric
            else _round_ste(-bot / scale).clamp(0, hi.maxq)
        )
        return scale, zero

    def loss_of(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(_round_ste(Wg / scale[..., None]) + zero[..., None], 0, hi.maxq)
        dW = Mg * (Wg - scale[..., None] * (q - zero[..., None]))  # (d_out, G, g)
        return torch.einsum("ogi,gij,ogj->", dW, Hg, dW)

    base_s, base_z = grid_params_masked(W, hi, mask)
    with torch.no_grad():
        best = float(loss_of(base_s, base_z))
    best_s, best_z = base_s, base_z
    gamma = torch.full_like(xmax, settings.init, requires_grad=True)
    beta = torch.full_like(xmin, settings.init, requires_grad=True)
    opt = torch.optim.Adam([gamma, beta], lr=settings.lr)
    for _ in range(settings.steps):
        opt.zero_grad()
        scale, zero = params(gamma, beta)
        # Scales are stored as float16: train with what will be stored.
        scale = scale + (scale.half().float() - scale).detach()
        loss = loss_of(scale, zero)
        if float(loss.detach()) < best:
            best = float(loss.detach())
            best_s, best_z = scale.detach().clone(), zero.detach().clone()
        loss.backward()
        opt.step()
    empty = ~live
    best_s = torch.where(empty, torch.ones_like(best_s), best_s)
    best_z = torch.where(empty, torch.zeros_like(best_z), best_z)
    return best_s, best_z


def grid_params_masked(
    W: torch.Tensor, hi: GridSpec, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max high grid of every (row, group), as GPTQ's static groups fit it."""
    d_in = W.shape[1]
    g = hi.group_len(d_in)
    cols = [grid_params(W[:, c : c + g], hi, mask[:, c : c + g]) for c in range(0, d_in, g)]
    return torch.stack([s for s, _ in cols], dim=1), torch.stack([z for _, z in cols], dim=1)
