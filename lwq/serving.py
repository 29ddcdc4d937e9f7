"""Serving a packed checkpoint: generation and perplexity over HTTP (``lwq serve``).

``Predictor`` answers the two requests on a loaded model; ``parse_request``
reads the payloads (ours and MLflow's); ``ModelServer`` holds the model of a
source (a folder or ``models:/NAME@ALIAS``), swaps in the new version when the
alias moves, and maps paths to answers. The HTTP layer is the standard
library's: one request at a time reaches torch, which already uses every core.

Endpoints:
- ``GET /health`` (also ``/ping``): what is served;
- ``POST /generate``: ``{"prompt": str | "prompts": [str], "max_new_tokens": 32,
  "temperature": 0 (greedy) or > 0 (sampled), "top_p": 1.0, "seed": int}``;
- ``POST /perplexity``: ``{"text": str | "texts": [str]}``, texts of any length;
- ``POST /invocations``: MLflow's payloads (``inputs``, ``instances``,
  ``dataframe_split``, ``dataframe_records``) with ``params`` such as
  ``{"task": "generate", "max_new_tokens": 16}`` (default task perplexity).

A request that is not valid JSON, lacks a field or has a bad value gets 400
and the reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import torch

from lwq.errors import LwqError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 1024
TASKS = ("perplexity", "generate")
TEXT_KEYS = ("text", "prompt", "inputs")


class BadRequest(LwqError):
    """The request cannot be answered as sent (HTTP 400)."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0
    seed: int | None = None


def _number(params: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = params.get(key, default)
    if value is None:
        return None
    # bool is an int in Python, and JSON's true is never a count
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number, got {json.dumps(value)}")
    if kind is int and not float(value).is_integer():
        raise BadRequest(f"{key} must be a whole number, got {value}")
    return kind(value)


def generation_params(params: dict[str, Any]) -> GenerationParams:
    d = GenerationParams()
    p = GenerationParams(
        _number(params, "max_new_tokens", int, d.max_new_tokens),
        _number(params, "temperature", float, d.temperature),
        _number(params, "top_p", float, d.top_p),
        _number(params, "seed", int, d.seed),
    )
    if not 1 <= p.max_new_tokens <= MAX_NEW_TOKENS:
        raise BadRequest(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}, got {p.max_new_tokens}")
    if p.temperature < 0:
        raise BadRequest(f"temperature must be >= 0 (0: greedy), got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {p.top_p}")
    return p


def as_texts(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise BadRequest(f"{where} must be a text or a non-empty list of texts")
    out = []
    for x in items:
        if isinstance(x, dict):  # a record: {"text": ...}
            keys = [k for k in TEXT_KEYS if k in x]
            if len(x) != 1 or not keys:
                raise BadRequest(f"{where}: a record holds one text field ({', '.join(TEXT_KEYS)})")
            x = x[keys[0]]
        elif isinstance(x, list) and len(x) == 1:  # a row of one column
            x = x[0]
        if not isinstance(x, str):
            raise BadRequest(f"{where} must hold texts, got {json.dumps(x)[:80]}")
        out.append(x)
    return out


def mlflow_texts(payload: dict[str, Any]) -> list[str]:
    """The texts of an MLflow scoring payload."""
    forms = [
        k for k in ("inputs", "instances", "dataframe_split", "dataframe_records") if k in payload
    ]
    if len(forms) != 1:
        raise BadRequest(
            "give exactly one of inputs, instances, dataframe_split, dataframe_records"
        )
    form = forms[0]
    value = payload[form]
    if form == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise BadRequest("dataframe_split needs columns and data")
        columns = value.get("columns") or ["text"]
        if len(columns) != 1:
            raise BadRequest(f"dataframe_split: one text column, got {columns}")
        return as_texts(value["data"], "dataframe_split.data")
    if form == "inputs" and isinstance(value, dict):  # {"inputs": {"text": [...]}}
        if len(value) != 1:
            raise BadRequest("inputs: one column of texts")
        value = next(iter(value.values()))
    return as_texts(value, form)


def parse_request(path: str, payload: Any) -> tuple[str, list[str], GenerationParams]:
    """(task, texts, generation parameters) of a request body, or BadRequest."""
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    if path == "/invocations":
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest("params must be an object")
        task = params.get("task", "perplexity")
        texts = mlflow_texts(payload)
    else:
        task, params = path.strip("/"), payload
        single, many = ("prompt", "prompts") if task == "generate" else ("text", "texts")
        given = [k for k in (single, many) if k in payload]
        if len(given) != 1:
            raise BadRequest(f"give {single} (a text) or {many} (a list of texts)")
        texts = as_texts(payload[given[0]], given[0])
    if task not in TASKS:
        raise BadRequest(f"task must be one of {', '.join(TASKS)}, got {json.dumps(task)}")
    gen = generation_params(params) if task == "generate" else GenerationParams()
    return task, texts, gen


class Predictor:
    """Generation and perplexity on one loaded model."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from lwq.models import context_window, max_positions

        self.model, self.tokenizer = model, tokenizer
        self.window = context_window(model.config)  # perplexity windows
        self.context = max_positions(model.config)

    def perplexities(self, texts: list[str]) -> list[dict[str, float]]:
        from lwq.errors import ConfigError
        from lwq.eval.perplexity import text_perplexity

        out = []
        for i, text in enumerate(texts):
            try:
                r = text_perplexity(self.model, self.tokenizer, text, self.window)
            except ConfigError as err:
                raise BadRequest(f"text {i}: {err}") from err
            out.append({"perplexity": r.perplexity, "tokens": r.n_tokens + r.n_windows})
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], p: GenerationParams) -> list[dict[str, Any]]:
        from transformers import GenerationConfig

        tok = self.tokenizer
        eos = tok.eos_token_id
        sample = p.temperature > 0
        config = GenerationConfig(
            max_new_tokens=p.max_new_tokens,
            do_sample=sample,
            temperature=p.temperature if sample else 1.0,
            top_p=p.top_p if sample else 1.0,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            eos_token_id=eos,
        )
        device = next(self.model.parameters()).device
        out = []
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, return_tensors="pt")["input_ids"]  # (1, n)
            if ids.shape[1] == 0:
                if tok.bos_token_id is None:
                    raise BadRequest(f"prompt {i} is empty and the model has no BOS token")
                ids = torch.tensor([[tok.bos_token_id]])
            n = ids.shape[1]
            if n + p.max_new_tokens > self.context:
                raise BadRequest(
                    f"prompt {i} has {n} tokens; with max_new_tokens {p.max_new_tokens} it "
                    f"exceeds the model's context of {self.context} tokens"
                )
            if p.seed is not None:
                torch.manual_seed(p.seed)
            seq = self.model.generate(
                ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                generation_config=config,
            )
            new = seq[0, n:]
            out.append({"text": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new)})
        return out

    def predict(self, task: str, texts: list[str], p: GenerationParams) -> list[Any]:
        """One value per text: the perplexity, or the generated text."""
        if task == "generate":
            return [g["text"] for g in self.generate(texts, p)]
        return [r["perplexity"] for r in self.perplexities(texts)]


class ModelServer:
    """The model of ``source``, replaced when what the source names changes (a moved alias)."""

    def __init__(self, source: str, device: str = "cpu", packed: bool = True) -> None:
        from lwq.sources import load

        self.source, self.device, self.packed = source, device, packed
        self.loaded = load(source, device, packed)
        self.predictor = Predictor(self.loaded.model, self.loaded.tokenizer)
        self.lock = threading.Lock()  # one request at a time reaches torch

    def refresh(self) -> bool:
        """Load the version the source names now, if it changed; True when swapped."""
        from lwq.sources import load, source_for

        pinned = source_for(self.source).pin(self.source)
        if pinned == self.loaded.pinned:
            return False
        log.info("%s now names %s (was %s): loading", self.source, pinned, self.loaded.pinned)
        loaded = load(pinned, self.device, self.packed)
        predictor = Predictor(loaded.model, loaded.tokenizer)
        with self.lock:
            self.loaded, self.predictor = loaded, predictor
        log.info("serving %s", pinned)
        return True

    def health(self) -> dict[str, Any]:
        m = self.loaded.manifest
        return {
            "status": "ok",
            "source": self.source,
            "model": self.loaded.pinned,
            "bits": m.bits.from_bytes,
            "method": m.quantization.method,
        }

    def handle(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) of one request."""
        path = path.split("?")[0].rstrip("/") or "/"
        if path in ("/health", "/ping"):
            return (200, self.health()) if method == "GET" else (405, {"error": "use GET"})
        if path not in ("/generate", "/perplexity", "/invocations"):
            return 404, {"error": f"no endpoint {path}: /generate, /perplexity, /invocations"}
        if method != "POST":
            return 405, {"error": f"{path}: use POST with a JSON body"}
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return 400, {"error": f"the body is not JSON: {err}"}
        try:
            task, texts, params = parse_request(path, payload)
            with self.lock:
                served, predictor = self.loaded.pinned, self.predictor
                if path == "/invocations":
                    answer: dict[str, Any] = {"predictions": predictor.predict(task, texts, params)}
                elif task == "generate":
                    answer = {"generations": predictor.generate(texts, params)}
                else:
                    answer = {"perplexities": predictor.perplexities(texts)}
        except BadRequest as err:
            return 400, {"error": str(err)}
        return 200, {"model": served, **answer}

    def watch(self, seconds: float, stop: threading.Event) -> None:
        """Poll the source every ``seconds`` until ``stop``; errors keep the served model."""
        while not stop.wait(seconds):
            try:
                self.refresh()
            except Exception:  # the registry may be down for a while: keep serving
                log.exception(
                    "checking %s failed; still serving %s", self.source, self.loaded.pinned
                )


class JsonApp(Protocol):
    def handle(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]: ...


def json_http_server(app: JsonApp, host: str, port: int) -> ThreadingHTTPServer:
    """A standard-library HTTP server whose every answer is ``app.handle``'s JSON."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            t = time.perf_counter()
            try:
                status, answer = app.handle(method, self.path, body, dict(self.headers.items()))
            except Exception as err:  # a bug, not the client's fault
                log.exception("%s %s failed", method, self.path)
                status, answer = 500, {"error": f"{type(err).__name__}: {err}"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            log.info("%s %s %d %.3fs", method, self.path, status, time.perf_counter() - t)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # logged by _answer

    return ThreadingHTTPServer((host, port), Handler)


def serve(server: ModelServer, host: str, port: int, reload_seconds: float) -> None:
    """Answer requests on ``host:port`` until interrupted; poll the source for a moved alias."""
    http = json_http_server(server, host, port)
    stop = threading.Event()
    watcher = threading.Thread(target=server.watch, args=(reload_seconds, stop), daemon=True)
    watcher.start()
    try:
        http.serve_forever()
    finally:
        stop.set()
        http.server_close()
