"""The lm-eval bridge on a zoo model, offline, with the shipped local task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import ZOO_MODELS

from lwq.errors import ConfigError
from lwq.eval.harness import TEXT_PPL_TASK, documents, evaluate_tasks
from lwq.models import load_model_dir


def test_documents_split_at_blank_lines() -> None:
    text = "\n\n".join(f"para {i} " + "x" * 50 for i in range(100))
    docs = documents(text, max_chars=600)
    assert "\n\n".join(docs) == text
    assert all(len(d) <= 600 for d in docs)


@pytest.mark.slow
def test_local_perplexity_task_runs_offline(zoo_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model_dir(zoo_dir / ZOO_MODELS[1])
    data = tmp_path / "small.txt"
    data.write_text((zoo_dir / "data" / "validation.txt").read_text()[:6000])
    res = evaluate_tasks(model, tok, [TEXT_PPL_TASK], data=data)
    metrics = res[TEXT_PPL_TASK]
    assert math.isclose(
        metrics["bits_per_byte"], math.log2(metrics["byte_perplexity"]), rel_tol=1e-6
    )
    assert 1.0 < metrics["byte_perplexity"] < 4.0  # trained: far below 256 byte values


def test_local_task_needs_data(zoo_dir: Path) -> None:
    model, tok = load_model_dir(zoo_dir / ZOO_MODELS[1])
    with pytest.raises(ConfigError, match="--data"):
        evaluate_tasks(model, tok, [TEXT_PPL_TASK])
