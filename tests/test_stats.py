"""Hessians from the block-by-block driver equal those of a plain full forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import TINY_TYPES, VOCAB, tiny_model

from lwq.adapters import adapter_for
from lwq.calibration import CalibrationSet, tokens_sha256
from lwq.loading import LazyCausalLM
from lwq.stats import (
    HessianHooks,
    InMemoryCausalLM,
    NumericalError,
    accumulate_hessian,
    iter_block_stats,
)


def _calib(n: int = 6, t: int = 16, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "random", seed, tokens_sha256(ids))


def _reference_hessians(model: Any, calib: CalibrationSet) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    layers = dict(adapter.iter_layers(model))
    with HessianHooks(layers) as hooks, torch.no_grad():
        model(input_ids=calib.input_ids, use_cache=False)
    return {k: s.H for k, s in hooks.result().items()}


def test_accumulate_hessian_matches_closed_form() -> None:
    x = torch.randn(50, 8, dtype=torch.float64)
    state = None
    for chunk in x.split([7, 20, 23]):
        state = accumulate_hessian(state, chunk)
    assert state is not None and state.n_tokens == 50
    torch.testing.assert_close(state.H, (2 * x.T @ x / 50).float(), rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_even_on_error() -> None:
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError), HessianHooks({"l": lin}):
        raise RuntimeError("boom")
    assert not lin._forward_pre_hooks


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_parallel_block_stats_equal_full_forward(model_type: str) -> None:
    model = tiny_model(model_type)
    calib = _calib()
    ref = _reference_hessians(model, calib)
    source = InMemoryCausalLM(model, adapter_for(model))
    seen = {}
    for step in iter_block_stats(source, calib, "parallel", batch_size=4, progress=False):
        assert step.n_tokens == calib.n_tokens
        seen.update(step.hessians)
    assert list(seen) == list(ref)
    for name in ref:
        torch.testing.assert_close(seen[name], ref[name], rtol=1e-4, atol=1e-5)


def _damage(block: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.mul_(0.5)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_sequential_sees_quantized_prefix(mode: str) -> None:
    model = tiny_model("llama")
    calib = _calib()
    source = InMemoryCausalLM(model, adapter_for("llama"))
    fp_ref = _reference_hessians(tiny_model("llama"), calib)
    seen = {}
    for step in iter_block_stats(source, calib, mode, batch_size=3, progress=False):  # type: ignore[arg-type]
        seen.update(step.hessians)
        _damage(step.block)  # stands for quantization of the block
    damaged_ref = _reference_hessians(model, calib)  # model now fully damaged
    last = "model.layers.1.mlp.down_proj"
    # Block 1's statistics: FP inputs in parallel mode; damaged block 0's outputs
    # (and FP block 1 weights, since block 1 was damaged after its statistics) in sequential.
    want = fp_ref if mode == "parallel" else None
    if want is not None:
        torch.testing.assert_close(seen[last], want[last], rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(seen[last], fp_ref[last], rtol=1e-3)
        first_attn = "model.layers.1.self_attn.q_proj"
        torch.testing.assert_close(seen[first_attn], damaged_ref[first_attn], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox"])
def test_lazy_model_gives_the_same_hessians(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    calib = _calib()
    ref = _reference_hessians(model, calib)
    lazy = LazyCausalLM(tmp_path)
    seen = {}
    for step in iter_block_stats(lazy, calib, "parallel", batch_size=4, progress=False):
        seen.update(step.hessians)
    for name in ref:
        torch.testing.assert_close(seen[name], ref[name], rtol=1e-4, atol=1e-5)
    # Blocks were released after use, the embeddings after the capture, and the
    # LM head (not needed for statistics) was never loaded.
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    lazy.close()


def test_nan_activations_name_the_layer() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    source = InMemoryCausalLM(model, adapter_for("llama"))
    with pytest.raises(NumericalError, match=r"(layers\.0|block 0)"):
        for _ in iter_block_stats(source, _calib(), progress=False):
            pass


def test_layers_that_read_one_input_share_one_hessian() -> None:
    """Found from the forward pass itself: no family declares it."""
    model = tiny_model("phi")  # a discovered family: q, k, v and dense; fc1, fc2
    source = InMemoryCausalLM(model, adapter_for(model))
    step = next(iter_block_stats(source, _calib(), "parallel", batch_size=4, progress=False))
    h = {name.split(".", 3)[3]: H for name, H in step.hessians.items()}
    assert h["self_attn.q_proj"] is h["self_attn.k_proj"] is h["self_attn.v_proj"]
    assert h["self_attn.dense"] is not h["self_attn.q_proj"]
    assert h["mlp.fc1"] is not h["mlp.fc2"]


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_current_hessians_see_the_layers_already_changed(model_type: str) -> None:
    """Each later input group's Hessian, taken again after the earlier groups of its block
    changed (true sequential): unchanged weights give the first pass's Hessians, and
    a changed earlier group moves them; the hooks are gone afterwards."""
    model = tiny_model(model_type)
    source = InMemoryCausalLM(model, adapter_for(model))
    for step in iter_block_stats(source, _calib(), "sequential", batch_size=4, progress=False):
        groups = step.input_groups()
        assert sorted(n for g in groups for n in g) == sorted(step.layers)
        for group in groups[1:]:
            again = step.current_hessians(group)
            for name in group:
                torch.testing.assert_close(again[name], step.hessians[name])
        with torch.no_grad():
            for name in groups[0]:
                weight = step.layers[name].weight
                assert isinstance(weight, torch.Tensor)
                weight.mul_(0.5)
        moved = [
            name
            for group in groups[1:]
            for name, H in step.current_hessians(group).items()
            if not torch.allclose(H, step.hessians[name])
        ]
        assert moved, "halving the first group's weights changed no later input"
        assert not any(m._forward_pre_hooks for m in step.layers.values())
        break
