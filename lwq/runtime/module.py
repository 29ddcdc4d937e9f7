"""``QuantLinear``: a linear layer that computes from its packed weight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lwq.pack.layer import PackedLayer, unpack_layer
from lwq.runtime import layout as torch_path
from lwq.runtime import native
from lwq.runtime.layout import BLOCK, Layout, build_layout


class QuantLinear(nn.Module):
    """Stands in for a quantized ``nn.Linear`` (or GPT-2's ``Conv1D``) and keeps
    only its codes, scales and high-impact entries (``lwq.runtime.layout``).

    On CPU with the native kernels, a call with at most ``native.MAX_ROWS``
    token rows (decoding) multiplies straight from the codes; a longer one
    (prefill, evaluation) dequantises the weight into a temporary and uses the
    float matrix product, so the float weight never stays in memory. Elsewhere
    (CUDA, no compiler) the pure-torch path dequantises and multiplies.
    Layers that read the same input (``Siblings``, found by ``share_inputs``)
    make one native call for all of them, and a gated MLP's three layers one
    call for the whole MLP (``GatedMLP``, made by ``fuse_mlps``).
    ``transposed`` records that the original was a ``Conv1D``: the computed
    function, x W^T + b with W (out, in), is the same.
    """

    def __init__(self, packed: PackedLayer, bias: torch.Tensor | None, transposed: bool) -> None:
        super().__init__()
        layout = build_layout(packed.name, unpack_layer(packed))
        self.name = packed.name
        self.lo, self.hi, self.n_hi = packed.lo, packed.hi, packed.n_hi
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        self.transposed = transposed
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._empty = layout.with_tensors({k: torch.empty(0) for k in layout.tensors()})
        for key, value in layout.tensors().items():
            self.register_buffer(key, value, persistent=False)
        self._layout: Layout | None = layout
        self._c: Any = None  # the C view of the buffers, made on the first native call
        self._bound: tuple[Any, ...] | None = None
        self.recorder: InputRecorder | None = None  # see share_inputs
        self.siblings: Siblings | None = None
        self.sibling_index = 0
        self.mlp: GatedMLP | None = None  # see fuse_mlps

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            tensors = {k: getattr(self, k) for k in self._empty.tensors()}
            self._layout = self._empty.with_tensors(tensors)
        return self._layout

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight in memory (the bias not included)."""
        return self.layout.nbytes

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantLinear:
        # Buffers may move (``.to(device)``); the C view would point at the old ones.
        # Codes, scales and zeros keep their dtypes: only the bias follows a dtype cast.
        self._c = self._layout = self._bound = None
        if self.siblings is not None:
            self.siblings.unbind()
        if self.mlp is not None:
            self.mlp.unbind()
        keep = {k: getattr(self, k) for k in self._empty.tensors()}
        super()._apply(fn, recurse)
        for key, before in keep.items():
            after = getattr(self, key)
            if after.dtype != before.dtype:
                setattr(self, key, after.to(before.dtype))
        return self

    def weight_fp(self) -> torch.Tensor:
        """The dequantised (out, in) float32 weight."""
        kernels = native.kernels() if self.codes.device.type == "cpu" else None
        if kernels is None:
            return torch_path.dequantize(self.layout)
        return kernels.dequantize(self._c_view(kernels), self.layout)

    def _c_view(self, kernels: native.Kernels) -> Any:
        if self._c is None:
            self._c = kernels.describe(self.layout)
        return self._c

    def _matvec(self, kernels: native.Kernels) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._bound is None or self._bound[0] is not kernels:
            self._bound = _bind(kernels, [self])
        return self._bound[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this once per layer and token: the fast path is kept short
        # (each torch call costs microseconds; a token makes hundreds of these calls).
        if self.recorder is not None:
            self.recorder.see(self, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.numel() <= native.MAX_ROWS * self.in_features:
            kernels = native.kernels()
            if kernels is not None:
                if x.dtype is not torch.float32 or not x.is_contiguous():
                    return self._forward(x.float().contiguous()).to(x.dtype)
                if self.siblings is not None:
                    return self.siblings.output(self, x, kernels)
                bound = self._bound
                if bound is not None and bound[0] is kernels:
                    return bound[1](x)
                return self._matvec(kernels)(x)
        rows = x.reshape(-1, self.in_features)
        w = self.weight_fp().to(x.dtype)
        y = nn.functional.linear(rows, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.view((*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        hi = "" if self.hi is None else f", hi={self.hi.bits}b r={self.n_hi}"
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"lo={self.lo.bits}b g{self.lo.group_size}{hi}"
        )


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place change counter (inference tensors have none)."""
    return -1 if x.is_inference() else x._version


class Siblings:
    """Layers that read the same input tensor one after another (a block's
    query, key and value projections; its gate and up projections): the first
    of them called with an input computes every member in one native call and
    keeps the others' outputs until they are called with that same tensor,
    unchanged (its version counter; an inference-mode tensor has none, so there
    the same object is taken as unchanged). A call with another input
    recomputes; when outputs computed ahead go unused ``MAX_WASTED`` times, the
    group dissolves and its members compute alone again."""

    MAX_WASTED = 3

    def __init__(self, members: list[QuantLinear]) -> None:
        self.members = members
        self._sizes = [m.out_features for m in members]  # their columns of the group's output
        self._everyone = (1 << len(members)) - 1
        self._bound: tuple[Any, ...] | None = None
        # the input, its version, the members' outputs side by side, who took theirs
        self._pending: list[Any] | None = None
        self.wasted = 0
        for i, member in enumerate(members):
            member.siblings, member.sibling_index = self, i

    def output(self, layer: QuantLinear, x: torch.Tensor, kernels: native.Kernels) -> torch.Tensor:
        """Layer's output for x (float32, contiguous, at most MAX_ROWS rows): a view
        into the group's output, contiguous when x is one row."""
        i, pending = layer.sibling_index, self._pending
        if pending is not None:
            if pending[0] is x and not pending[3] >> i & 1 and pending[1] == _version(x):
                pending[3] |= 1 << i
                if pending[3] == self._everyone:
                    self._pending = None
                return pending[2][i]
            if pending[3] != self._everyone:
                self.wasted += 1
                if self.wasted >= self.MAX_WASTED:
                    self.dissolve()
                    return layer._forward(x)
        bound = self._bound
        if bound is None or bound[0] is not kernels:
            bound = self._bound = _bind(kernels, self.members)
        outputs = bound[1](x).split(self._sizes, -1)
        self._pending = [x, _version(x), outputs, 1 << i]
        return outputs[i]

    def unbind(self) -> None:
        """Forget the native call (a member's buffers moved)."""
        self._bound = self._pending = None

    def dissolve(self) -> None:
        for member in self.members:
            member.siblings = None
        self.unbind()


def _bind(kernels: native.Kernels, layers: list[QuantLinear], mlp: str = "") -> tuple[Any, ...]:
    """(kernels, the layers' native call, what the call borrows): their
    matrix-vector call, or with ``mlp`` (an activation) a gated MLP's call."""
    views = [layer._c_view(kernels) for layer in layers]
    biases = [
        None if layer.bias is None else layer.bias.detach().float().contiguous() for layer in layers
    ]
    layouts = [layer.layout for layer in layers]
    if mlp:
        call = kernels.bind_mlp(views, layouts, biases, mlp)
    else:
        call = kernels.bind_matvec(views, layouts, biases)
    return (kernels, call, views, biases)  # views and biases: alive as long as call


class InputRecorder:
    """Watches one forward pass and groups layers called in a row with the same
    input tensor into ``Siblings``: the pass ends when a layer is called a
    second time (the next pass has begun). Only the last input is held."""

    def __init__(self, layers: list[QuantLinear]) -> None:
        self.layers = layers
        self.runs: list[list[QuantLinear]] = []
        self.last: torch.Tensor | None = None
        self.seen: set[int] = set()
        for layer in layers:
            layer.recorder = self

    def see(self, layer: QuantLinear, x: torch.Tensor) -> None:
        if id(layer) in self.seen:
            self.finish()
            return
        self.seen.add(id(layer))
        run = self.runs[-1] if self.runs else None
        if run is not None and x is self.last and run[0].layout.reads == layer.layout.reads:
            run.append(layer)
        else:
            self.runs.append([layer])
        self.last = x

    def finish(self) -> None:
        for layer in self.layers:
            layer.recorder = None
        self.last = None
        for run in self.runs:
            if 2 <= len(run) <= native.MAX_LAYERS and all(m.codes.is_cpu for m in run):
                Siblings(run)


def share_inputs(model: nn.Module) -> None:
    """Let the model's packed layers that read the same input compute together
    when decoding (``Siblings``); the groups are found in the first forward pass."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if len(layers) > 1:
        InputRecorder(layers)


class GatedMLP:
    """Stands in for the ``forward`` of a block's gated MLP whose three layers are
    packed, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LLaMA, Mistral,
    Qwen, Gemma, SmolLM, ...): when decoding on CPU with the native kernels the
    whole MLP is one native call; anything else goes to the module's own
    forward. The activation is recognised by its values (SiLU, or GELU's tanh
    approximation), and the first fused call is checked against the module's
    own forward: a module that computes something else keeps its forward."""

    PARTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, module: nn.Module, act: str) -> None:
        self.module = module
        self.layers: list[QuantLinear] = [getattr(module, part) for part in self.PARTS]
        self.act = act
        self._own = module.__dict__.get("forward")  # a forward set on the instance before us
        self.checked = False
        self._bound: tuple[Any, ...] | None = None
        self.in_features = self.layers[0].in_features
        for layer in self.layers:
            layer.mlp = self
        module.forward = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return self.original(*args, **kwargs)
        x = args[0]
        if (
            x.is_cpu
            and x.dtype is torch.float32
            and x.is_contiguous()
            and x.numel() <= native.MAX_ROWS * self.in_features
        ):
            kernels = native.kernels()
            if kernels is not None:
                bound = self._bound
                if bound is None or bound[0] is not kernels:
                    bound = self._bound = _bind(kernels, self.layers, self.act)
                y: torch.Tensor = bound[1](x)
                return y if self.checked else self._check(x, y)
        return self.original(x)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own forward."""
        if self._own is not None:
            return self._own(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        expected = self.original(x)
        if not isinstance(expected, torch.Tensor) or expected.shape != y.shape:
            self.remove()
            return expected
        if not bool(torch.isfinite(expected).all()):
            return expected  # nothing to judge by: the next call checks
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if torch.allclose(y, expected, rtol=1e-3, atol=1e-4 * scale):
            self.checked = True
        else:
            self.remove()
        return expected

    def unbind(self) -> None:
        """Forget the native call (a layer's buffers moved)."""
        self._bound = None

    def remove(self) -> None:
        """Give the module its own forward back."""
        if self._own is not None:
            self.module.forward = self._own  # type: ignore[method-assign]
        else:
            del self.module.forward
        for layer in self.layers:
            layer.mlp = None
        self._bound = None


def _activation_name(act: Any) -> str | None:
    """Which of the native MLP's activations ``act`` computes, from its values."""
    if not callable(act):
        return None
    t = torch.linspace(-8.0, 8.0, 161)
    try:
        with torch.no_grad():
            v = act(t)
    except Exception:  # an activation that wants other inputs: not ours to fuse
        return None
    candidates = {
        "silu": nn.functional.silu(t),
        "gelu_tanh": nn.functional.gelu(t, approximate="tanh"),
    }
    for name, ref in candidates.items():
        if isinstance(v, torch.Tensor) and v.shape == t.shape and torch.allclose(v, ref, atol=1e-6):
            return name
    return None


def fuse_mlps(model: nn.Module) -> int:
    """Give every gated MLP whose gate, up and down layers are packed a
    ``GatedMLP`` forward; returns how many."""
    fused = 0
    for module in model.modules():
        gate, up, down = (getattr(module, part, None) for part in GatedMLP.PARTS)
        if not (
            isinstance(gate, QuantLinear)
            and isinstance(up, QuantLinear)
            and isinstance(down, QuantLinear)
            and not isinstance(module.forward, GatedMLP)
            and gate.layout.reads == up.layout.reads
            and gate.out_features == up.out_features == down.in_features
            and down.layout.row_blocks * BLOCK == down.in_features
        ):
            continue
        act = _activation_name(getattr(module, "act_fn", None))
        if act is not None:
            GatedMLP(module, act)
            fused += 1
    return fused


HALF_DTYPES = (torch.float16, torch.bfloat16)


class HalfEmbedding(nn.Module):
    """An embedding kept in its stored 16-bit dtype that returns float32 rows."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, padding_idx: int | None = None) -> None:
        super().__init__()
        assert weight.dtype in HALF_DTYPES
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight = weight  # shared with a tied output head
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> HalfEmbedding:
        return _keep_dtype(self, super()._apply, fn, recurse)


class HalfLinear(nn.Module):
    """A linear layer (the output head) whose weight stays 16-bit; it computes in float32.

    Decoding multiplies straight from the 16-bit weight with the native kernel
    (half the bytes of float32 to read per token); longer inputs convert the
    weight into a float32 temporary.
    """

    def __init__(self, weight: torch.Tensor | nn.Parameter, bias: torch.Tensor | None) -> None:
        super().__init__()
        assert weight.dtype in HALF_DTYPES
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight = weight  # may be the input embedding's (tied)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        kernels = native.kernels() if x.device.type == "cpu" else None
        if kernels is not None and rows.shape[0] <= native.MAX_ROWS:
            y = kernels.half_matvec(self.weight, rows, self.bias)
        else:
            y = nn.functional.linear(rows, self.weight.float(), self.bias)
        return y.to(x.dtype).view(*lead, self.out_features)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> HalfLinear:
        return _keep_dtype(self, super()._apply, fn, recurse)


def _keep_dtype(module: Any, apply: Callable[..., Any], fn: Any, recurse: bool) -> Any:
    """``module.to(device)`` moves the 16-bit weight; a dtype cast leaves it 16-bit."""
    dtype = module.weight.dtype
    apply(fn, recurse)
    if module.weight.dtype != dtype:
        module.weight = nn.Parameter(module.weight.to(dtype), requires_grad=False)
    return module
