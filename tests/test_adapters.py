"""Adapters on tiny random models of every family and on the zoo models."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from conftest import ZOO, ZOO_MODELS
from tiny_models import TINY_TYPES, tiny_model
from torch import nn

from lwq.adapters import adapter_for, discover
from lwq.errors import ConfigError
from lwq.models import load_model_dir


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_adapter_finds_every_linear_of_every_block(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    layers = dict(adapter.iter_layers(model))
    assert list(layers) == adapter.layer_names(model)
    per_block = len(adapter.block_linears(adapter.get_blocks(model)[0]))
    assert per_block >= 2 and len(layers) == len(adapter.get_blocks(model)) * per_block
    if adapter.input_groups:  # a declared family: discovery finds the same layers
        found = discover(model)
        assert found.blocks == adapter.blocks and found.final_norm == adapter.final_norm
        assert set(found.block_linears(found.get_blocks(model)[0])) == set(adapter.linears)
    # Every 2-D weight inside the blocks is covered: nothing quantizable is missed.
    blocks = adapter.get_blocks(model)
    covered = {id(m.weight) for m in layers.values()}
    for name, p in blocks.named_parameters():
        if p.dim() == 2:
            assert id(p) in covered, name


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_weight_round_trip_and_effect(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = torch.randint(0, 96, (1, 16))
    before = model(input_ids=ids).logits
    _, mod = next(adapter.iter_layers(model))
    w = adapter.read_weight(mod)
    assert w.shape == adapter.shape(mod)
    adapter.write_weight(mod, w)
    assert torch.equal(model(input_ids=ids).logits, before)
    # A (d_out, d_in) write must act on the layer's *input* dimension: zeroing
    # input column 0 must equal zeroing that feature of the layer's input.
    w0 = w.clone()
    w0[:, 0] = 0
    adapter.write_weight(mod, w0)
    x = torch.randn(3, w.shape[1])
    weight = cast(torch.Tensor, mod.weight)
    bias = cast("torch.Tensor | None", getattr(mod, "bias", None))
    bias_or_zero = bias if bias is not None else torch.zeros(())
    y = x @ weight + bias_or_zero if adapter.transposed else nn.functional.linear(x, weight, bias)
    x0 = x.clone()
    x0[:, 0] = 0
    torch.testing.assert_close(y, x0 @ w.t() + bias_or_zero)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_models_have_adapters(name: str) -> None:
    model, _ = load_model_dir(ZOO / name)
    adapter = adapter_for(model.config.model_type)
    shapes = [adapter.shape(m) for _, m in adapter.iter_layers(model)]
    assert len(shapes) == 6 * len(adapter.linears)
    assert all(d_in % 128 == 0 for _, d_in in shapes)


def test_a_model_without_decoder_blocks_names_what_was_searched() -> None:
    with pytest.raises(ConfigError, match=r"'bert' has no declared adapter.*gpt2.*llama.*opt"):
        adapter_for("bert")

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "flat"})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"'flat': no decoder blocks found \(searched every"):
        adapter_for(Flat())

    class NoNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "nonorm"})()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    with pytest.raises(ConfigError, match=r"blocks at layers but no final norm .*searched norm"):
        adapter_for(NoNorm())


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_head_after_blocks_reproduces_the_logits(model_type: str) -> None:
    from lwq.stats import InMemoryCausalLM, capture_block_inputs, run_block

    model = tiny_model(model_type)
    adapter = adapter_for(model)
    ids = torch.randint(0, 96, (2, 12))
    inputs = capture_block_inputs(InMemoryCausalLM(model, adapter), [ids])
    for i, block in enumerate(adapter.get_blocks(model)):
        inputs.hidden = run_block(block, inputs, i)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.head(model, inputs.hidden[0]), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
