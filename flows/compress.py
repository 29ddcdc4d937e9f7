"""The flows: wiring only. calibrate -> sensitivity -> solve -> quantize layers -> pack
-> evaluate -> upload -> register.

``compress`` takes one model and one budget, ``sweep`` several budgets sharing
calibration and sensitivity; both take the ``LwqConfig`` the CLI uses. Every
stage is a cached task (``tasks.stages``), so a rerun after a crash or with a
new budget recomputes only what changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.context import get_run_context

from lwq.config import LwqConfig
from lwq.zoofile import check_run, uniform_width
from tasks.runners import task_runner_for
from tasks.stages import (
    EvalReport,
    Fingerprint,
    calibrate,
    evaluate,
    fingerprint,
    hessians,
    layers,
    pack,
    quantize_layer_task,
    quantize_uniform_layer_task,
    sensitivity,
    solve,
    upload,
)
from tasks.tracking import Registered, find_registered, register


@dataclass(frozen=True)
class CompressResult:
    budget: float
    checkpoint: str  # local folder
    uri: str  # where it is stored
    report: EvalReport
    registered: Registered
    seconds: dict[str, float]
    flow_run_id: str
    # Stage -> "cached" or "computed" ("3/14 cached" for the layers): what the
    # caches served, so a user sees what a rerun recomputed and why it took long.
    cache: dict[str, str]


def _flow_run_id() -> str:
    ctx: Any = get_run_context()
    return str(ctx.flow_run.id)


def _cached_call(cache: dict[str, str], task: Any, *args: Any) -> Any:
    """Call ``task`` and note whether its result came from the cache."""
    state = task(*args, return_state=True)
    cache[task.name] = "cached" if state.name == "Cached" else "computed"
    return state.result()


def _mapped(cache: dict[str, str], task: Any, *args: Any) -> tuple[list[Any], float]:
    """Map ``task`` over the layers; its results, seconds, and how many the cache served."""
    t = time.perf_counter()
    futures = task.map(*args)
    futures.wait()
    hits = sum(f.state.name == "Cached" for f in futures)
    cache[task.name] = f"{hits}/{len(futures)} cached"
    return futures.result(), time.perf_counter() - t


@dataclass(frozen=True)
class Prepared:
    calib_path: str
    calib_sha: str
    state_dir: str
    state_key: str
    seconds: dict[str, float]
    cache: dict[str, str]


def _calibrate(config: LwqConfig, fp: Fingerprint, cache: dict[str, str]) -> Any:
    calib = config.calib.model_dump(mode="json", exclude={"mode", "batch_size"})
    args = (str(config.model), config.pipeline.work_dir, fp.model_sha, fp.source_sha, calib)
    return _cached_call(cache, calibrate, *args, config.device)


def _prepare(config: LwqConfig, fp: Fingerprint) -> Prepared:
    model_dir, work = str(config.model), config.pipeline.work_dir
    cache: dict[str, str] = {}
    calib = _calibrate(config, fp, cache)
    state = _cached_call(
        cache,
        sensitivity,
        model_dir,
        work,
        calib.path,
        config,
        fp.model_sha,
        calib.sha256,
        config.method.model_dump(mode="json", exclude={"budget"}),
        config.gptq.model_dump(mode="json"),
    )
    seconds = {"calibrate": calib.seconds, "sensitivity": state.seconds}
    return Prepared(calib.path, calib.sha256, state.path, state.key, seconds, cache)


def _compress_budget(
    config: LwqConfig, budget: float, fp: Fingerprint, prep: Prepared
) -> CompressResult:
    model_dir, work = str(config.model), config.pipeline.work_dir
    method = config.method.model_dump(mode="json", exclude={"budget"})
    gptq = config.gptq.model_dump(mode="json")
    cache = dict(prep.cache)
    t = time.perf_counter()
    solution = _cached_call(cache, solve, prep.state_dir, config, prep.state_key, budget, method)
    alloc, order = solution.allocation, solution.order
    solve_s = time.perf_counter() - t
    layers, quantize_s = _mapped(
        cache,
        quantize_layer_task,
        unmapped(model_dir),
        unmapped(work),
        unmapped(prep.state_dir),
        unmapped(config),
        unmapped(fp.model_sha),
        unmapped(prep.state_key),
        [alloc.names[i] for i in order],
        [alloc.ratios[i] for i in order],
        unmapped(gptq),
        unmapped(method),
        [alloc.families[i] if alloc.families else 0 for i in order],
    )
    keys = [fp.model_sha, prep.state_key, list(alloc.ratios), list(alloc.families), gptq, method]
    packed = _cached_call(
        cache, pack, model_dir, work, prep.state_dir, prep.calib_path, layers, config, alloc, keys
    )
    seconds = {**prep.seconds, "solve": solve_s, "quantize": quantize_s}
    return _finish(config, budget, fp.for_budget(budget), packed, seconds, cache)


def _finish(
    config: LwqConfig,
    bits: float,
    run_fp: Fingerprint,
    packed: Any,
    seconds: dict[str, float],
    cache: dict[str, str],
) -> CompressResult:
    """Evaluate, upload and register a packed checkpoint."""
    model_dir, ckpt = str(config.model), packed.path
    report = _cached_call(
        cache, evaluate, ckpt, model_dir, config, packed.manifest_sha256, run_fp.eval_sha
    )
    key = f"{Path(model_dir).name}/{run_fp.run}"
    t = time.perf_counter()
    uri = upload(ckpt, config.pipeline, key)
    seconds = {**seconds, "evaluate": report.seconds, "upload": time.perf_counter() - t}
    flow_run_id = _flow_run_id()
    registered = register(config, run_fp, ckpt, uri, key, report, seconds, flow_run_id)
    return CompressResult(bits, ckpt, uri, report, registered, seconds, flow_run_id, cache)


def _compress_uniform(config: LwqConfig, fp: Fingerprint) -> CompressResult:
    """RTN or GPTQ: every layer on the grid of quant.*, one task per layer."""
    model_dir, work = str(config.model), config.pipeline.work_dir
    cache: dict[str, str] = {}
    seconds: dict[str, float] = {}
    calib_path = hess_dir = hess_key = None
    gptq = None
    if config.quant.method == "gptq":
        gptq = config.gptq.model_dump(mode="json")
        calib = _calibrate(config, fp, cache)
        hess = _cached_call(
            cache, hessians, model_dir, work, calib.path, config, fp.model_sha, calib.sha256
        )
        seconds = {"calibrate": calib.seconds, "hessians": hess.seconds}
        calib_path, hess_dir, hess_key = calib.path, hess.path, hess.key
    quant = config.quant.model_dump(mode="json")
    names = layers(model_dir, fp.model_sha)
    done, seconds["quantize"] = _mapped(
        cache,
        quantize_uniform_layer_task,
        unmapped(model_dir),
        unmapped(work),
        unmapped(hess_dir),
        unmapped(config),
        unmapped(fp.model_sha),
        unmapped(hess_key),
        list(names),
        unmapped(quant),
        unmapped(gptq),
    )
    keys = [fp.model_sha, hess_key, quant, gptq]
    packed = _cached_call(cache, pack, model_dir, work, None, calib_path, done, config, None, keys)
    return _finish(config, float(config.quant.bits), fp, packed, seconds, cache)


def _with_base(config: LwqConfig, budgets: list[float]) -> LwqConfig:
    """An unset method.lo_bits fixed for ``budgets``, so the caches' keys name the base."""
    if config.quant.method != "lwq":
        return config
    return config.model_copy(update={"method": config.method.for_budgets(budgets)})


@flow(name="lwq-compress", validate_parameters=False)
def compress(config: LwqConfig) -> CompressResult:
    """One model at one budget (``method.budget``), or on one uniform grid (rtn, gptq)."""
    if config.quant.method != "lwq":
        return _compress_uniform(config, fingerprint(config))
    config = _with_base(config, [config.method.budget])
    fp = fingerprint(config)
    return _compress_budget(config, config.method.budget, fp, _prepare(config, fp))


@flow(name="lwq-sweep", validate_parameters=False)
def sweep(config: LwqConfig, budgets: list[float]) -> list[CompressResult]:
    """One model, several budgets: calibration and sensitivity computed once."""
    config = _with_base(config, budgets)
    fp = fingerprint(config)
    prep = _prepare(config, fp)
    return [_compress_budget(config, b, fp, prep) for b in budgets]


def _jobs(config: LwqConfig, budgets: list[float]) -> list[tuple[LwqConfig, list[float]]]:
    """The flow runs of a checked config: rtn/gptq one per width, lwq one for all budgets."""
    if config.quant.method != "lwq":
        return [(uniform_width(config, b), [b]) for b in budgets]
    return [(_with_base(config, budgets), budgets)]


def already_registered(config: LwqConfig, budgets: list[float]) -> list[Registered | None]:
    """Per width, the version a finished run of ``config`` registered, if any.

    ``config`` is checked (``check_run``); the fingerprints are the ones the
    flows compute, so a width found here is one a run would not register again.
    """
    out: list[Registered | None] = []
    for cfg, widths in _jobs(config, budgets):
        fp = fingerprint.fn(cfg)
        for b in widths:
            out.append(find_registered(cfg, fp if cfg.quant.method != "lwq" else fp.for_budget(b)))
    return out


def run_checked(config: LwqConfig, budgets: list[float] | None = None) -> list[CompressResult]:
    """``compress`` (one budget or width) or ``sweep``, for a config ``check_run`` passed."""
    options: dict[str, Any] = {
        "task_runner": task_runner_for(config.pipeline),
        # Task results (and so the caches) live with the rest of the work.
        "result_storage": Path(config.pipeline.work_dir).resolve() / "results",
    }
    if config.quant.method != "lwq":  # one flow run per width; the Hessians are cached
        configs = [config] if not budgets else [c for c, _ in _jobs(config, budgets)]
        return [compress.with_options(**options)(c) for c in configs]
    if budgets and len(budgets) > 1:
        return sweep.with_options(**options)(config, budgets)
    if budgets:
        method = config.method.model_copy(update={"budget": budgets[0]})
        config = config.model_copy(update={"method": method})
    return [compress.with_options(**options)(config)]


def run(config: LwqConfig, budgets: list[float] | None = None) -> list[CompressResult]:
    """``compress`` (one budget) or ``sweep`` with the configured task runner.

    Settings that the workflow would ignore, fractional rtn/gptq widths and
    budgets out of the method's reach are refused first (``check_run``); a zoo
    model gets the zoo's calibration and validation slices as defaults.
    """
    return run_checked(check_run(config, budgets), budgets)
