"""Calibration statistics: each quantizable layer's input Hessian, block by block.

H = 2 X X^T / N (GPTQ's proxy, X the layer inputs of N calibration tokens) is
accumulated in float32 by forward pre-hooks that one context manager owns and
always removes. The driver walks the decoder blocks in order and holds only
the current block's activations:

- ``parallel``: every block's inputs come from the full-precision model, so
  every layer's Hessian is independent of how the others are quantized;
- ``sequential``: each block sees the outputs of the blocks before it *after*
  they were quantized (GPTQ's order), which is more accurate, not parallel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.errors import LwqError, NumericalError
from lwq.memory import release

Mode = Literal["parallel", "sequential"]


@dataclass(frozen=True)
class HessianState:
    """Running mean of 2 x x^T over ``n_tokens`` input rows: H is (d_in, d_in)."""

    H: torch.Tensor
    n_tokens: int


def accumulate_hessian(state: HessianState | None, x: torch.Tensor) -> HessianState:
    """Fold the rows of ``x`` (..., d_in) into ``state``; returns the new state.

    The running mean keeps H at the scale of 2 X X^T / N at every step, so
    float32 does not overflow on long calibration sets. H is updated in place.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (m, d_in)
    m = x.shape[0]
    if state is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        n = 0
    else:
        H, n = state.H, state.n_tokens
    H.mul_(n / (n + m))
    H.addmm_(x.t(), x, alpha=2.0 / (n + m))
    return HessianState(H, n + m)


class HessianHooks(AbstractContextManager["HessianHooks"]):
    """Forward pre-hooks that accumulate the input Hessian of each given module.

    Modules that receive the very same input tensor (q, k and v of one
    attention, gate and up of one MLP) share one Hessian: the first module to
    see a tensor leads, the others are linked to it on the first call, so no
    family needs to declare which layers share an input. The hooks are removed
    on exit, whatever happens.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.states: dict[str, HessianState | None] = dict.fromkeys(modules)
        self.leader: dict[str, str] = {}  # key -> the key whose Hessian it shares
        self._first: dict[str, torch.Tensor] = {}  # a leader's first input, for the links
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HessianHooks:
        for key, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(key)))
        return self

    def _hook(self, key: str) -> Any:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if key not in self.leader:  # the first call: does it share a leader's input?
                lead = next((k for k, t in self._first.items() if t is x), key)
                self.leader[key] = lead
                if lead == key:
                    self._first[key] = x
            if self.leader[key] == key:
                self.states[key] = accumulate_hessian(self.states[key], x.detach())

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._first.clear()

    def result(self) -> dict[str, HessianState]:
        """Every module's Hessian state; modules of one input share the same object."""
        out = {}
        for key in self.states:
            state = self.states[self.leader.get(key, key)]
            if state is None:
                raise LwqError(f"layer {key} saw no input during calibration")
            if not torch.isfinite(state.H).all():
                raise NumericalError(
                    f"the input Hessian of {key} has NaN or inf entries: the model's "
                    "activations overflow; check its weights or use fewer/shorter samples"
                )
            out[key] = state
        return out


class BlockSource(Protocol):
    """A model whose decoder blocks can be loaded one at a time."""

    model: Any
    adapter: ModelAdapter
    device: torch.device

    def block(self, i: int) -> AbstractContextManager[nn.Module]: ...

    def after_capture(self) -> None:
        """Called once the block inputs are captured (a lazy model frees memory)."""


class InMemoryCausalLM:
    """``BlockSource`` over a model that is already fully in memory."""

    def __init__(self, model: Any, adapter: ModelAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.device = next(model.parameters()).device

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        yield self.adapter.get_blocks(self.model)[i]

    def after_capture(self) -> None:
        """The model stays whole: it is the caller's."""


Call = tuple[tuple[Any, ...], dict[str, Any]]  # the (args, kwargs) a block is called with


@dataclass
class BlockInputs:
    """What each calibration batch feeds a block: hidden states (b, T, d), and
    for every block what else the model passes it (attention masks, rotary
    embeddings; they differ per block in families that alternate attention types)."""

    hidden: list[torch.Tensor]  # per batch, the input of the current block
    calls: list[list[Call]] = field(default_factory=list)  # [block][batch]

    def moved(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same calls with new hidden states (the next block's inputs)."""
        return BlockInputs(hidden, self.calls)


class _InputRecorder(nn.Module):
    """Stands in for a decoder block: records its inputs, passes them through."""

    def __init__(self, calls: list[Call], hidden: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.calls, self.hidden = calls, hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.hidden is not None:
            self.hidden.append(hidden_states.detach())
        self.calls.append((args, kwargs))
        return hidden_states


@torch.no_grad()
def capture_block_inputs(source: BlockSource, batches: list[torch.Tensor]) -> BlockInputs:
    """Run the model with every block replaced by a pass-through recorder.

    Only the embeddings compute: the base model is called, not the LM head,
    whose logits for every calibration token would be the largest tensor of
    the whole run. What block 0 receives (hidden states), and what every block
    receives besides (attention masks, rotary embeddings...), is kept.
    """
    blocks = source.adapter.get_blocks(source.model)
    originals = list(blocks)
    captured = BlockInputs(hidden=[], calls=[[] for _ in blocks])
    try:
        for i in range(len(blocks)):
            blocks[i] = _InputRecorder(captured.calls[i], captured.hidden if i == 0 else None)
        base = source.model.base_model  # the decoder stack without the LM head
        for batch in batches:
            base(input_ids=batch.to(source.device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return captured


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden-state output (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    """Block ``index``'s outputs for every batch: list of (b, T, d)."""
    return [
        block_output(block(h, *a, **kw))
        for h, (a, kw) in zip(inputs.hidden, inputs.calls[index], strict=True)
    ]


class _Seen(Exception):
    """Raised by a hook to end a block's forward once the wanted inputs are seen."""


@dataclass(frozen=True)
class BlockStats:
    """One decoder block, loaded, with the input Hessian of each of its layers."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Module]  # full layer name -> module
    hessians: dict[str, torch.Tensor]  # full layer name -> (d_in, d_in); shared per input group
    n_tokens: int
    inputs: BlockInputs | None = None  # the block's calibration inputs (to refresh Hessians)

    def current_hessians(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The input Hessians of ``names`` (one input group) as the block is now.

        In sequential mode, once the layers before them are quantized (GPTQ's
        "true sequential" order: q/k/v, then o, then gate/up, then down), each
        calibration batch runs the block only until every one of ``names`` has
        seen its input.
        """
        if self.inputs is None:
            raise LwqError(f"block {self.index}: no calibration inputs to refresh Hessians from")
        modules = {n: self.layers[n] for n in names}
        seen: set[str] = set()

        def stop_when_all_seen(key: str) -> Any:
            def hook(_mod: nn.Module, _args: Any) -> None:
                seen.add(key)
                if len(seen) == len(modules):
                    raise _Seen

            return hook

        with torch.no_grad(), HessianHooks(modules) as hooks:
            handles = [
                m.register_forward_pre_hook(stop_when_all_seen(k)) for k, m in modules.items()
            ]
            try:
                for h, (a, kw) in zip(
                    self.inputs.hidden, self.inputs.calls[self.index], strict=True
                ):
                    seen.clear()
                    try:
                        self.block(h, *a, **kw)
                    except _Seen:
                        pass
            finally:
                for handle in handles:
                    handle.remove()
        return {name: state.H for name, state in hooks.result().items()}

    def input_groups(self) -> list[list[str]]:
        """The block's layers grouped by the input they read (one Hessian each), in order;
        without Hessians (no calibration) each layer alone."""
        groups: dict[int, list[str]] = {}
        for name in self.layers:
            H = self.hessians.get(name)
            groups.setdefault(id(name) if H is None else id(H), []).append(name)
        return list(groups.values())


def iter_block_stats(
    source: BlockSource,
    calib: CalibrationSet | None,
    mode: Mode = "parallel",
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[BlockStats]:
    """Yield each block with its layers' Hessians, first block first.

    The consumer may change the block's weights (quantize them) before asking
    for the next block: in ``sequential`` mode the next block then sees the
    changed block's outputs; in ``parallel`` mode it sees full-precision ones.
    Without a calibration set (RTN) the blocks are only loaded, one at a time,
    with no Hessians.
    """
    if mode not in ("parallel", "sequential"):
        raise LwqError(f"calibration mode must be 'parallel' or 'sequential', not {mode!r}")
    adapter = source.adapter
    inputs = None if calib is None else capture_block_inputs(source, calib.batches(batch_size))
    source.after_capture()
    n_blocks = len(adapter.get_blocks(source.model))
    desc = "blocks" if inputs is None else f"blocks ({mode})"
    for i in tqdm(range(n_blocks), desc=desc, disable=not progress, unit="block"):
        with source.block(i) as block:
            linears = {adapter.layer_name(i, n): m for n, m in adapter.block_linears(block).items()}
            if inputs is None:
                yield BlockStats(i, block, linears, hessians={}, n_tokens=0)
            else:
                step, outputs = _block_stats(i, block, linears, inputs)
                yield step
                if mode == "sequential":
                    outputs = run_block(block, inputs, i)  # after the consumer quantized it
                inputs = inputs.moved(outputs)
                del step
        release()  # the block's weights, Hessians and activations go back to the OS


def _block_stats(
    i: int, block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs
) -> tuple[BlockStats, list[torch.Tensor]]:
    """One block's Hessians (one per shared input) and its full-precision outputs."""
    with HessianHooks(linears) as hooks:
        outputs = run_block(block, inputs, i)
    states = hooks.result()
    hessians = {name: state.H for name, state in states.items()}
    for out in outputs:
        if not torch.isfinite(out).all():
            raise NumericalError(f"block {i} produced NaN or inf activations")
    n_tokens = next(iter(states.values())).n_tokens
    return BlockStats(i, block, linears, hessians, n_tokens, inputs), outputs
