"""Calibration sets: text windows, the model's own text (``self``), saved sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ZOO

from lwq.calibration import (
    SELF,
    CalibrationSet,
    build_calibration_set,
    generate_calibration_set,
    tokens_sha256,
)
from lwq.config import make_config, resolve_inputs
from lwq.errors import ConfigError
from lwq.models import load_model_dir

LLAMA = ZOO / "llama-6l-128d"


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, object]:
    return load_model_dir(LLAMA)


def test_the_model_writes_full_seeded_windows_from_its_start_token(llama: tuple) -> None:
    model, tok = llama
    before = torch.random.get_rng_state()
    a = generate_calibration_set(model, tok, 5, 24, seed=3, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global state is untouched
    assert a.input_ids.shape == (5, 24) and a.sha256 == tokens_sha256(a.input_ids)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    # The end token (here also the start token) is suppressed: every window is text.
    assert not (a.input_ids[:, 1:] == tok.eos_token_id).any()
    assert a.source.startswith(SELF) and a.seed == 3
    again = generate_calibration_set(model, tok, 5, 24, seed=3, batch_size=2)
    assert torch.equal(again.input_ids, a.input_ids)
    other = generate_calibration_set(model, tok, 5, 24, seed=4, batch_size=2)
    assert not torch.equal(other.input_ids, a.input_ids)
    # The windows are samples of the model's distribution: not one repeated token.
    assert len(set(a.input_ids[:, 1:].flatten().tolist())) > 20


def test_low_temperature_concentrates_the_samples(llama: tuple) -> None:
    model, tok = llama
    hot = generate_calibration_set(model, tok, 4, 32, seed=0, temperature=1.0)
    cold = generate_calibration_set(model, tok, 4, 32, seed=0, temperature=0.05)
    # Near-greedy decoding repeats itself far more than sampling at temperature 1.
    assert len(set(cold.input_ids.flatten().tolist())) < len(set(hot.input_ids.flatten().tolist()))
    with pytest.raises(ConfigError, match="temperature"):
        generate_calibration_set(model, tok, 1, 8, temperature=0.0)


def test_a_saved_set_is_read_as_it_is_or_in_part(llama: tuple, tmp_path: Path) -> None:
    model, tok = llama
    cs = build_calibration_set(tok, SELF, 4, 32, seed=1, model=model)
    path = cs.save(tmp_path / "set.safetensors")
    same = build_calibration_set(tok, str(path), 4, 32)
    assert same.sha256 == cs.sha256 and same.source == cs.source
    part = build_calibration_set(tok, path, 2, 16)
    assert torch.equal(part.input_ids, cs.input_ids[:2, :16])
    assert part.sha256 == tokens_sha256(part.input_ids)
    with pytest.raises(ConfigError, match="--n-samples"):
        build_calibration_set(tok, path, 5, 16)
    with pytest.raises(ConfigError, match="pass the model"):
        build_calibration_set(tok, SELF, 1, 8)
    path.write_bytes(path.read_bytes()[:-8])  # a damaged file is refused, not half-read
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error or ours)
        CalibrationSet.load(path)


def test_a_model_outside_the_zoo_calibrates_on_its_own_text(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    cfg = make_config({"model": str(model), "quant": {"method": "gptq"}})
    assert resolve_inputs(cfg).calib.source == SELF
    given = make_config({"model": str(model), "calib": {"source": "x.txt"}})
    assert resolve_inputs(given).calib.source == "x.txt"


def test_lwq_calibrate_saves_a_set_that_quantize_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    out = tmp_path / "calib.safetensors"
    sizes = ["--n-samples", "4", "--seq-len", "32"]
    assert (
        main(["calibrate", "--model", str(LLAMA), "--calib", "self", *sizes, "--out", str(out)])
        == 0
    )
    assert "4 windows of 32 tokens" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(LLAMA), "--calib", "self", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # nothing replaced
    assert main(["calibrate", "--model", str(LLAMA), "--out", str(tmp_path / "c.txt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    ck = tmp_path / "ck"
    args = ["quantize", "--model", str(LLAMA), "--calib", str(out), *sizes, "--out", str(ck)]
    assert main([*args, "-q"]) == 0
    from lwq.pack.checkpoint import read_manifest

    info = read_manifest(ck).quantization.calibration
    assert info is not None
    assert info.sha256 == CalibrationSet.load(out).sha256 and info.source.startswith(SELF)
