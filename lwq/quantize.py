"""The quantization driver: one block loop for every method, one packed checkpoint.

The model's blocks are loaded one at a time (``lwq.loading``), their layers'
Hessians collected (``lwq.stats``), and every layer goes through the one
``lwq.quant.layer.quantize_layer`` with the ``LayerJob`` a ``Plan`` gives it:
a uniform grid (RTN, GPTQ) or the method's ratio (``MethodPlan``). Each layer
is written back so that later blocks see it in sequential mode, packed
(``lwq.pack``), and the block's file written before the next block is read.
``assemble_checkpoint`` writes the same checkpoint from layers quantized one
by one elsewhere (the workflow's parallel layer tasks).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lwq.adapters import ModelAdapter, adapter_for
from lwq.calibration import CalibrationSet, build_calibration_set, needs_model
from lwq.config import LwqConfig, resolve_inputs
from lwq.errors import ConfigError, LwqError
from lwq.loading import LazyCausalLM, SafetensorsIndex
from lwq.method.cost import reachable_bits
from lwq.method.qp import Allocation
from lwq.method.state import (
    HessianStore,
    MethodState,
    allocate,
    allocation_report,
    by_work,
    prepare,
)
from lwq.models import (
    check_model_dir,
    check_tokenizer,
    context_window,
    empty_model,
    load_model_dir,
)
from lwq.pack.checkpoint import CheckpointWriter, check_output_dir
from lwq.pack.layer import PackedLayer, pack_layer
from lwq.pack.manifest import AllocationReport, CalibrationInfo, Manifest, QuantizationInfo
from lwq.provenance import code_version
from lwq.quant.grid import GridSpec
from lwq.quant.layer import LayerJob, quantize_layer
from lwq.stats import iter_block_stats


def driver_code_version() -> str:
    """The code version of everything a quantization run executes."""
    return code_version("lwq.quantize")


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    gptq_loss: float | None  # GPTQ's proxy loss; None for RTN
    output_error: float | None  # relative output error, when the plan measures it
    seconds: float


@dataclass(frozen=True)
class QuantizeReport:
    out: Path
    manifest: Manifest
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)

    @property
    def bits(self) -> float:
        return self.manifest.bits.from_bytes


class Plan(Protocol):
    """What each layer gets: the seam between the driver and a method."""

    @property
    def method(self) -> str: ...

    @property
    def measure_error(self) -> bool:
        """Report each layer's relative output error."""
        ...

    def job(self, name: str) -> LayerJob: ...

    def allocation(self, errors: dict[str, float | None]) -> AllocationReport | None: ...


@dataclass(frozen=True)
class UniformPlan:
    """RTN or GPTQ: every layer on one grid."""

    method: str
    spec: GridSpec
    measure_error: bool = False

    def job(self, name: str) -> LayerJob:
        return LayerJob(name, self.spec)

    def allocation(self, errors: dict[str, float | None]) -> AllocationReport | None:
        return None


@dataclass(frozen=True)
class MethodPlan:
    """The layer-wise method: each layer at its ratio of the allocation."""

    state: MethodState
    alloc: Allocation
    method: str = "lwq"
    measure_error: bool = True

    def job(self, name: str) -> LayerJob:
        i = self.alloc.names.index(name)
        family = self.alloc.families[i] if self.alloc.families else 0
        return self.state.job(name, self.alloc.ratios[i], family)

    def allocation(self, errors: dict[str, float | None]) -> AllocationReport | None:
        return allocation_report(self.state, self.alloc, errors)


def plan_for(
    config: LwqConfig, state: MethodState | None = None, budget: float | None = None
) -> Plan:
    """The plan of ``config``'s method (the method needs its prepared ``state``)."""
    q = config.quant
    if q.method != "lwq":
        return UniformPlan(q.method, GridSpec(q.bits, q.group_size, q.symmetric))
    if state is None:
        raise ValueError("the layer-wise method needs its prepared MethodState")
    return MethodPlan(state, allocate(state, config, budget))


def quantization_info(
    config: LwqConfig, calib: CalibrationSet | None, mode: str | None
) -> QuantizationInfo:
    info = None
    if calib is not None:
        info = CalibrationInfo(
            source=calib.source,
            n_samples=calib.n_samples,
            seq_len=calib.seq_len,
            seed=calib.seed,
            sha256=calib.sha256,
        )
    return QuantizationInfo(
        method=config.quant.method,
        mode=mode,  # type: ignore[arg-type]
        settings=config.model_dump(mode="json", exclude={"pipeline"}),
        calibration=info,
        code_version=driver_code_version(),
    )


def unquantized_tensors(
    index: SafetensorsIndex, adapter: ModelAdapter, quantized: set[str]
) -> dict[str, torch.Tensor]:
    """Every tensor of the base checkpoint that is not a quantized weight, model-named."""
    out = {}
    with index.reading():
        for key in index.weight_map:
            name = adapter.model_key(key)
            if name.endswith(".weight") and name[: -len(".weight")] in quantized:
                continue
            out[name] = index.get(key)
    return out


def quantize_model(
    model_dir: Path,
    out: Path,
    plan: Plan,
    calib: CalibrationSet | None,
    config: LwqConfig,
    progress: bool = True,
    hessians: HessianStore | None = None,
) -> QuantizeReport:
    """The block loop: every layer of every block through ``quantize_layer``.

    With ``hessians`` (parallel mode: the full-precision Hessians that
    ``prepare`` stored) no calibration forward pass is run at all.
    """
    t0 = time.perf_counter()
    check_output_dir(out, config.overwrite)
    gptq = None if plan.method == "rtn" else config.gptq.settings()
    lwc = config.method.lwc() if plan.method == "lwq" else None
    mode = config.calib.block_mode
    source = LazyCausalLM(model_dir, device=config.device)
    adapter = source.adapter
    layers: list[LayerReport] = []
    block_seconds: list[float] = []
    try:
        with CheckpointWriter(out, model_dir, config.overwrite) as writer:
            tb = time.perf_counter()
            if hessians is not None and mode != "parallel":
                raise ValueError("stored Hessians are full-precision ones: parallel mode only")
            walk = None if hessians is not None else calib
            # GPTQ's "true sequential" order within a block: each input group's
            # Hessians taken after the groups before it are quantized.
            true_sequential = (
                config.gptq.true_sequential and mode == "sequential" and walk is not None
            )
            steps = iter_block_stats(source, walk, mode, config.calib.batch_size, progress)
            for step in steps:
                packed: dict[str, PackedLayer] = {}
                for k, group in enumerate(step.input_groups()):  # in the block's order
                    refresh = true_sequential and k > 0
                    Hs = step.current_hessians(group) if refresh else step.hessians
                    for name in group:
                        mod = step.layers[name]
                        t = time.perf_counter()
                        W = adapter.read_weight(mod)  # (d_out, d_in) float32
                        H = hessians.get(name) if hessians is not None else Hs.get(name)
                        res = quantize_layer(W, H, plan.job(name), gptq, lwc, plan.measure_error)
                        adapter.write_weight(mod, res.weight.dequantize())  # later layers see it
                        packed[name] = pack_layer(name, res.weight)
                        layers.append(
                            LayerReport(
                                name,
                                res.weight.shape,
                                res.gptq_loss,
                                res.output_error,
                                time.perf_counter() - t,
                            )
                        )
                writer.add_block(step.index, [packed[name] for name in step.layers])
                block_seconds.append(time.perf_counter() - tb)
                tb = time.perf_counter()
            names = {r.name for r in layers}
            writer.add_rest(unquantized_tensors(source.index, adapter, names))
            manifest = writer.finish(
                source.model.config.to_dict(),
                quantization_info(config, calib, None if calib is None else mode),
                plan.allocation({r.name: r.output_error for r in layers}),
            )
    finally:
        source.close()
    return QuantizeReport(out.resolve(), manifest, time.perf_counter() - t0, layers, block_seconds)


def layers_largest_first(model_dir: Path) -> list[str]:
    """The quantizable layers of the model in ``model_dir``, largest first (``by_work``)."""
    from transformers import AutoConfig

    skeleton = empty_model(AutoConfig.from_pretrained(model_dir))  # meta tensors
    adapter = adapter_for(skeleton)
    named = [(name, adapter.shape(module)) for name, module in adapter.iter_layers(skeleton)]
    return [named[i][0] for i in by_work([shape for _, shape in named])]


def store_hessians(
    model_dir: Path, calib: CalibrationSet, out: Path, config: LwqConfig, progress: bool = True
) -> HessianStore:
    """The full-precision input Hessians of every layer, written to ``out``.

    What GPTQ needs to quantize layers independently (parallel mode, e.g. one
    task per layer in a flow); blocks are loaded lazily, one at a time.
    """
    source = LazyCausalLM(model_dir, device=config.device)
    store = HessianStore(out)
    try:
        for step in iter_block_stats(source, calib, "parallel", config.calib.batch_size, progress):
            store.put_block(step)
    finally:
        source.close()
    store.close()
    return store


def assemble_checkpoint(
    model_dir: Path,
    out: Path,
    packed: list[PackedLayer],
    plan: Plan,
    calib: CalibrationSet | None,
    config: LwqConfig,
    errors: dict[str, float | None],
) -> Manifest:
    """A checkpoint from layers quantized independently (parallel mode, e.g. by a flow)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir)
    skeleton = empty_model(model_config)  # meta tensors: the layer names, no weights
    adapter = adapter_for(skeleton)
    blocks: dict[int, list[PackedLayer]] = {}
    order = {name: i for i, name in enumerate(adapter.layer_names(skeleton))}
    unknown = [p.name for p in packed if p.name not in order]
    if unknown:
        raise LwqError(f"{unknown[0]} is not a quantizable layer of {model_dir}")
    missing = sorted(set(order) - {p.name for p in packed}, key=order.__getitem__)
    if missing:
        raise LwqError(f"{len(missing)} layers were not quantized, e.g. {missing[0]}")
    for p in sorted(packed, key=lambda p: order[p.name]):  # model order within each block
        blocks.setdefault(adapter.block_index(p.name), []).append(p)
    index = SafetensorsIndex(model_dir)
    with CheckpointWriter(out, model_dir, config.overwrite) as writer:
        for i in sorted(blocks):
            writer.add_block(i, blocks[i])
        writer.add_rest(unquantized_tensors(index, adapter, set(order)))
        return writer.finish(
            model_config.to_dict(),
            quantization_info(config, calib, None if calib is None else "parallel"),
            plan.allocation(errors),
        )


def calibration_set(
    config: LwqConfig, tokenizer: Any, model_config: Any, model: Any = None
) -> CalibrationSet:
    """The configured calibration windows (seq_len by ``context_window``).

    ``calib.source=self`` generates them with ``model``, loaded from
    ``config.model`` when not given."""
    c = config.calib
    config.require("calib.source", *(["model"] if needs_model(c.source) else []))
    seq_len = context_window(model_config, c.seq_len)
    return build_calibration_set(
        tokenizer,
        str(c.source),
        c.n_samples,
        seq_len,
        c.seed,
        model,
        c.temperature,
        c.generate_batch,
        None if config.model is None else Path(str(config.model)),
        config.device,
    )


@dataclass(frozen=True)
class Prepared:
    """What every budget of the method shares: the calibration set and the state."""

    calib: CalibrationSet
    state: MethodState


def check_budgets(model_dir: Path, config: LwqConfig, budgets: list[float]) -> LwqConfig:
    """``config`` with the method's base fixed for ``budgets`` (``method.lo_bits``
    when unset: ``MethodConfig.for_budgets``); a budget its grids cannot reach is
    refused, before any work.

    Bounds come from the layers' shapes alone (``reachable_bits``); the exact
    range is checked again once the saliency rankings are known.
    """
    from transformers import AutoConfig

    check_model_dir(model_dir)
    m = config.method.for_budgets(budgets)
    config = config.model_copy(update={"method": m})
    model = empty_model(AutoConfig.from_pretrained(model_dir))
    adapter = adapter_for(model)
    shapes = [adapter.shape(module) for _, module in adapter.iter_layers(model)]
    lo_grids, hi = m.base_grids(), m.grids()[1]
    low = reachable_bits(shapes, lo_grids[0], hi, m.r_max, m.structure)[0]
    high = reachable_bits(shapes, lo_grids[-1], hi, m.r_max, m.structure)[1]
    base = f"method.lo_bits={lo_grids[0].bits}"
    for b in budgets:
        if b < low:
            raise ConfigError(
                f"method.budget={b:g} is below the {low:.3f} bits per weight of every weight "
                f"at {base} (group {m.group_size}): raise the budget, or "
                "lower method.lo_bits or use a larger method.group_size"
            )
        if b > high:
            raise ConfigError(
                f"method.budget={b:g} is above the at most {high:.3f} bits per weight reachable "
                f"with method.r_max={m.r_max:g} of the weights at method.hi_bits={m.hi_bits}: "
                f"raise method.r_max (--r-max) or method.lo_bits (--lo-bits)"
            )
    return config


def prepare_method(
    model: Any,
    tokenizer: Any,
    config: LwqConfig,
    progress: bool = True,
    hessians: Path | None = None,
) -> Prepared:
    """The calibration set and the method's state of a full-precision ``model``
    (with ``hessians``, its input Hessians are kept there)."""
    calib = calibration_set(config, tokenizer, model.config, model)
    state = prepare(model, adapter_for(model), calib, config, hessians, progress)
    return Prepared(calib, state)


def quantize(config: LwqConfig, progress: bool = True) -> QuantizeReport:
    """Quantize ``config.model`` into ``config.out`` with its method; what was measured."""
    t0 = time.perf_counter()
    config.check_for("quantize")
    config = resolve_inputs(config)
    config.require("model", "out")
    if config.quant.method != "rtn":
        config.require("calib.source")
    model_dir, out = Path(str(config.model)), Path(str(config.out))
    check_model_dir(model_dir)
    check_output_dir(out, config.overwrite)  # before any expensive work
    calib, state, store = None, None, None
    work = tempfile.TemporaryDirectory(prefix="lwq-hessians-")
    if config.quant.method == "lwq":
        config = check_budgets(model_dir, config, [config.method.budget])
        # Parallel mode quantizes from the full-precision Hessians the method
        # computes anyway: kept on disk, they save a second calibration pass.
        keep = Path(work.name) if config.calib.block_mode == "parallel" else None
        model, tokenizer = load_model_dir(model_dir, device=config.device)
        prep = prepare_method(model, tokenizer, config, progress, keep)
        del model
        calib, state = prep.calib, prep.state
        store = None if keep is None else HessianStore.open(keep)
    elif config.quant.method == "gptq":
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_config = AutoConfig.from_pretrained(model_dir)
        check_tokenizer(tokenizer, int(model_config.vocab_size), model_dir)
        calib = calibration_set(config, tokenizer, model_config)
    plan = plan_for(config, state)
    report = quantize_model(model_dir, out, plan, calib, config, progress, store)
    work.cleanup()
    return QuantizeReport(
        report.out, report.manifest, time.perf_counter() - t0, report.layers, report.block_seconds
    )
