"""``lwq sweep``: one profile, a checkpoint per budget, the Pareto files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ZOO
from tiny_models import save_tiny_model_dir

import lwq.quantize as driver
from cli.main import main
from lwq.pack.checkpoint import read_manifest


def _args(model: Path, out: Path, bits: str) -> list[str]:
    calib = str(ZOO / "data" / "calibration.txt")
    return [
        "sweep", "--model", str(model), "--out", str(out), "--bits", bits, "--calib", calib,
        "--n-samples", "4", "--seq-len", "32", "--group-size", "32", "-q",
        "--profile-samples", "8", "--profile-seq-len", "16",
    ]  # fmt: skip


def test_sweep_prepares_once_and_writes_every_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model_dir("llama", tmp_path / "m")
    calls: list[int] = []
    real = driver.prepare

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(driver, "prepare", counted)
    data = ZOO / "data" / "validation.txt"
    out = tmp_path / "sweep"
    assert main([*_args(model, out, "2.6,2.8,3.0"), "--data", str(data)]) == 0
    assert len(calls) == 1
    rows = json.loads((out / "pareto.json").read_text())["rows"]
    assert [r["budget"] for r in rows] == [2.6, 2.8, 3.0]
    for r in rows:
        manifest = read_manifest(Path(r["checkpoint"]))
        assert abs(manifest.bits.from_bytes - r["budget"]) <= 0.02
        assert r["bits"] == manifest.bits.from_bytes and r["perplexity"] > 1
        assert len(r["ratios"]) == 14
    # More bits protect more weights.
    assert sum(rows[0]["ratios"]) < sum(rows[2]["ratios"])
    for name in ("pareto.md", "pareto.png", "allocation.png"):
        assert (out / name).stat().st_size > 0
    assert "| 2.6 |" in capsys.readouterr().out


def test_infeasible_budget_fails_before_anything_is_written(tmp_path: Path) -> None:
    model = save_tiny_model_dir("llama", tmp_path / "m")
    out = tmp_path / "sweep"
    assert main(_args(model, out, "2.6,9.5")) == 2
    assert not (out / "bits-2.6").exists()
    assert main(_args(model, out, "2.6,x")) == 2
