"""The committed reference models load offline, are trained, and match their cards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ZOO_MODELS
from cli.main import main
from lwq.eval.perplexity import perplexity_of_text
from lwq.models import load_model_dir
from lwq.zoo.corpus import SPLITS, split_of


def _card(zoo: Path, name: str) -> dict:
    return json.loads((zoo / name / "card.json").read_text())


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_plain_transformers_load_and_forward(zoo_dir: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo_dir / name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(zoo_dir / name)
    text = (zoo_dir / "data" / "validation.txt").read_text()[:4000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    # Trained: far better than a uniform guess over the vocabulary.
    assert float(loss) < 0.5 * math.log(len(tok))


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_card_is_complete_and_plausible(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    assert card["name"] == name
    assert card["validation_perplexity"] < card["vocab_size"] / 50
    assert card["tokens_seen"] >= 1_000_000
    assert card["command"].startswith("lwq ") and "zoo build" in card["command"]
    assert len(card["corpus"]["text_sha256"]) == 64
    assert card["sample"].startswith(card["sample_prompt"])
    readme = (zoo_dir / name / "README.md").read_text()
    assert f"{card['validation_perplexity']:.3f}" in readme


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_linear_inputs_fit_standard_group_sizes(zoo_dir: Path, name: str) -> None:
    model, _ = load_model_dir(zoo_dir / name)
    decoder = model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h
    assert len(layers) >= 6
    for mod_name, mod in layers.named_modules():
        weight = getattr(mod, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
        d_in = weight.shape[0] if type(mod).__name__ == "Conv1D" else weight.shape[1]
        assert d_in % 128 == 0, mod_name


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_validation_perplexity_matches_card(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    model, tok = load_model_dir(zoo_dir / name)
    text = (zoo_dir / "data" / "validation.txt").read_text(encoding="utf-8")
    res = perplexity_of_text(model, tok, text, card["recipe"]["seq_len"], batch_size=8)
    assert res.n_tokens == card["validation_tokens"]
    assert res.perplexity == pytest.approx(card["validation_perplexity"], rel=0.02)


def test_tokenizer_round_trip(zoo_dir: Path) -> None:
    from transformers import AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(zoo_dir / n) for n in ZOO_MODELS]
    assert toks[0].backend_tokenizer.to_str() == toks[1].backend_tokenizer.to_str()
    text = (zoo_dir / "data" / "calibration.txt").read_text(encoding="utf-8")[:50_000]
    text += "\nUnicode: caf\u00e9 \u2014 \u03bb \u4e2d\u6587 \U0001f600\n"
    ids = toks[0](text, add_special_tokens=False)["input_ids"]
    assert toks[0].decode(ids) == text
    assert len(ids) < len(text) / 2.5  # BPE actually merges


def test_corpus_split_is_disjoint(zoo_dir: Path) -> None:
    manifest = json.loads((zoo_dir / "data" / "split.json").read_text())
    splits = manifest["splits"]
    assert set(splits) == set(SPLITS)
    paths = {s: {f["path"] for f in splits[s]} for s in SPLITS}
    hashes = {s: {f["sha256"] for f in splits[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not paths[a] & paths[b], (a, b)
            assert not hashes[a] & hashes[b], (a, b)
        assert all(split_of(p) == a for p in paths[a])
    assert sum(len(p) for p in paths.values()) == manifest["corpus"]["n_files"]


def test_zoo_fits_the_size_budget(zoo_dir: Path) -> None:
    total = sum(p.stat().st_size for p in zoo_dir.rglob("*") if p.is_file())
    assert total <= 30 * 2**20


@pytest.mark.slow
def test_cli_eval_prints_perplexity(zoo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = zoo_dir / ZOO_MODELS[1]
    data = zoo_dir / "data" / "calibration.txt"
    assert main(["eval", "--model", str(model), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "windows of 256" in out
