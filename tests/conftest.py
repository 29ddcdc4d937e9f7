"""Shared fixtures. Tests never reach a model hub: everything is local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
ZOO_MODELS = ("llama-6l-128d", "gpt2-6l-128d")
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    if not (ZOO / "data" / "split.json").is_file():
        pytest.fail(f"the committed zoo is missing from {ZOO}: run 'lwq zoo build'")
    return ZOO


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"WikiText-2 test split not found at {path} (../shared is absent)")
    return path


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same random state: results never depend on order."""
    import torch

    torch.manual_seed(1234)
