"""Perplexity protocol on hand-made models with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lwq.errors import ConfigError
from lwq.eval.perplexity import perplexity


class UniformLM(nn.Module):
    """Constant logits: every token has probability 1/V, so perplexity is V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, t, self.vocab) + self.dummy)


class CopyNextLM(nn.Module):
    """Knows the stream: puts all mass on the true next token (perplexity 1)."""

    def __init__(self, stream: torch.Tensor, vocab: int, seq_len: int) -> None:
        super().__init__()
        self.stream, self.vocab, self.seq_len = stream, vocab, seq_len
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.calls.append(input_ids)
        nxt = torch.roll(input_ids, -1, dims=1)
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).float() * 100.0)


def test_uniform_model_has_perplexity_vocab() -> None:
    ids = torch.randint(0, 50, (1000,))
    res = perplexity(UniformLM(50), ids, seq_len=64, batch_size=3)
    assert res.n_windows == 1000 // 64
    assert res.n_tokens == res.n_windows * 63  # remainder dropped, last position unused
    assert res.perplexity == pytest.approx(50.0, rel=1e-6)
    assert res.nll == pytest.approx(math.log(50.0), rel=1e-6)


def test_windows_are_non_overlapping_and_in_order() -> None:
    ids = torch.arange(100) % 17
    model = CopyNextLM(ids, 17, 10)
    res = perplexity(model, ids, seq_len=10, batch_size=4)
    assert res.perplexity == pytest.approx(1.0, abs=1e-6)
    seen = torch.cat(model.calls).flatten()
    assert torch.equal(seen, ids[:100])


def test_too_short_text_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="seq-len"):
        perplexity(UniformLM(5), torch.zeros(10, dtype=torch.long), seq_len=64)
