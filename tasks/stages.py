"""The flow's stages as Prefect tasks: each calls one ``lwq`` function.

Caching is keyed by content and by code. Every task takes the SHA-256 of what
it reads (model weight files, calibration set, method state) and the config
section that matters to it, and excludes the paths it reads them from, so
moving a folder does not invalidate a cache and changing a file does. The key
also holds the task's own source (``TASK_SOURCE``) and the code version of the
lwq modules the stage runs (``LwqCode``: their sources, transitively, and the
versions of torch and friends), so after a fix in ``lwq/quant/gptq.py`` every
stage that quantizes recomputes while calibration stays cached.

Large objects (calibration set, method state, Hessians, packed layers,
checkpoints) are written to the work folder in safetensors/JSON under names
derived from the same keys, and travel between tasks as paths; the task
results are small typed, frozen, versioned records. Retries are declared only
on the I/O tasks (upload, register).
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

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from lwq.config import LwqConfig, PipelineConfig
from lwq.method.qp import Allocation
from lwq.provenance import code_version

# The lwq modules each stage runs: their code version is part of its cache key.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "calibrate": ("lwq.calibration", "lwq.models"),
    "sensitivity": ("lwq.method.state", "lwq.models"),
    "solve": ("lwq.method.state",),
    "quantize-layer": ("lwq.method.state", "lwq.quant.layer", "lwq.loading", "lwq.pack.layer"),
    "hessians": ("lwq.quantize",),
    "layers": ("lwq.quantize",),
    "quantize-uniform-layer": (
        "lwq.method.state",
        "lwq.quant.layer",
        "lwq.loading",
        "lwq.pack.layer",
    ),
    "pack": ("lwq.quantize", "lwq.pack.layer"),
    "evaluate": ("lwq.pack.checkpoint", "lwq.eval.perplexity", "lwq.models"),
}
RESULT_VERSION = 2  # of the records below; part of every cache key


def stage_code(stage: str) -> str:
    return code_version(*STAGE_CODE[stage])


def pipeline_code() -> str:
    """The code version of the whole pipeline: part of a run's fingerprint."""
    return code_version(*sorted({m for mods in STAGE_CODE.values() for m in mods}))


@dataclass
class LwqCode(CachePolicy):
    """Cache key part: the code version of the lwq modules a stage runs."""

    stage: str = ""

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str:
        return f"{stage_code(self.stage)}-v{RESULT_VERSION}"


# Paths, the work folder and whole configs are read, never hashed.
PATHS = (
    "model_dir",
    "work",
    "calib_path",
    "state_dir",
    "hessians_dir",
    "layer_files",
    "ckpt",
    "config",
)


def cached(stage: str) -> Any:
    policy = INPUTS + TASK_SOURCE
    for name in PATHS:
        policy = policy - name  # type: ignore[operator]
    return policy + LwqCode(stage=stage)


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
    code_sha: str  # the pipeline's lwq code and library versions
    budget: float | None = None

    @property
    def run(self) -> str:
        """Identifies a finished run: the registry holds one version per value."""
        parts = [
            self.model_sha,
            self.source_sha,
            self.config_sha,
            self.eval_sha,
            self.code_sha,
            self.budget,
        ]
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


def result_settings(config: LwqConfig) -> dict[str, Any]:
    """The settings that change the checkpoint: not where things go, not the budget, and
    not where the model and the calibration text are (their contents are hashed apart):
    the same model reached by another path is the same run."""
    settings = config.model_dump(mode="json", exclude={"out", "overwrite", "pipeline", "model"})
    settings["calib"].pop("source")
    settings["method"].pop("budget")
    if config.quant.method == "lwq":
        settings.pop("quant")  # the method's grids are method.*
    else:
        settings.pop("method")  # the method's settings do not apply
    if config.quant.method == "rtn":
        settings.pop("gptq")  # RTN reads neither the calibration nor GPTQ's settings
        settings.pop("calib")
    return settings


@task(name="fingerprint")
def fingerprint(config: LwqConfig) -> Fingerprint:
    """Hash the model's weights, the calibration and evaluation texts, settings and code."""
    from lwq.hashing import file_sha256
    from lwq.models import check_model_dir
    from lwq.pack.checkpoint import weights_sha256

    needs_calib = config.quant.method != "rtn"
    config.require("model", *(["calib.source"] if needs_calib else []))
    model_dir = Path(str(config.model))
    check_model_dir(model_dir)
    data = config.pipeline.eval_data
    return Fingerprint(
        weights_sha256(model_dir),
        source_sha256(str(config.calib.source)) if needs_calib else "",
        digest(result_settings(config)),
        None if data is None else file_sha256(Path(data)),
        pipeline_code(),
    )


@dataclass(frozen=True)
class CalibrationRef:
    path: str  # the calibration set (safetensors)
    sha256: str  # of its tokens
    seconds: float
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class StateRef:
    path: str  # the method state folder (state.json, state.safetensors, hessians/)
    key: str  # content and code identity of the state
    seconds: float
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class HessiansRef:
    path: str  # the HessianStore folder
    key: str  # content and code identity of the Hessians
    seconds: float
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class Solution:
    allocation: Allocation
    order: tuple[int, ...]  # layer indices, largest first: mapped over workers, they end together
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class LayerResult:
    name: str
    path: str  # the packed layer (safetensors)
    output_error: float | None
    seconds: float
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class CheckpointRef:
    path: str  # the packed checkpoint folder
    manifest_sha256: str
    version: int = RESULT_VERSION


@dataclass(frozen=True)
class EvalReport:
    perplexity_fp: float | None
    perplexity: float | None
    bits: float
    bits_model: float
    predicted_kl: float
    seconds: float
    window: int | None = None  # tokens per perplexity window (lwq.models.context_window)
    version: int = RESULT_VERSION


@functools.lru_cache(maxsize=4)
def _state(state_dir: str, code: str, stamp: tuple[int, int]) -> Any:
    from lwq.method.state import load_state

    return load_state(Path(state_dir), expect_code=code)


def method_state(state_dir: str) -> Any:
    """The method state of ``state_dir``, read once per process and kept.

    A state folder is named by the content hash of its inputs and code and
    written once, so a layer task (thousands per model, many per worker) need
    not read it again; the file's size and time stamp guard against a folder
    rewritten, and a state of other code is refused.
    """
    from lwq.method.state import STATE_JSON, method_code_version

    st = (Path(state_dir) / STATE_JSON).stat()
    return _state(state_dir, method_code_version(), (st.st_mtime_ns, st.st_size))


def _timed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


@task(name="calibrate", cache_policy=cached("calibrate"), persist_result=True)
def calibrate(
    model_dir: str,
    work: str,
    model_sha: str,
    source_sha: str,
    calib: dict[str, Any],
    device: str = "cpu",
) -> CalibrationRef:
    """The calibration windows, saved under their content hash (``calib.source=self``:
    generated by the model on ``device``)."""
    from transformers import AutoConfig, AutoTokenizer

    from lwq.calibration import build_calibration_set
    from lwq.models import check_tokenizer, context_window

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    mcfg = AutoConfig.from_pretrained(model_dir)
    check_tokenizer(tok, int(mcfg.vocab_size), Path(model_dir))
    seq_len = context_window(mcfg, calib["seq_len"])
    cs = build_calibration_set(
        tok,
        calib["source"],
        calib["n_samples"],
        seq_len,
        calib["seed"],
        None,
        calib["temperature"],
        calib["generate_batch"],
        Path(model_dir),
        device,
    )
    path = Path(work) / "calibration" / f"{cs.sha256[:24]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    cs.save(path)
    return CalibrationRef(str(path), cs.sha256, _timed(t))


@task(name="sensitivity", cache_policy=cached("sensitivity"), persist_result=True)
def sensitivity(
    model_dir: str,
    work: str,
    calib_path: str,
    config: LwqConfig,
    model_sha: str,
    calib_sha: str,
    method: dict[str, Any],
    gptq: dict[str, Any],
) -> StateRef:
    """Hessians (to disk), rankings, cost curves and the sensitivity profile."""
    from lwq.adapters import adapter_for
    from lwq.calibration import CalibrationSet
    from lwq.method.state import prepare, save_state
    from lwq.models import load_model_dir

    t = time.perf_counter()
    key = digest([model_sha, calib_sha, method, gptq, stage_code("sensitivity")])[:24]
    out = Path(work) / "state" / key
    model, _ = load_model_dir(Path(model_dir), device=config.device)
    calib = CalibrationSet.load(Path(calib_path))
    adapter = adapter_for(model)
    state = prepare(model, adapter, calib, config, out / "hessians", progress=False)
    save_state(state, out)
    return StateRef(str(out), key, _timed(t))


@task(name="solve", cache_policy=cached("solve"), persist_result=True)
def solve(
    state_dir: str, config: LwqConfig, state_key: str, budget: float, method: dict[str, Any]
) -> Solution:
    """The QP allocation for one budget, and the order to quantize its layers in."""
    from lwq.method.state import allocate, largest_first

    state = method_state(state_dir)
    return Solution(allocate(state, config, budget), tuple(largest_first(state)))


@task(name="quantize-layer", cache_policy=cached("quantize-layer"), persist_result=True)
def quantize_layer_task(
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
    family: int = 0,
) -> LayerResult:
    """One layer at its ratio (on its base ``family`` with method.bases), packed to a file."""
    from lwq.loading import read_layer_weights
    from lwq.method.state import HessianStore
    from lwq.quant.layer import quantize_layer

    t = time.perf_counter()
    state = method_state(state_dir)
    W = read_layer_weights(Path(model_dir), [name])[name]
    H = HessianStore.open(Path(state_dir) / "hessians").get(name)
    res = quantize_layer(
        W, H, state.job(name, ratio, family), config.gptq.settings(), config.method.lwc(), True
    )
    key = [model_sha, state_key, name, ratio, family, gptq, method, stage_code("quantize-layer")]
    return _save_layer(work, key, name, res, t)


def _save_layer(work: str, key: list[Any], name: str, res: Any, start: float) -> LayerResult:
    """A quantized layer packed to WORK/layers/, named by its content and code ``key``."""
    from lwq.pack.layer import pack_layer

    path = Path(work) / "layers" / f"{digest(key)[:24]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    pack_layer(name, res.weight).save(path)
    return LayerResult(name, str(path), res.output_error, _timed(start))


@task(name="hessians", cache_policy=cached("hessians"), persist_result=True)
def hessians(
    model_dir: str, work: str, calib_path: str, config: LwqConfig, model_sha: str, calib_sha: str
) -> HessiansRef:
    """Full-precision input Hessians of every layer (what GPTQ's layers need), to disk."""
    from lwq.calibration import CalibrationSet
    from lwq.quantize import store_hessians

    t = time.perf_counter()
    key = digest([model_sha, calib_sha, config.calib.batch_size, stage_code("hessians")])[:24]
    out = Path(work) / "hessians" / key
    calib = CalibrationSet.load(Path(calib_path))
    store_hessians(Path(model_dir), calib, out, config, progress=False)
    return HessiansRef(str(out), key, _timed(t))


@task(name="layers", cache_policy=cached("layers"), persist_result=True)
def layers(model_dir: str, model_sha: str) -> tuple[str, ...]:
    """The quantizable layers, largest first: mapped over workers, they end together."""
    from lwq.quantize import layers_largest_first

    return tuple(layers_largest_first(Path(model_dir)))


@task(
    name="quantize-uniform-layer",
    cache_policy=cached("quantize-uniform-layer"),
    persist_result=True,
)
def quantize_uniform_layer_task(
    model_dir: str,
    work: str,
    hessians_dir: str | None,
    config: LwqConfig,
    model_sha: str,
    hessians_key: str | None,
    name: str,
    quant: dict[str, Any],
    gptq: dict[str, Any] | None,
) -> LayerResult:
    """One layer on the uniform grid of quant.* (RTN, or GPTQ from its Hessian), packed."""
    from lwq.loading import read_layer_weights
    from lwq.method.state import HessianStore
    from lwq.quant.layer import quantize_layer
    from lwq.quantize import plan_for

    t = time.perf_counter()
    W = read_layer_weights(Path(model_dir), [name])[name]
    H = None if hessians_dir is None else HessianStore.open(Path(hessians_dir)).get(name)
    settings = None if gptq is None else config.gptq.settings()
    res = quantize_layer(W, H, plan_for(config).job(name), settings, None, False)
    key = [model_sha, hessians_key, name, quant, gptq, stage_code("quantize-uniform-layer")]
    return _save_layer(work, key, name, res, t)


@task(name="pack", cache_policy=cached("pack"), persist_result=True)
def pack(
    model_dir: str,
    work: str,
    state_dir: str | None,
    calib_path: str | None,
    layer_files: list[LayerResult],
    config: LwqConfig,
    alloc: Allocation | None,
    layer_keys: list[Any],
) -> CheckpointRef:
    """The packed checkpoint from the quantized layers (the method's: with its state
    and allocation; RTN's and GPTQ's: without)."""
    from lwq.calibration import CalibrationSet
    from lwq.hashing import file_sha256
    from lwq.pack.checkpoint import MANIFEST
    from lwq.pack.layer import PackedLayer
    from lwq.quantize import MethodPlan, Plan, assemble_checkpoint, plan_for

    plan: Plan = (
        MethodPlan(method_state(state_dir), alloc)
        if state_dir is not None and alloc is not None
        else plan_for(config)
    )
    calib = None if calib_path is None else CalibrationSet.load(Path(calib_path))
    packed = [PackedLayer.load(Path(r.path)) for r in layer_files]
    errors = {r.name: r.output_error for r in layer_files}
    out = Path(work) / "checkpoints" / digest([*layer_keys, stage_code("pack")])[:24]
    cfg = config.model_copy(update={"overwrite": True})
    assemble_checkpoint(Path(model_dir), out, packed, plan, calib, cfg, errors)
    return CheckpointRef(str(out), file_sha256(out / MANIFEST))


@task(name="evaluate", cache_policy=cached("evaluate"), persist_result=True)
def evaluate(
    ckpt: str,
    model_dir: str,
    config: LwqConfig,
    manifest_sha: str,
    eval_sha: str | None,
) -> EvalReport:
    """Perplexity before and after on ``pipeline.eval_data``, and the measured bits."""
    from lwq.eval.perplexity import perplexity_of_text
    from lwq.models import context_window, load_model_dir
    from lwq.pack.checkpoint import load_quantized
    from lwq.textio import read_text

    t = time.perf_counter()
    qmodel, tok, manifest = load_quantized(Path(ckpt), device=config.device)
    ppl_fp = ppl = None
    window = context_window(qmodel.config)
    data = config.pipeline.eval_data
    if data is not None:
        text = read_text(Path(data), "pipeline.eval_data")
        ppl = perplexity_of_text(qmodel, tok, text, window, batch_size=8).perplexity
        del qmodel
        fp, _ = load_model_dir(Path(model_dir), device=config.device)
        ppl_fp = perplexity_of_text(fp, tok, text, window, batch_size=8).perplexity
    alloc = manifest.allocation
    return EvalReport(
        ppl_fp,
        ppl,
        manifest.bits.from_bytes,
        manifest.bits.from_model,
        float("nan") if alloc is None else alloc.predicted_kl,
        _timed(t),
        window if data is not None else None,
    )


@task(name="upload", retries=3, retry_delay_seconds=[1, 4, 16])
def upload(ckpt: str, pipeline: PipelineConfig, key: str) -> str:
    """The checkpoint into the store (manifest last) -> its URI."""
    from tasks.storage import open_store, upload_checkpoint

    location = pipeline.storage or str(Path(pipeline.work_dir) / "store")
    store = open_store(location, pipeline.s3_endpoint_url, pipeline.create_bucket)
    return upload_checkpoint(store, Path(ckpt), key)
