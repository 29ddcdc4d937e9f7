"""The Fisher diagonal: shapes per family, agreement with autograd, and its errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import ZOO
from tiny_models import tiny_model
from transformers import AutoTokenizer

from lwq.adapters import adapter_for
from lwq.calibration import build_calibration_set
from lwq.errors import NumericalError
from lwq.method.fisher import fisher_diagonal


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fisher_matches_per_sequence_gradients(
    family: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model(family, vocab=4096).eval()
    adapter = adapter_for(model.config.model_type)
    tok = AutoTokenizer.from_pretrained(ZOO / "llama-6l-128d")
    calib = build_calibration_set(tok, ZOO / "data" / "calibration.txt", 3, 16, seed=0)
    before = [p.requires_grad for p in model.parameters()]
    with caplog.at_level(logging.WARNING):
        fisher = fisher_diagonal(model, adapter, calib, progress=False)
    assert [p.requires_grad for p in model.parameters()] == before
    assert "only 3 calibration sequences (48 tokens)" in caplog.text
    modules = dict(adapter.iter_layers(model))
    assert set(fisher) == set(modules)
    name = next(iter(modules))
    assert fisher[name].shape == adapter.shape(modules[name])
    # By hand for one layer: sum over sequences of the squared gradient.
    w = modules[name].weight
    assert isinstance(w, torch.Tensor)
    expect = torch.zeros_like(w)
    for seq in calib.input_ids:
        model.zero_grad()
        w.requires_grad_(True)
        model(input_ids=seq[None], labels=seq[None]).loss.backward()
        assert w.grad is not None
        expect += w.grad.square()
    expect = expect.T if adapter.transposed else expect
    torch.testing.assert_close(fisher[name], expect, rtol=1e-4, atol=1e-10)


def test_nan_gradient_names_the_layer() -> None:
    model = tiny_model("llama", vocab=4096).eval()
    adapter = adapter_for("llama")
    name, mod = next(iter(adapter.iter_layers(model)))
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    with torch.no_grad():
        w[0, 0] = float("nan")
    tok = AutoTokenizer.from_pretrained(ZOO / "llama-6l-128d")
    calib = build_calibration_set(tok, ZOO / "data" / "calibration.txt", 1, 8, seed=0)
    with pytest.raises(NumericalError, match=rf"{re.escape(name)}: NaN or inf in the gradient"):
        fisher_diagonal(model, adapter, calib, progress=False)
