"""Serving a packed checkpoint: payloads, generation, perplexity of any length, bad requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ZOO

import lwq
from lwq.config import make_config
from lwq.errors import ConfigError
from lwq.eval.perplexity import perplexity_of_text
from lwq.quantize import quantize
from lwq.serving import ModelServer

TEXT = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "llama-w4"
    config = make_config(
        {
            "model": str(ZOO / "llama-6l-128d"),
            "out": str(out),
            "quant": {"method": "rtn", "bits": 4, "group_size": 64},
        }
    )
    quantize(config, progress=False)
    return out


@pytest.fixture(scope="module")
def server(ckpt: Path) -> ModelServer:
    return ModelServer(str(ckpt))


def _post(server: ModelServer, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.handle("POST", path, raw)


def test_lwq_load_returns_model_tokenizer_and_manifest(ckpt: Path) -> None:
    model, tokenizer, manifest = lwq.load(str(ckpt))
    assert manifest.quantization.method == "rtn" and tokenizer("a b")["input_ids"]
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 4096)
    with pytest.raises(ConfigError, match="not a packed lwq checkpoint"):
        lwq.load(str(ZOO / "llama-6l-128d"))
    with pytest.raises(ConfigError, match=r"no installed package reads nosuch:/ sources"):
        lwq.load("nosuch:/x")


def test_perplexity_of_short_and_long_texts(server: ModelServer) -> None:
    model, tok = server.predictor.model, server.predictor.tokenizer
    short = "The cat sat on the mat."
    long = TEXT[:6000]  # several windows of 256 tokens and a shorter last one
    status, answer = _post(server, "/perplexity", {"texts": [short, long]})
    assert status == 200, answer
    (ps, pl) = answer["perplexities"]
    n_long = len(tok(long, add_special_tokens=False)["input_ids"])
    assert n_long > 3 * 256 and pl["tokens"] == n_long
    assert 1 < pl["perplexity"] < 1e4 and 1 < ps["perplexity"]
    # On whole windows it is the evaluation protocol's perplexity.
    ids = tok(long, add_special_tokens=False)["input_ids"][: 3 * 256]
    exact = tok.decode(ids)
    ref = perplexity_of_text(model, tok, exact, 256).perplexity
    _, one = _post(server, "/perplexity", {"text": exact})
    assert one["perplexities"][0]["tokens"] == 3 * 256  # the round trip kept the tokens
    assert one["perplexities"][0]["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert answer["model"] == server.loaded.pinned


def test_generation_greedy_and_sampled(server: ModelServer) -> None:
    model, tok = server.predictor.model, server.predictor.tokenizer
    prompt = "The history of the"
    status, a = _post(server, "/generate", {"prompt": prompt, "max_new_tokens": 12})
    assert status == 200, a
    (g,) = a["generations"]
    assert 1 <= g["new_tokens"] <= 12 and g["text"]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert g["text"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    body = {"prompts": [prompt], "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    s1 = _post(server, "/generate", {**body, "seed": 3})[1]["generations"]
    s2 = _post(server, "/generate", {**body, "seed": 3})[1]["generations"]
    assert s1 == s2  # a seed makes sampling repeatable


def test_every_mlflow_payload_form_gives_the_same_predictions(server: ModelServer) -> None:
    texts = ["A short text.", TEXT[:2000]]
    forms = [
        {"inputs": texts},
        {"inputs": {"text": texts}},
        {"instances": texts},
        {"instances": [{"text": t} for t in texts]},
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
        {"dataframe_records": [{"text": t} for t in texts]},
    ]
    answers = [_post(server, "/invocations", f) for f in forms]
    assert all(status == 200 for status, _ in answers), answers
    first = answers[0][1]["predictions"]
    assert len(first) == 2 and all(a["predictions"] == first for _, a in answers)
    gen = {"inputs": ["Once upon"], "params": {"task": "generate", "max_new_tokens": 5}}
    status, a = _post(server, "/invocations", gen)
    assert status == 200 and isinstance(a["predictions"][0], str)


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/perplexity", b"{not json", "the body is not JSON"),
        ("/perplexity", [], "the body must be a JSON object"),
        ("/perplexity", {}, "give text (a text) or texts"),
        ("/perplexity", {"texts": []}, "non-empty list"),
        ("/perplexity", {"text": 3}, "text must be a text or a non-empty list"),
        ("/perplexity", {"texts": ["a", 3]}, "texts must hold texts"),
        ("/perplexity", {"text": "a"}, "at least 2 tokens"),
        ("/generate", {"text": "a"}, "give prompt (a text) or prompts"),
        ("/generate", {"prompt": "a", "max_new_tokens": "ten"}, "max_new_tokens must be a number"),
        ("/generate", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens must be 1..1024"),
        ("/generate", {"prompt": "a", "max_new_tokens": 2.5}, "must be a whole number"),
        ("/generate", {"prompt": "a", "top_p": 0}, "top_p must be in (0, 1]"),
        ("/generate", {"prompt": "a", "temperature": -1}, "temperature must be >= 0"),
        ("/generate", {"prompt": TEXT[:5000], "max_new_tokens": 8}, "exceeds the model's context"),
        ("/invocations", {"texts": ["a b"]}, "give exactly one of inputs"),
        ("/invocations", {"inputs": ["a b"], "params": {"task": "x"}}, "task must be one of"),
        ("/invocations", {"dataframe_split": {"columns": ["a", "b"], "data": []}}, "one text"),
    ],
)
def test_bad_requests_get_400_and_the_reason(
    server: ModelServer, path: str, body: Any, reason: str
) -> None:
    status, answer = _post(server, path, body)
    assert status == 400 and reason in answer["error"], answer


def test_paths_and_methods(server: ModelServer) -> None:
    status, health = server.handle("GET", "/health", b"")
    assert status == 200 and health["method"] == "rtn" and 4 < health["bits"] < 5
    assert server.handle("GET", "/generate", b"")[0] == 405
    assert server.handle("POST", "/nope", b"{}")[0] == 404
    assert server.refresh() is False  # a local folder names the same checkpoint
