"""Model-directory checks: clear errors naming --model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ZOO, ZOO_MODELS

from cli.main import main
from lwq.errors import ModelLoadError
from lwq.models import check_model_dir, load_model_dir


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"--model .*no such directory"):
        check_model_dir(tmp_path / "absent")


def test_directory_without_weights(tmp_path: Path) -> None:
    src = ZOO / ZOO_MODELS[0]
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ModelLoadError, match="no weights"):
        check_model_dir(tmp_path)


def test_tokenizer_of_another_model_is_refused(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # A model with a smaller vocabulary than the zoo tokenizer it is paired with.
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ZOO / ZOO_MODELS[0]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="does not belong to this model"):
        load_model_dir(tmp_path)


def test_cli_eval_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tmp_path / "x"), "--data", str(tmp_path / "d")]) == 2
    assert "--model" in capsys.readouterr().err
