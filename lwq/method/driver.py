"""``--method lwq`` end to end: prepare once, then allocate and quantize per budget.

``prepare`` computes what depends only on the model, the calibration set, the
scoring and the grids: full-precision Hessians, saliency rankings, exact cost
curves and the sensitivity profile (``MethodState``). ``allocate`` solves the
QP for one budget; ``quantize_allocation`` quantizes every layer at its ratio
(one mixed-precision GPTQ pass per layer, masks from the full-precision
saliency so the bytes are the ones the cost model counted) and writes the
packed checkpoint with its allocation report. A sweep calls ``prepare`` once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.config import LwqConfig
from lwq.errors import LwqError
from lwq.loading import LazyCausalLM
from lwq.method.cost import LayerCost, layer_cost
from lwq.method.fisher import fisher_diagonal
from lwq.method.layer import quantize_at_ratio
from lwq.method.qp import Allocation, SensitivityProfile, solve_allocation, total_bits
from lwq.method.saliency import ranking, saliency
from lwq.method.sensitivity import ProbeSettings, sensitivity_profile
from lwq.pack.checkpoint import CheckpointWriter, check_output_dir
from lwq.pack.layer import PackedLayer, pack_layer
from lwq.quant.gptq import GPTQSettings
from lwq.quant.grid import GridSpec
from lwq.quant.lwc import LWCSettings
from lwq.quant.types import QuantizedWeight
from lwq.stats import InMemoryCausalLM, iter_block_stats

log = logging.getLogger(__name__)

# safetensors header and metadata of one block file (136-152 bytes measured),
# reserved from the budget so that the bits measured from the files meet it.
HEADER_ALLOWANCE_BYTES = 160
# Below this many calibration sequences the profile's rank correlation with the
# measured KL degrades visibly (benchmarks/method.py runs 128).
MIN_PROFILE_SEQUENCES = 32


@dataclass(frozen=True)
class MethodState:
    names: tuple[str, ...]
    hessians: dict[str, torch.Tensor]  # full-precision input Hessians
    orders: dict[str, torch.Tensor]  # saliency rankings (flat indices, best first)
    costs: tuple[LayerCost, ...]
    profile: SensitivityProfile
    lo: GridSpec
    hi: GridSpec
    n_blocks: int
    seconds: dict[str, float]
    # Layer indices that ``method.ties`` constrains to one ratio, per mode.
    tie_groups: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
    version: int = 1

    def ties(self, mode: str) -> tuple[tuple[int, ...], ...]:
        return dict(self.tie_groups).get(mode, ())


def tie_groups(
    names: tuple[str, ...], adapter: ModelAdapter
) -> tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]:
    """Groups of layer indices sharing an input (q/k/v, gate/up) and sharing a block."""
    by_input: dict[tuple[str, int], list[int]] = {}
    by_block: dict[str, list[int]] = {}
    prefix = adapter.blocks + "."
    for i, name in enumerate(names):
        block, suffix = name[len(prefix) :].split(".", 1)
        gi = next(k for k, grp in enumerate(adapter.input_groups) if suffix in grp)
        by_input.setdefault((block, gi), []).append(i)
        by_block.setdefault(block, []).append(i)
    keep = lambda groups: tuple(tuple(g) for g in groups if len(g) > 1)  # noqa: E731
    return (("inputs", keep(by_input.values())), ("block", keep(by_block.values())))


def lwc_settings(config: LwqConfig) -> LWCSettings | None:
    m = config.method
    return LWCSettings(steps=m.lwc_steps) if m.hi_refine == "lwc" else None


def grids(config: LwqConfig) -> tuple[GridSpec, GridSpec]:
    m = config.method
    return GridSpec(m.lo_bits, m.group_size), GridSpec(m.hi_bits, m.group_size)


def gptq_settings(config: LwqConfig) -> GPTQSettings:
    g = config.gptq
    return GPTQSettings(g.block_size, g.damp, g.act_order, g.static_groups)


def prepare(
    model: Any,
    adapter: ModelAdapter,
    calib: CalibrationSet,
    config: LwqConfig,
    progress: bool = True,
) -> MethodState:
    """Hessians, rankings, cost curves and the sensitivity profile of ``model``."""
    m = config.method
    lo, hi = grids(config)
    seconds: dict[str, float] = {}
    n_layers = len(adapter.layer_names(model))
    if calib.n_samples < MIN_PROFILE_SEQUENCES:
        log.warning(
            "calibration too small: the output-Fisher estimate of the sensitivity profile "
            "had %d sequences (%d tokens) for %d layers; use at least %d (calib.n_samples)",
            calib.n_samples,
            calib.n_samples * calib.seq_len,
            n_layers,
            MIN_PROFILE_SEQUENCES,
        )
    t = time.perf_counter()
    hessians: dict[str, torch.Tensor] = {}
    source = InMemoryCausalLM(model, adapter)
    for step in iter_block_stats(source, calib, "parallel", config.calib.batch_size, progress):
        hessians.update(step.hessians)
    seconds["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    modules = dict(adapter.iter_layers(model))
    names = tuple(modules)
    fisher = fisher_diagonal(model, adapter, calib, progress) if m.scoring == "fisher" else {}
    orders, costs = {}, []
    for name in names:
        W = adapter.read_weight(modules[name])
        scores = saliency(
            W, hessians[name], m.scoring, fisher.get(name), damp=config.gptq.damp, name=name
        )
        orders[name] = ranking(scores)
        costs.append(layer_cost(name, orders[name], (W.shape[0], W.shape[1]), lo, hi))
    seconds["saliency"] = time.perf_counter() - t
    t = time.perf_counter()
    probe_gptq = gptq_settings(config) if m.probe_quantizer == "gptq" else None

    def probe(name: str, r: float) -> torch.Tensor:
        W = adapter.read_weight(modules[name])
        qw = quantize_at_ratio(W, hessians[name], orders[name], r, lo, hi, probe_gptq, name)
        return qw.dequantize()

    profile = sensitivity_profile(
        model,
        adapter,
        calib,
        probe,
        list(names),
        ProbeSettings(
            m.r_max,
            m.sketch_dim,
            config.calib.seed,
            config.calib.batch_size,
            m.r_mid if m.curve == "power" else None,
        ),
        progress,
    )
    seconds["sensitivity"] = time.perf_counter() - t
    n_blocks = len(adapter.get_blocks(model))
    return MethodState(
        names,
        hessians,
        orders,
        tuple(costs),
        profile,
        lo,
        hi,
        n_blocks,
        seconds,
        tie_groups(names, adapter),
    )


def allocate(state: MethodState, config: LwqConfig, budget: float | None = None) -> Allocation:
    m = config.method
    budget = m.budget if budget is None else budget
    n = sum(c.n for c in state.costs)
    reserve = state.n_blocks * HEADER_ALLOWANCE_BYTES * 8 / n
    return solve_allocation(
        state.profile,
        state.costs,
        budget,
        m.objective,
        m.solver,
        ties=state.ties(m.ties),
        iterations=4,
        tol=m.solver_tol,
        overhead=reserve,
    )


def largest_first(state: MethodState) -> list[int]:
    """Layer indices by decreasing quantization work (d_in^2 (d_out + d_in / 3): the
    inverse Hessian and the column sweep), so parallel workers finish together."""
    work = [c.shape[1] ** 2 * (c.shape[0] + c.shape[1] / 3) for c in state.costs]
    return sorted(range(len(work)), key=lambda i: (-work[i], i))


def fixed_allocation(state: MethodState, ratio: float) -> Allocation:
    """Every layer at ``ratio`` whatever it costs (e.g. SqueezeLLM's 0.45 % in float16)."""
    n = sum(c.n for c in state.costs)
    reserve = state.n_blocks * HEADER_ALLOWANCE_BYTES * 8 / n
    ratios = tuple(ratio for _ in state.names)
    return Allocation(
        names=state.names,
        ratios=ratios,
        objective="fixed",
        budget=float("nan"),
        bits=total_bits(state.costs, ratios) / n + reserve,
        predicted_loss=state.profile.predicted_loss(ratios),
        solver="none",
        seconds=0.0,
        iterations=0,
    )


def allocation_report(
    state: MethodState, alloc: Allocation, output_error: dict[str, float]
) -> dict[str, Any]:
    per_layer = state.profile.per_layer_loss(alloc.ratios)
    layers = []
    for i, (name, r) in enumerate(zip(alloc.names, alloc.ratios, strict=True)):
        cost = state.costs[i]
        layers.append(
            {
                "name": name,
                "ratio": r,
                "n_hi": cost.n_hi(r),
                "bits_per_weight": cost.bits(r) / cost.n,
                "predicted_loss": float(per_layer[i]),
                "output_error": output_error.get(name),
            }
        )
    return {
        "objective": alloc.objective,
        "budget": alloc.budget,
        "bits_cost_model": alloc.bits,
        "predicted_kl": alloc.predicted_loss,
        "solver": alloc.solver,
        "solve_seconds": alloc.seconds,
        "layers": layers,
        "profile": {
            "r_max": state.profile.r_max,
            "n_tokens": state.profile.n_tokens,
            **dict(state.profile.meta),
        },
    }


def quantize_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    state: MethodState,
    name: str,
    ratio: float,
    settings: GPTQSettings,
    lwc: LWCSettings | None = None,
) -> tuple[QuantizedWeight, float]:
    """One layer at its ratio, and its relative output error tr(dW H dW^T) / tr(W H W^T)."""
    qw = quantize_at_ratio(W, H, state.orders[name], ratio, state.lo, state.hi, settings, name, lwc)
    dW = W - qw.dequantize()
    return qw, float(((dW @ H) * dW).sum() / ((W @ H) * W).sum())


def _quantization_meta(config: LwqConfig, calib: CalibrationSet, mode: str) -> dict[str, Any]:
    return {
        "method": "lwq",
        "mode": mode,
        "settings": config.model_dump(mode="json"),
        "calibration": {
            "source": calib.source,
            "n_samples": calib.n_samples,
            "seq_len": calib.seq_len,
            "seed": calib.seed,
            "sha256": calib.sha256,
        },
    }


def write_packed_checkpoint(
    model_dir: Path,
    out: Path,
    packed: list[PackedLayer],
    state: MethodState,
    alloc: Allocation,
    calib: CalibrationSet,
    config: LwqConfig,
    output_error: dict[str, float],
) -> dict[str, Any]:
    """A checkpoint from layers quantized independently (parallel mode, e.g. by a flow)."""
    from transformers import AutoConfig

    from lwq.adapters import adapter_for
    from lwq.loading import SafetensorsIndex
    from lwq.quantize import unquantized_tensors

    model_config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(model_config.model_type)
    by_name = {p.name: p for p in packed}
    missing = [n for n in state.names if n not in by_name]
    if missing:
        raise LwqError(f"{len(missing)} layers were not quantized, e.g. {missing[0]}")
    blocks: dict[int, list[PackedLayer]] = {}
    for name in state.names:  # model order within each block
        blocks.setdefault(block_index(name, adapter), []).append(by_name[name])
    index = SafetensorsIndex(model_dir)
    try:
        with CheckpointWriter(out, model_dir, config.overwrite) as writer:
            for i in sorted(blocks):
                writer.add_block(i, blocks[i])
            writer.add_rest(unquantized_tensors(index, adapter, set(state.names)))
            return writer.finish(
                model_config.to_dict(),
                _quantization_meta(config, calib, "parallel"),
                {"allocation": allocation_report(state, alloc, output_error)},
            )
    finally:
        index.close()


def block_index(name: str, adapter: ModelAdapter) -> int:
    return int(name[len(adapter.blocks) + 1 :].split(".", 1)[0])


STATE_FILE = "state.pt"


def save_state(state: MethodState, directory: Path) -> Path:
    """Write ``state`` as ``state.pt`` plus one Hessian file per layer (read one at a time)."""
    directory.mkdir(parents=True, exist_ok=True)
    hdir = directory / "hessians"
    hdir.mkdir(exist_ok=True)
    for i, name in enumerate(state.names):
        torch.save(state.hessians[name], hdir / f"{i:05d}.pt")
    light = dataclasses.replace(state, hessians={})
    tmp = directory / (STATE_FILE + ".partial")
    torch.save(light, tmp)
    os.replace(tmp, directory / STATE_FILE)  # last: its presence means complete
    return directory


def load_state(directory: Path) -> MethodState:
    """The state without Hessians (``load_hessian`` reads one layer's)."""
    state = torch.load(directory / STATE_FILE, weights_only=False)
    if not isinstance(state, MethodState) or state.version != MethodState.version:
        raise LwqError(f"{directory}: not a method state of this lwq version; recompute it")
    return state


def load_hessian(directory: Path, state: MethodState, name: str) -> torch.Tensor:
    H = torch.load(directory / "hessians" / f"{state.names.index(name):05d}.pt")
    assert isinstance(H, torch.Tensor)
    return H


def quantize_allocation(
    model_dir: Path,
    out: Path,
    state: MethodState,
    alloc: Allocation,
    calib: CalibrationSet,
    config: LwqConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize every layer at its ratio and write the checkpoint; returns the manifest."""
    from lwq.quantize import unquantized_tensors

    check_output_dir(out, config.overwrite)
    ratio = dict(zip(alloc.names, alloc.ratios, strict=True))
    settings = gptq_settings(config)
    lwc = lwc_settings(config)
    output_error: dict[str, float] = {}
    source = LazyCausalLM(model_dir, device=config.device)
    adapter = source.adapter
    try:
        with CheckpointWriter(out, model_dir, config.overwrite) as writer:
            for step in iter_block_stats(
                source, calib, config.calib.mode, config.calib.batch_size, progress
            ):
                packed = []
                for name, mod in step.layers.items():
                    W = adapter.read_weight(mod)
                    qw, output_error[name] = quantize_layer(
                        W, step.hessians[name], state, name, ratio[name], settings, lwc
                    )
                    adapter.write_weight(mod, qw.dequantize())
                    packed.append(pack_layer(name, qw))
                writer.add_block(step.index, packed)
            writer.add_rest(unquantized_tensors(source.index, adapter, set(ratio)))
            return writer.finish(
                source.model.config.to_dict(),
                _quantization_meta(config, calib, config.calib.mode),
                {"allocation": allocation_report(state, alloc, output_error)},
            )
    finally:
        source.close()
