"""Perplexity as in the GPTQ and AWQ papers.

The documents are joined, tokenised once, cut into non-overlapping windows of
the model's sequence length (the remainder is dropped), and the mean token
negative log-likelihood over all windows is exponentiated. Windows are fed a
few at a time so memory does not grow with the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lwq.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    n_windows: int
    n_tokens: int  # predicted tokens (seq_len - 1 per window)
    seq_len: int


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream, windows of ``seq_len``."""
    if input_ids.dim() != 1:
        raise ConfigError(f"input_ids must be 1-D token stream, got shape {tuple(input_ids.shape)}")
    n_windows = input_ids.numel() // seq_len
    if n_windows == 0:
        raise ConfigError(
            f"the evaluation text has {input_ids.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}: use a longer text or a smaller --seq-len"
        )
    windows = input_ids[: n_windows * seq_len].view(n_windows, seq_len)  # (W, T)
    device = next(model.parameters()).device
    total_nll = 0.0
    starts = range(0, n_windows, batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=batch).logits.float()  # (b, T, V)
        # Token t predicts token t+1; the last position predicts nothing.
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += float(nll)
    n_tokens = n_windows * (seq_len - 1)
    mean = total_nll / n_tokens
    return PerplexityResult(math.exp(mean), mean, n_windows, n_tokens, seq_len)


def perplexity_of_text(
    model: nn.Module,
    tokenizer: object,
    text: str,
    seq_len: int,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Tokenise ``text`` once (no special tokens) and evaluate it."""
    # verbose=False: a stream longer than the context is expected here.
    enc = tokenizer(  # type: ignore[operator]
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    ids = enc["input_ids"]
    return perplexity(model, torch.tensor(ids, dtype=torch.long), seq_len, batch_size, progress)


@torch.no_grad()
def text_perplexity(
    model: nn.Module, tokenizer: object, text: str, window: int
) -> PerplexityResult:
    """Perplexity of one text of any length (serving): windows of ``window`` tokens,
    the last one shorter; every token but each window's first is predicted."""
    enc = tokenizer(  # type: ignore[operator]
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise ConfigError(f"a text needs at least 2 tokens for a perplexity, got {ids.numel()}")
    device = next(model.parameters()).device
    total_nll, n_tokens = 0.0, 0
    chunks = [c for c in ids.split(window) if c.numel() >= 2]  # (T,) each, T <= window
    for chunk in chunks:
        batch = chunk[None].to(device)  # (1, T)
        logits = model(input_ids=batch).logits.float()  # (1, T, V)
        total_nll += float(
            nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
        )
        n_tokens += chunk.numel() - 1
    mean = total_nll / n_tokens
    return PerplexityResult(math.exp(mean), mean, len(chunks), n_tokens, window)
