"""How far a quantized model's next-token distribution is from the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Divergence:
    kl: float  # mean KL(p_ref || p_model) per token position, nats
    ce_ref: float  # mean next-token cross-entropy of the reference, nats
    ce_model: float
    n_tokens: int

    @property
    def ce_increase(self) -> float:
        return self.ce_model - self.ce_ref


@torch.no_grad()
def output_divergence(
    ref: nn.Module, model: nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> Divergence:
    """KL and cross-entropies over token ``windows`` (n, T)."""
    kl = ce_r = ce_m = 0.0
    n_kl = n_ce = 0
    for batch in windows.split(batch_size):
        lr = torch.log_softmax(ref(input_ids=batch).logits.float(), dim=-1)  # (b, T, V)
        lm = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
        kl += float((lr.exp() * (lr - lm)).sum())
        n_kl += batch.shape[0] * batch.shape[1]
        target = batch[:, 1:]  # token t predicts token t + 1
        ce_r -= float(lr[:, :-1].gather(-1, target[..., None]).sum())
        ce_m -= float(lm[:, :-1].gather(-1, target[..., None]).sum())
        n_ce += target.numel()
    return Divergence(kl / n_kl, ce_r / n_ce, ce_m / n_ce, n_kl)
