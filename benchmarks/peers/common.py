"""What the peer scripts and the method benchmark share: GPT-2 conversion and evaluation.

Runs in either environment (lwq is imported from the repository). The
evaluation is lwq's perplexity protocol on the validation slice and WikiText-2
test, and the KL divergence to the full-precision model on held-out windows,
so every row of every table is measured by the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "zoo"
VALIDATION = ZOO / "data" / "validation.txt"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
HELDOUT_WINDOWS = 64


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers Conv1D (y = x W + b, W (d_in, d_out)) by nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    count = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            d_in, d_out = mod.weight.shape
            lin = nn.Linear(d_in, d_out)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, lin)
            count += 1
    return count


def heldout_windows(tok: Any, seq_len: int, n: int = HELDOUT_WINDOWS) -> torch.Tensor:
    """The first ``n`` windows of the validation slice (disjoint from calibration)."""
    from lwq.textio import read_text

    ids = tok(read_text(VALIDATION), return_tensors="pt").input_ids[0]
    n = min(n, ids.numel() // seq_len)
    return ids[: n * seq_len].view(n, seq_len)


def evaluate(model: Any, tok: Any, seq_len: int, fp_model: Any = None) -> dict[str, float]:
    """Perplexities (validation, WikiText-2 when present) and, with ``fp_model``, KL/CE."""
    from lwq.eval.divergence import output_divergence
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.textio import read_text

    out = {
        "ppl_validation": perplexity_of_text(
            model, tok, read_text(VALIDATION), seq_len, batch_size=8
        ).perplexity
    }
    if WIKITEXT.is_file():
        out["ppl_wikitext2"] = perplexity_of_text(
            model, tok, read_text(WIKITEXT), seq_len, batch_size=8
        ).perplexity
    if fp_model is not None:
        div = output_divergence(fp_model, model, heldout_windows(tok, seq_len))
        out["kl"], out["ce_increase"] = div.kl, div.ce_increase
    return out


def evaluate_real(model: Any, tok: Any, full: bool) -> dict[str, float]:
    """The real-model protocol of benchmarks/real.py (WikiText-2 quarter, and full)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from realmodel import perplexity, quarter_ids, wikitext_ids

    out = {"ppl_quarter": perplexity(model, quarter_ids(tok))}
    if full:
        out["ppl_full"] = perplexity(model, wikitext_ids(tok))
    return out
