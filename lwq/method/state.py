"""The method's state: everything a budget needs, computed once per model and calibration.

``prepare`` walks the full-precision model block by block (docs/method.md,
"Stages"): each block's input Hessians give its layers' saliency rankings,
exact cost curves and probe weights, and then go to disk (``HessianStore``,
for a workflow whose layer tasks read them) or are dropped. The sensitivity
profile follows from the probes. ``allocate`` solves the QP for one budget;
``MethodState.job`` turns a layer's ratio into the ``LayerJob`` that
``lwq.quant.layer.quantize_layer`` runs. A sweep calls ``prepare`` once.

A state on disk is safetensors plus JSON (never a pickle) and carries the code
version that computed it; ``load_state`` refuses a state of other code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.config import LwqConfig
from lwq.errors import ConfigError, LwqError
from lwq.fileio import load_tensors, save_tensors, write_json
from lwq.method.cost import LayerCost, layer_cost
from lwq.method.fisher import fisher_diagonal
from lwq.method.layer import job_at_ratio
from lwq.method.qp import (
    Allocation,
    ProbeInfo,
    SensitivityProfile,
    choose_families,
    solve_allocation,
    total_bits,
)
from lwq.method.reverse import profile_windows, reverse_profile
from lwq.method.saliency import ranking, saliency
from lwq.method.sensitivity import (
    Delta,
    DeltaStore,
    ProbeSettings,
    probe_levels,
    sensitivity_profile,
)
from lwq.pack.layer import grid_from_meta, grid_meta
from lwq.pack.manifest import AllocationReport, GridMeta, LayerAllocation, ProfileInfo
from lwq.provenance import code_version
from lwq.quant.grid import GridSpec
from lwq.quant.layer import LayerJob, quantize_together
from lwq.stats import BlockStats, InMemoryCausalLM, iter_block_stats

log = logging.getLogger(__name__)

# safetensors header and metadata of one block file (136-152 bytes measured),
# reserved from the budget so that the bits measured from the files meet it.
HEADER_ALLOWANCE_BYTES = 160
# Below this many calibration sequences the profile's rank correlation with the
# measured KL degrades visibly (benchmarks/method.py runs 128).
MIN_PROFILE_SEQUENCES = 32
STATE_VERSION = 4  # 4: one cost curve per base (method.bases)
STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
TieGroups = tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]


def method_code_version() -> str:
    """The code version of everything ``prepare`` and the layer quantization run."""
    return code_version("lwq.method.state")


@dataclass(frozen=True)
class MethodState:
    """What every budget needs. With several bases (``method.bases``) each layer has
    one option per base: ``costs`` and the profile's rows then hold the options
    base-major (option f * N + i is layer i on base f), and an allocation picks
    one option per layer (``Allocation.families``)."""

    names: tuple[str, ...]
    orders: dict[str, torch.Tensor]  # the top r_max of each saliency ranking (int32, best first)
    costs: tuple[LayerCost, ...]
    profile: SensitivityProfile
    lo: GridSpec  # the (narrowest) base
    hi: GridSpec
    n_blocks: int
    seconds: dict[str, float]
    # Layer indices that ``method.ties`` constrains to one ratio, per mode.
    tie_groups: TieGroups = ()
    code_version: str = field(default_factory=method_code_version)
    version: int = STATE_VERSION

    def ties(self, mode: str) -> tuple[tuple[int, ...], ...]:
        return dict(self.tie_groups).get(mode, ())

    @property
    def n_families(self) -> int:
        """How many bases a layer chooses from (1: one base for all)."""
        return len(self.costs) // len(self.names)

    @property
    def base_grids(self) -> tuple[GridSpec, ...]:
        """The low grid of each base, in the order of the options."""
        n = len(self.names)
        return tuple(self.costs[f * n].lo for f in range(self.n_families))

    @property
    def bases(self) -> tuple[int, ...]:
        return tuple(g.bits for g in self.base_grids)

    def options(
        self, families: Sequence[int] = ()
    ) -> tuple[SensitivityProfile, tuple[LayerCost, ...]]:
        """The profile and cost curves of one option per layer (``families``; none:
        the first base for every layer), as the QP takes them."""
        n = len(self.names)
        if self.n_families == 1 and not any(families):
            return self.profile, self.costs
        idx = [f * n + i for i, f in enumerate(families or [0] * n)]
        return self.profile.subset(idx), tuple(self.costs[k] for k in idx)

    def job(self, name: str, ratio: float, family: int = 0) -> LayerJob:
        cost = self.costs[family * len(self.names) + self.names.index(name)]
        order = self.orders[name]
        return job_at_ratio(name, order, cost.shape, ratio, cost.lo, cost.hi, cost.structure)


class HessianStore:
    """Input Hessians on disk: one safetensors file per input group (q, k, v share one).

    ``index.json`` maps each layer to its file; it is written by ``close``, so a
    store without it is unfinished.
    """

    INDEX = "index.json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.index: dict[str, str] = {}

    def put_block(self, step: BlockStats) -> None:
        files: dict[int, str] = {}  # id of the shared tensor -> its file
        for name, H in step.hessians.items():
            if id(H) not in files:
                files[id(H)] = f"{name}.safetensors"
                self.directory.mkdir(parents=True, exist_ok=True)
                save_tensors({"H": H}, self.directory / files[id(H)])
            self.index[name] = files[id(H)]

    def close(self) -> None:
        write_json(self.index, self.directory / self.INDEX)

    @classmethod
    def open(cls, directory: Path) -> HessianStore:
        store = cls(directory)
        try:
            store.index = json.loads((Path(directory) / cls.INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise LwqError(f"{directory}: the Hessians were not all written; recompute") from err
        return store

    def get(self, name: str) -> torch.Tensor:
        tensors, _ = load_tensors(self.directory / self.index[name])
        return tensors["H"]


def tie_groups(
    names: tuple[str, ...], shared_input: list[list[str]], adapter: ModelAdapter
) -> TieGroups:
    """Groups of layer indices sharing an input (q/k/v, gate/up) and sharing a block.

    ``shared_input`` lists the layers that read one input tensor (as the block's
    forward showed them, ``lwq.stats.HessianHooks``).
    """
    index = {name: i for i, name in enumerate(names)}
    by_block: dict[int, list[int]] = {}
    for i, name in enumerate(names):
        by_block.setdefault(adapter.block_index(name), []).append(i)
    by_input = [[index[n] for n in group] for group in shared_input]
    keep = lambda groups: tuple(tuple(g) for g in groups if len(g) > 1)  # noqa: E731
    return (("inputs", keep(by_input)), ("block", keep(by_block.values())))


def probe_settings(config: LwqConfig) -> ProbeSettings:
    m = config.method
    return ProbeSettings(
        m.r_max,
        m.sketch_dim,
        config.calib.seed,
        config.calib.batch_size,
        m.r_mid if m.curve == "power" else None,
    )


def prepare(
    model: Any,
    adapter: ModelAdapter,
    calib: CalibrationSet,
    config: LwqConfig,
    hessians: Path | None = None,
    progress: bool = True,
    profile_text: torch.Tensor | None = None,
) -> MethodState:
    """Saliency rankings, cost curves and the sensitivity profile of ``model``.

    With ``hessians`` the input Hessians are written there (``HessianStore``)
    block by block; without, each is dropped once its block's layers are scored
    and probed. The reverse profile's sequences are cut from the calibration
    set, or with ``profile_text`` (windows (n, T) of other text) from that, the
    Hessians staying the calibration set's: how far the profile's text decides
    its ranking (``benchmarks/real_fidelity.py --profile-text``).
    """
    m = config.method
    lo_grids, hi = m.base_grids(), m.grids()[1]
    n_layers = len(adapter.layer_names(model))
    profile_ids = None
    if m.profile == "reverse":  # checked before any work: the set must hold the profile
        source_ids = calib.input_ids if profile_text is None else profile_text
        profile_ids = profile_windows(
            source_ids, m.profile_samples, m.profile_seq_len, config.calib.seed
        )
    elif calib.n_samples < MIN_PROFILE_SEQUENCES:
        log.warning(
            "calibration too small: the output-Fisher estimate of the sensitivity profile "
            "had %d sequences (%d tokens) for %d layers; use at least %d (calib.n_samples)",
            calib.n_samples,
            calib.n_samples * calib.seq_len,
            n_layers,
            MIN_PROFILE_SEQUENCES,
        )
    seconds = {"calibration": 0.0, "saliency": 0.0, "probes": 0.0}
    t = time.perf_counter()
    fisher = fisher_diagonal(model, adapter, calib, progress) if m.scoring == "fisher" else {}
    seconds["fisher"] = time.perf_counter() - t
    store = None if hessians is None else HessianStore(hessians)
    probe_gptq = config.gptq.settings() if m.probe_quantizer == "gptq" else None
    settings = probe_settings(config)
    levels = probe_levels(settings)
    orders: dict[str, torch.Tensor] = {}
    costs: list[list[LayerCost]] = [[] for _ in lo_grids]  # per base
    work = tempfile.TemporaryDirectory(prefix="lwq-probes-")
    probes = DeltaStore(Path(work.name))  # on disk: read back one layer at a time
    shared_input: list[list[str]] = []
    source = InMemoryCausalLM(model, adapter)
    t = time.perf_counter()
    for step in iter_block_stats(source, calib, "parallel", config.calib.batch_size, progress):
        seconds["calibration"] += time.perf_counter() - t
        weights: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, int]] = {}
        t = time.perf_counter()
        for name, mod in step.layers.items():
            W = weights[name] = adapter.read_weight(mod)  # (d_out, d_in)
            H = step.hessians[name]
            scores = saliency(W, H, m.scoring, fisher.get(name), damp=config.gptq.damp, name=name)
            # the top r_max is all a ratio uses
            orders[name] = ranking(scores, keep=m.r_max, structure=m.structure)
            shapes[name] = (int(W.shape[0]), int(W.shape[1]))
            for per_base, lo in zip(costs, lo_grids, strict=True):
                per_base.append(layer_cost(name, orders[name], shapes[name], lo, hi, m.structure))
        seconds["saliency"] += time.perf_counter() - t
        t = time.perf_counter()
        groups = step.input_groups()
        for group in groups:  # the layers of one input share one pass per grid
            jobs = [  # per layer, base-major: each base's probe levels in turn
                (name, job_at_ratio(name, orders[name], shapes[name], r, lo, hi, m.structure))
                for name in group
                for lo in lo_grids
                for r in levels
            ]
            H = step.hessians[group[0]]
            errors = quantize_together(
                [weights[n] for n, _ in jobs], H, [j for _, j in jobs], probe_gptq
            )
            per_layer = len(lo_grids) * len(levels)
            for i, name in enumerate(group):
                part = errors[i * per_layer : (i + 1) * per_layer]
                probes.put(name, [Delta.of(weights[name] - q) for q in part])
        seconds["probes"] += time.perf_counter() - t
        shared_input += groups
        if store is not None:
            store.put_block(step)
        t = time.perf_counter()
    if store is not None:
        store.close()
    names = tuple(orders)
    t = time.perf_counter()
    if profile_ids is not None:
        profile = reverse_profile(
            model,
            adapter,
            profile_ids,
            probes,
            list(names),
            settings,
            calib.sha256,
            progress,
            families=len(lo_grids),
        )
    else:
        profile = sensitivity_profile(
            model, adapter, calib, probes, list(names), settings, progress
        )
    seconds["sensitivity"] = time.perf_counter() - t
    work.cleanup()
    return MethodState(
        names,
        orders,
        tuple(c for per_base in costs for c in per_base),
        profile,
        lo_grids[0],
        hi,
        len(adapter.get_blocks(model)),
        seconds,
        tie_groups(names, shared_input, adapter),
    )


def _reserve(state: MethodState) -> float:
    """Bits per weight the files add beyond the layers' payload (headers)."""
    n = sum(c.n for c in state.options()[1])
    return state.n_blocks * HEADER_ALLOWANCE_BYTES * 8 / n


def allocate(state: MethodState, config: LwqConfig, budget: float | None = None) -> Allocation:
    """The QP's allocation at ``budget``; with several bases, each layer's base is
    chosen first (``choose_families``) among those ``method.base_floor`` offers at the
    budget, then the QP sets the ratios on those bases."""
    m = config.method
    b = m.budget if budget is None else budget
    offered = m.offered_bases(b) if state.n_families > 1 else None
    allowed = [f for f, w in enumerate(state.bases) if offered is None or w in offered]

    def solve(families: Sequence[int]) -> Allocation:
        profile, costs = state.options(families)
        alloc = solve_allocation(
            profile,
            costs,
            b,
            m.objective,
            m.solver,
            ties=state.ties(m.ties),
            iterations=4,
            tol=m.solver_tol,
            overhead=_reserve(state),
        )
        return dataclasses.replace(alloc, families=tuple(families)) if any(families) else alloc

    if state.n_families == 1:
        return solve(())
    n = len(state.names)
    solved: dict[tuple[int, ...], Allocation | None] = {}

    def loss(families: tuple[int, ...]) -> float:
        if families not in solved:
            try:
                solved[families] = solve(families)
            except ConfigError:  # the budget is out of these bases' reach
                solved[families] = None
        a = solved[families]
        return float("inf") if a is None else a.predicted_loss

    for f in allowed:  # one base for all, where it reaches the budget
        loss((f,) * n)
    if len(allowed) == 1:
        chosen: tuple[int, ...] = (allowed[0],) * n
    else:  # the options of the offered bases, base-major as choose_families takes them
        index = [f * n + i for f in allowed for i in range(n)]
        picked = choose_families(
            state.profile.subset(index),
            [state.costs[j] for j in index],
            n,
            b,
            m.objective,
            _reserve(state),
            evaluate=lambda fs: loss(tuple(allowed[f] for f in fs)),
        )
        chosen = tuple(allowed[f] for f in picked)
    if loss(chosen) == float("inf"):
        solve(chosen)  # raises the QP's own error: the budget no base reaches
    return min((a for a in solved.values() if a is not None), key=lambda a: a.predicted_loss)


def fixed_allocation(state: MethodState, ratio: float) -> Allocation:
    """Every layer at ``ratio`` whatever it costs (e.g. SqueezeLLM's 0.45 % in float16)."""
    costs = state.options()[1]
    n = sum(c.n for c in costs)
    ratios = tuple(ratio for _ in state.names)
    return Allocation(
        names=state.names,
        ratios=ratios,
        objective="fixed",
        budget=float("nan"),
        bits=total_bits(costs, ratios) / n + _reserve(state),
        predicted_loss=state.options()[0].predicted_loss(ratios),
        solver="none",
        seconds=0.0,
        iterations=0,
    )


def largest_first(state: MethodState) -> list[int]:
    """Layer indices of ``state`` by decreasing quantization work (``by_work``)."""
    return by_work([c.shape for c in state.costs[: len(state.names)]])


def by_work(shapes: list[tuple[int, int]]) -> list[int]:
    """Layer indices by decreasing quantization work (d_in^2 (d_out + d_in / 3): the
    inverse Hessian and the column sweep), so parallel workers finish together."""
    work = [d_in**2 * (d_out + d_in / 3) for d_out, d_in in shapes]
    return sorted(range(len(work)), key=lambda i: (-work[i], i))


def allocation_report(
    state: MethodState, alloc: Allocation, output_error: dict[str, float | None]
) -> AllocationReport:
    profile, costs = state.options(alloc.families)
    per_layer = profile.per_layer_loss(alloc.ratios)
    layers = [
        LayerAllocation(
            name=name,
            ratio=r,
            n_hi=costs[i].n_hi(r),
            bits_per_weight=costs[i].bits(r) / costs[i].n,
            predicted_loss=float(per_layer[i]),
            output_error=output_error.get(name),
            lo_bits=costs[i].lo.bits,
        )
        for i, (name, r) in enumerate(zip(alloc.names, alloc.ratios, strict=True))
    ]
    p = state.profile
    probe = p.probe or ProbeInfo(0, None, 0, "", 0.0)
    return AllocationReport(
        objective=alloc.objective,
        budget=None if alloc.budget != alloc.budget else alloc.budget,  # NaN: a fixed ratio
        bits_cost_model=alloc.bits,
        predicted_kl=alloc.predicted_loss,
        solver=alloc.solver,
        solve_seconds=alloc.seconds,
        layers=layers,
        profile=ProfileInfo(r_max=p.r_max, n_tokens=p.n_tokens, **asdict(probe)),
    )


def save_state(state: MethodState, directory: Path) -> Path:
    """Write ``state`` into ``directory``: tensors, then the JSON that says it is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    p = state.profile
    tensors = {"AtA": p.AtA, "AtB": p.AtB, "BtB": p.BtB}
    if p.gamma is not None:
        tensors["gamma"] = p.gamma
    for i, name in enumerate(state.names):
        tensors[f"order.{i}"] = state.orders[name]
    for k, cost in enumerate(state.costs):  # every base's option of every layer
        tensors[f"ranks.{k}"] = cost.activation_ranks
    save_tensors(tensors, directory / STATE_TENSORS)
    probe = None if p.probe is None else p.probe.__dict__
    doc = {
        "version": state.version,
        "code_version": state.code_version,
        "names": list(state.names),
        "shapes": [list(c.shape) for c in state.options()[1]],
        "lo": [grid_meta(g).model_dump() for g in state.base_grids],
        "hi": grid_meta(state.hi).model_dump(),
        "structure": state.costs[0].structure if state.costs else "weights",
        "n_blocks": state.n_blocks,
        "seconds": state.seconds,
        "tie_groups": [[mode, [list(g) for g in groups]] for mode, groups in state.tie_groups],
        "profile": {"r_max": p.r_max, "n_tokens": p.n_tokens, "probe": probe},
    }
    write_json(doc, directory / STATE_JSON)  # last: its presence means complete
    return directory


def load_state(directory: Path, expect_code: str | None = None) -> MethodState:
    """The state ``save_state`` wrote; with ``expect_code``, only if that code wrote it."""
    directory = Path(directory)
    try:
        doc = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise LwqError(f"{directory}: no complete method state; recompute it") from err
    if doc.get("version") != STATE_VERSION:
        raise LwqError(f"{directory}: a method state of another lwq version; recompute it")
    if expect_code is not None and doc.get("code_version") != expect_code:
        raise LwqError(
            f"{directory}: the method state was computed by other code "
            f"({str(doc.get('code_version'))[:12]}, this is {expect_code[:12]}); recompute it"
        )
    tensors, _ = load_tensors(directory / STATE_TENSORS)
    names = tuple(doc["names"])
    bases = [grid_from_meta(GridMeta.model_validate(g)) for g in doc["lo"]]
    hi = grid_from_meta(GridMeta.model_validate(doc["hi"]))
    n = len(names)
    costs = tuple(
        LayerCost(
            name, (int(s[0]), int(s[1])), lo, hi, tensors[f"ranks.{f * n + i}"], doc["structure"]
        )
        for f, lo in enumerate(bases)
        for i, (name, s) in enumerate(zip(names, doc["shapes"], strict=True))
    )
    prof = doc["profile"]
    profile = SensitivityProfile(
        names * len(bases),  # one row per option, base-major
        float(prof["r_max"]),
        tensors["AtA"],
        tensors["AtB"],
        tensors["BtB"],
        int(prof["n_tokens"]),
        None if prof["probe"] is None else ProbeInfo(**prof["probe"]),
        gamma=tensors.get("gamma"),
    )
    return MethodState(
        names,
        {name: tensors[f"order.{i}"] for i, name in enumerate(names)},
        costs,
        profile,
        bases[0],
        hi,
        int(doc["n_blocks"]),
        {k: float(v) for k, v in doc["seconds"].items()},
        tuple((mode, tuple(tuple(g) for g in groups)) for mode, groups in doc["tie_groups"]),
        str(doc["code_version"]),
    )
