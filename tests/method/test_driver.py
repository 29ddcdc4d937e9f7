"""--method lwq end to end on a tiny model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ZOO
from tiny_models import save_tiny_model_dir

from lwq.config import make_config
from lwq.errors import ConfigError
from lwq.pack.checkpoint import load_quantized
from lwq.quantize import quantize


def _cfg(model: Path, out: Path, budget: float, **method: Any) -> Any:
    return make_config(
        {
            "model": str(model),
            "out": str(out),
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": 4,
                "seq_len": 32,
                "batch_size": 4,
            },
            "quant": {"method": "lwq"},
            "method": {"budget": budget, "group_size": 32, "sketch_dim": 16, **method},
        }
    )


@pytest.mark.parametrize("objective", ["full", "fixed"])
def test_budget_is_met_from_bytes_and_report_is_complete(
    objective: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    with caplog.at_level(logging.WARNING):
        report = quantize(_cfg(model_dir, tmp_path / "q", 2.7, objective=objective), progress=False)
    assert "had 4 sequences (128 tokens) for 14 layers" in caplog.text
    m = report.manifest
    assert abs(m["bits"]["from_bytes"] - 2.7) <= 0.02
    alloc = m["allocation"]
    assert alloc["objective"] == objective and len(alloc["layers"]) == 14
    ratios = [x["ratio"] for x in alloc["layers"]]
    assert all(0 <= r <= 0.3 + 1e-9 for r in ratios)
    assert any(x["n_hi"] > 0 for x in alloc["layers"])
    if objective == "fixed":
        assert max(ratios) - min(ratios) < 1e-9
    assert all(x["output_error"] is not None and x["output_error"] >= 0 for x in alloc["layers"])
    model, _, _ = load_quantized(report.out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_infeasible_budget_states_the_range_and_writes_nothing(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    with pytest.raises(ConfigError, match=r"feasible range is \[2\.\d+, \d\.\d+\]"):
        quantize(_cfg(model_dir, tmp_path / "q", 1.5), progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="hi_bits"):
        _cfg(model_dir, tmp_path / "q", 2.5, lo_bits=4, hi_bits=4)


@pytest.mark.parametrize("ties", ["inputs", "block"])
def test_ties_give_one_ratio_per_group(ties: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q", 2.6, ties=ties)
    report = quantize(cfg, progress=False)
    ratios: dict[str, float] = {
        x["name"]: x["ratio"] for x in report.manifest["allocation"]["layers"]
    }
    groups: dict[tuple[str, ...], list[float]] = {}
    for name, r in ratios.items():
        block, suffix = name.split(".")[2], name.split(".", 3)[3]
        key = (
            (block,)
            if ties == "block"
            else (
                block,
                {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(
                    suffix.split(".")[-1], suffix
                ),
            )
        )
        groups.setdefault(key, []).append(r)
    assert any(len(v) > 1 for v in groups.values())
    for v in groups.values():
        assert max(v) - min(v) < 1e-6
    assert abs(report.manifest["bits"]["from_bytes"] - 2.6) <= 0.02


def test_float16_high_impact_weights_and_lwc_end_to_end(tmp_path: Path) -> None:
    """Dense-and-sparse (hi_bits=16) and learned clipping go through the same path."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    fp16 = quantize(_cfg(model_dir, tmp_path / "a", 2.6, hi_bits=16), progress=False)
    layers = fp16.manifest["layers"]
    assert any(v["hi"] is not None and v["hi"]["bits"] == 16 for v in layers.values())
    assert abs(fp16.manifest["bits"]["from_bytes"] - 2.6) <= 0.02
    lwc = quantize(
        _cfg(model_dir, tmp_path / "b", 2.6, hi_refine="lwc", lwc_steps=5), progress=False
    )
    assert abs(lwc.manifest["bits"]["from_bytes"] - 2.6) <= 0.02
    for report in (fp16, lwc):
        model, _, _ = load_quantized(report.out)
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    with pytest.raises(ConfigError, match="hi_bits"):
        _cfg(model_dir, tmp_path / "c", 2.6, hi_bits=5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_by_layer_checkpoint_equals_the_parallel_pass(family: str, tmp_path: Path) -> None:
    """What a flow does (state saved, layers quantized one by one, then packed)
    gives the same bytes as the one-pass parallel-mode driver."""
    from lwq.adapters import adapter_for
    from lwq.calibration import build_calibration_set
    from lwq.loading import read_layer_weights
    from lwq.method.driver import (
        allocate,
        gptq_settings,
        load_hessian,
        load_state,
        prepare,
        quantize_allocation,
        quantize_layer,
        save_state,
        write_packed_checkpoint,
    )
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import read_manifest
    from lwq.pack.layer import pack_layer

    model_dir = save_tiny_model_dir(family, tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "a", 2.7)
    cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"mode": "parallel"})})
    model, tok = load_model_dir(model_dir)
    adapter = adapter_for(model.config.model_type)
    calib = build_calibration_set(tok, str(ZOO / "data" / "calibration.txt"), 4, 32, 0)
    state = prepare(model, adapter, calib, cfg, progress=False)
    alloc = allocate(state, cfg)
    one_pass = quantize_allocation(model_dir, tmp_path / "a", state, alloc, calib, cfg, False)

    save_state(state, tmp_path / "state")
    light = load_state(tmp_path / "state")
    assert light.hessians == {} and light.names == state.names
    weights = read_layer_weights(model_dir, list(state.names))
    packed, errors = [], {}
    for name, r in zip(alloc.names, alloc.ratios, strict=True):
        H = load_hessian(tmp_path / "state", light, name)
        assert torch.equal(H, state.hessians[name])
        assert torch.equal(
            weights[name], adapter.read_weight(dict(adapter.iter_layers(model))[name])
        )
        qw, errors[name] = quantize_layer(weights[name], H, light, name, r, gptq_settings(cfg))
        packed.append(pack_layer(name, qw))
    by_layer = write_packed_checkpoint(
        model_dir, tmp_path / "b", packed[::-1], light, alloc, calib, cfg, errors
    )
    from lwq.pack.checkpoint import iter_packed_layers

    a = {p.name: p for p in iter_packed_layers(tmp_path / "a", one_pass)}
    b = {p.name: p for p in iter_packed_layers(tmp_path / "b", by_layer)}
    for name in state.names:
        assert torch.equal(a[name].data, b[name].data), name
    assert by_layer["files"] == one_pass["files"]  # same bytes, file by file
    assert read_manifest(tmp_path / "b")["quantization"]["mode"] == "parallel"


def test_largest_layers_are_quantized_first() -> None:
    from types import SimpleNamespace

    from lwq.method.driver import largest_first

    shapes = [(128, 128), (512, 128), (128, 512), (32, 128), (128, 128)]
    state: Any = SimpleNamespace(costs=[SimpleNamespace(shape=s) for s in shapes])
    # The wide-input layer (a down projection) costs most, ties keep model order.
    assert largest_first(state) == [2, 1, 0, 4, 3]
