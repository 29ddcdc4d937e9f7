"""The flow's stages as Prefect tasks: each calls one ``lwq`` function.

Caching (``INPUTS + TASK_SOURCE``, results persisted under the work folder) is
keyed by content: every task takes the SHA-256 of what it reads (model weight
files, calibration set, method state) and the config section that matters to
it, and excludes the paths it reads them from, so moving a folder does not
invalidate a cache and changing a file does. Large objects (calibration set,
method state with its Hessians, packed layers, checkpoints) are written to the
work folder under content-derived names and travel between tasks as paths;
only small typed objects (``Allocation``, ``EvalReport``) are task results.
Retries are declared only on the I/O tasks (upload, register).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lwq.config import LwqConfig, PipelineConfig
from lwq.method.qp import Allocation

# Paths, the work folder and whole configs are read, never hashed.
PATHS = ("model_dir", "work", "calib_path", "state_dir", "layer_files", "ckpt", "config")
CACHED = INPUTS + TASK_SOURCE
for _name in PATHS:
    CACHED = CACHED - _name  # type: ignore[operator]


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-able object (sorted keys): the identity of a config section."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Content identities the cache keys and the run's identity are made of."""

    model_sha: str  # the model's weight files
    source_sha: str  # the calibration text
    config_sha: str  # the settings that change the result (not where things go)
    eval_sha: str | None  # the evaluation text
    budget: float | None = None

    @property
    def run(self) -> str:
        """Identifies a finished run: the registry holds one version per value."""
        parts = [self.model_sha, self.source_sha, self.config_sha, self.eval_sha, self.budget]
        return digest(parts)[:16]

    def for_budget(self, budget: float) -> Fingerprint:
        return dataclasses.replace(self, budget=budget)


def source_sha256(source: str) -> str:
    """Content hash of a calibration source: a file, a folder of .txt files, or hf://."""
    from lwq.hashing import file_sha256

    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return digest([[f.name, file_sha256(f)] for f in sorted(path.glob("*.txt"))])
    return digest(source)  # a hub dataset: its name and revision are its identity


@task(name="fingerprint")
def fingerprint(config: LwqConfig) -> Fingerprint:
    """Hash the model's weights, the calibration and evaluation texts, the settings."""
    from lwq.hashing import file_sha256
    from lwq.models import check_model_dir
    from lwq.pack.checkpoint import weights_sha256

    config.require("model", "calib.source")
    model_dir = Path(str(config.model))
    check_model_dir(model_dir)
    settings = config.model_dump(mode="json", exclude={"out", "overwrite", "pipeline"})
    settings["method"].pop("budget")
    data = config.pipeline.eval_data
    return Fingerprint(
        weights_sha256(model_dir),
        source_sha256(str(config.calib.source)),
        digest(settings),
        None if data is None else file_sha256(Path(data)),
    )


@dataclass(frozen=True)
class LayerResult:
    name: str
    path: str  # the packed layer (torch.save of PackedLayer)
    output_error: float
    seconds: float


@dataclass(frozen=True)
class EvalReport:
    perplexity_fp: float | None
    perplexity: float | None
    bits: float
    bits_model: float
    predicted_kl: float
    seconds: float
    version: int = 1


@functools.lru_cache(maxsize=4)
def _state(state_dir: str, stamp: tuple[int, int]) -> Any:
    from lwq.method.driver import load_state

    return load_state(Path(state_dir))


def method_state(state_dir: str) -> Any:
    """The method state of ``state_dir``, read once per process and kept.

    A state folder is named by the content hash of its inputs and written once,
    so a layer task (thousands per model, many per worker) need not unpickle it
    again; the file's size and time stamp guard against a folder rewritten.
    """
    from lwq.method.driver import STATE_FILE

    st = (Path(state_dir) / STATE_FILE).stat()
    return _state(state_dir, (st.st_mtime_ns, st.st_size))


def _timed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


@task(name="calibrate", cache_policy=CACHED, persist_result=True)
def calibrate(
    model_dir: str, work: str, model_sha: str, source_sha: str, calib: dict[str, Any]
) -> tuple[str, str, float]:
    """Calibration windows -> (path, content SHA-256, seconds)."""
    from transformers import AutoConfig, AutoTokenizer

    from lwq.calibration import build_calibration_set
    from lwq.models import check_tokenizer
    from lwq.quantize import default_seq_len

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    mcfg = AutoConfig.from_pretrained(model_dir)
    check_tokenizer(tok, int(mcfg.vocab_size), Path(model_dir))
    seq_len = default_seq_len(mcfg, calib["seq_len"])
    cs = build_calibration_set(tok, calib["source"], calib["n_samples"], seq_len, calib["seed"])
    path = Path(work) / "calibration" / f"{cs.sha256[:24]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cs, path)
    return str(path), cs.sha256, _timed(t)


@task(name="sensitivity", cache_policy=CACHED, persist_result=True)
def sensitivity(
    model_dir: str,
    work: str,
    calib_path: str,
    config: LwqConfig,
    model_sha: str,
    calib_sha: str,
    method: dict[str, Any],
    gptq: dict[str, Any],
) -> tuple[str, str, float]:
    """Hessians, rankings, cost curves and the sensitivity profile -> (folder, key, s)."""
    from lwq.adapters import adapter_for
    from lwq.method.driver import prepare, save_state
    from lwq.models import load_model_dir

    t = time.perf_counter()
    key = digest([model_sha, calib_sha, method, gptq])[:24]
    model, _ = load_model_dir(Path(model_dir), device=config.device)
    calib = torch.load(calib_path, weights_only=False)
    state = prepare(model, adapter_for(model.config.model_type), calib, config, progress=False)
    out = save_state(state, Path(work) / "state" / key)
    return str(out), key, _timed(t)


@task(name="solve", cache_policy=CACHED, persist_result=True)
def solve(
    state_dir: str, config: LwqConfig, state_key: str, budget: float, method: dict[str, Any]
) -> tuple[Allocation, list[int]]:
    """The QP allocation for one budget, and the order to quantize its layers in
    (largest first: mapped over workers, they finish together)."""
    from lwq.method.driver import allocate, largest_first

    state = method_state(state_dir)
    return allocate(state, config, budget), largest_first(state)


@task(name="quantize-layer", cache_policy=CACHED, persist_result=True)
def quantize_layer(
    model_dir: str,
    work: str,
    state_dir: str,
    config: LwqConfig,
    model_sha: str,
    state_key: str,
    name: str,
    ratio: float,
    gptq: dict[str, Any],
    method: dict[str, Any],
) -> LayerResult:
    """One layer at its ratio, packed to a file."""
    from lwq.loading import read_layer_weights
    from lwq.method.driver import gptq_settings, load_hessian, lwc_settings
    from lwq.method.driver import quantize_layer as quantize_one
    from lwq.pack.layer import pack_layer

    t = time.perf_counter()
    state = method_state(state_dir)
    W = read_layer_weights(Path(model_dir), [name])[name]
    H = load_hessian(Path(state_dir), state, name)
    qw, err = quantize_one(W, H, state, name, ratio, gptq_settings(config), lwc_settings(config))
    key = digest([model_sha, state_key, name, ratio, gptq, method])[:24]
    path = Path(work) / "layers" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save(pack_layer(name, qw), tmp)
    tmp.replace(path)
    return LayerResult(name, str(path), err, _timed(t))


@task(name="pack", cache_policy=CACHED, persist_result=True)
def pack(
    model_dir: str,
    work: str,
    state_dir: str,
    calib_path: str,
    layer_files: list[LayerResult],
    config: LwqConfig,
    alloc: Allocation,
    layer_keys: list[Any],
) -> tuple[str, str]:
    """The packed checkpoint from the quantized layers -> (folder, manifest SHA-256)."""
    from lwq.hashing import file_sha256
    from lwq.method.driver import write_packed_checkpoint
    from lwq.pack.checkpoint import MANIFEST

    state = method_state(state_dir)
    calib = torch.load(calib_path, weights_only=False)
    packed = [torch.load(r.path, weights_only=False) for r in layer_files]
    errors = {r.name: r.output_error for r in layer_files}
    out = Path(work) / "checkpoints" / digest(layer_keys)[:24]
    cfg = config.model_copy(update={"overwrite": True})
    write_packed_checkpoint(Path(model_dir), out, packed, state, alloc, calib, cfg, errors)
    return str(out), file_sha256(out / MANIFEST)


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate(
    ckpt: str,
    model_dir: str,
    config: LwqConfig,
    manifest_sha: str,
    eval_sha: str | None,
) -> EvalReport:
    """Perplexity before and after on ``pipeline.eval_data``, and the measured bits."""
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import load_quantized
    from lwq.textio import read_text

    t = time.perf_counter()
    qmodel, tok, manifest = load_quantized(Path(ckpt), device=config.device)
    ppl_fp = ppl = None
    data = config.pipeline.eval_data
    if data is not None:
        text = read_text(Path(data), "pipeline.eval_data")
        seq = int(getattr(qmodel.config, "max_position_embeddings", 2048))
        seq = min(seq, 2048)
        ppl = perplexity_of_text(qmodel, tok, text, seq, batch_size=8).perplexity
        del qmodel
        fp, _ = load_model_dir(Path(model_dir), device=config.device)
        ppl_fp = perplexity_of_text(fp, tok, text, seq, batch_size=8).perplexity
    return EvalReport(
        ppl_fp,
        ppl,
        float(manifest["bits"]["from_bytes"]),
        float(manifest["bits"]["from_model"]),
        float(manifest["allocation"]["predicted_kl"]),
        _timed(t),
    )


@task(name="upload", retries=3, retry_delay_seconds=[1, 4, 16])
def upload(ckpt: str, pipeline: PipelineConfig, key: str) -> str:
    """The checkpoint into the store (manifest last) -> its URI."""
    from tasks.storage import open_store, upload_checkpoint

    location = pipeline.storage or str(Path(pipeline.work_dir) / "store")
    store = open_store(location, pipeline.s3_endpoint_url, pipeline.create_bucket)
    return upload_checkpoint(store, Path(ckpt), key)
