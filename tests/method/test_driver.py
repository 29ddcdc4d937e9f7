"""--method lwq end to end on a tiny model."""

from __future__ import annotations

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
def test_budget_is_met_from_bytes_and_report_is_complete(objective: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    report = quantize(_cfg(model_dir, tmp_path / "q", 2.7, objective=objective), progress=False)
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
