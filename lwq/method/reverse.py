"""The sensitivity profile by reverse mode: one backward pass serves every layer.

docs/method.md, "The objective (reverse mode)". The forward probes of
``lwq.method.sensitivity`` re-run every later block and the head per layer and
probe, so their cost grows as layers x depth x vocabulary. Here each
calibration sequence s gets labels y_t drawn from the model's own next-token
distribution p_t at every position, and one backward pass of the loss
L_s = sum_t -log p_t(y_t). Its gradient at the logits, e_t = p_t - onehot(y_t),
has E[e_t e_t^T] = F_t = diag(p_t) - p_t p_t^T (the output Fisher) and is
independent across positions, so for the linearized logit changes o_i of the
layers' quantization errors dW_i,

    D_i(s) = <dL_s/dW_i, dW_i>  =  sum_t e_t^T o_{i,t}
    E[D_i(s) D_j(s)]  =  sum_t o_{i,t}^T F_t o_{j,t},

which is exactly the Gram entry the QP needs, cross-position effects (through
attention) and cross-layer terms included. One backward pass gives D_i for all
N layers and all probe levels at once: the profile costs O(depth) per
sequence, and the head is never evaluated per layer. The price is noise: each
sequence contributes one sample, so the profile uses many short sequences
(``method.profile_samples`` of ``method.profile_seq_len`` tokens).

The per-sequence weight gradient G_i(s) = sum_t g_t x_t^T (g the gradient at
the layer's output, x its input) is formed in a hook on the layer's output,
one layer at a time, and dotted with the probes' errors; nothing of size
(layers x tokens) is kept. The head's softmax is taken in chunks of tokens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.errors import ConfigError, NumericalError
from lwq.memory import release, trim
from lwq.method.qp import SensitivityProfile
from lwq.method.sensitivity import Delta, ProbeSettings, assemble_profile, probe_levels

HEAD_CHUNK = 64  # tokens whose (chunk, vocabulary) logits are formed at once
# Tokens per backward pass: the activations kept for the backward grow with it
# (about 1.2 MB per token for SmolLM2-135M at 128-token sequences); 256 keeps
# the whole method under 2 GB for that model, larger passes are no faster.
PASS_TOKENS = 256


def profile_capacity(n_windows: int, window_len: int, seq_len: int) -> int:
    """How many profile sequences of ``seq_len`` tokens a calibration set holds."""
    return n_windows * (window_len // seq_len)


def profile_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens cut from calibration windows ``ids`` (n, T).

    Each calibration window gives T // seq_len disjoint pieces; a seeded choice
    among them keeps the profile's sequences spread over the whole set.
    """
    n, T = ids.shape
    per = T // seq_len
    if profile_capacity(n, T, seq_len) < samples:
        raise ConfigError(
            f"the profile needs method.profile_samples={samples} windows of "
            f"method.profile_seq_len={seq_len} tokens, but the calibration set "
            f"({n} x {T} tokens) holds {n * per}: raise calib.n_samples or calib.seq_len, "
            "or lower method.profile_samples or method.profile_seq_len"
        )
    pieces = ids[:, : per * seq_len].reshape(n * per, seq_len)
    gen = torch.Generator().manual_seed(seed)
    return pieces[torch.randperm(n * per, generator=gen)[:samples].sort().values]


class _LayerGradients:
    """Hooks that turn each layer's output gradient into <G_i(s), dW_i> per probe."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        deltas: Mapping[str, Sequence[Delta]],
        names: Sequence[str],
    ) -> None:
        self.modules, self.deltas = modules, deltas
        self.column = {name: i for i, name in enumerate(names)}
        self.inputs: dict[str, torch.Tensor] = {}
        self.D: torch.Tensor | None = None  # (B, N, levels) of the current batch
        self._handles: list[Any] = []

    def __enter__(self) -> _LayerGradients:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._save_input(name)))
            self._handles.append(mod.register_forward_hook(self._watch_output(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.inputs.clear()

    def _save_input(self, name: str) -> Any:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.inputs[name] = args[0].detach()  # shared inputs are one tensor, kept once

        return hook

    def _watch_output(self, name: str) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self._directional(name, g))

        return hook

    def _directional(self, name: str, g: torch.Tensor) -> None:
        x = self.inputs.pop(name)  # (B, T, d_in); the layer's output gradient g: (B, T, d_out)
        G = torch.bmm(g.float().transpose(1, 2), x.float())  # (B, d_out, d_in) per sequence
        assert self.D is not None
        # The probes' errors, read for this layer only: (levels, d_out, d_in).
        deltas = self.deltas[name]
        dW = torch.empty((len(deltas), *G.shape[1:]), dtype=torch.float32, device=G.device)
        for d, out in zip(deltas, dW, strict=True):
            d.dense(out=out)
        D = G.reshape(G.shape[0], -1) @ dW.reshape(dW.shape[0], -1).T  # (B, levels)
        self.D[:, self.column[name], :] = D.double()


def _embedding_requires_grad(model: nn.Module) -> Any:
    """Make the embeddings' output a leaf of the graph (the weights stay frozen)."""

    def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(hook)  # type: ignore[operator]


def _head_gradient(
    model: nn.Module, adapter: ModelAdapter, hidden: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """d(sum_t -log p_t(y_t))/d hidden with y_t ~ p_t, for the base model's output (B, T, d).

    The logits are formed ``HEAD_CHUNK`` tokens at a time, so memory holds one
    (chunk, vocabulary) block instead of (tokens, vocabulary).
    """
    head = model.get_output_embeddings()  # type: ignore[operator]
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    grad = torch.empty_like(flat)
    for start in range(0, flat.shape[0], HEAD_CHUNK):
        h = flat[start : start + HEAD_CHUNK].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.scale_logits(model, head(h)).float()  # (chunk, V)
            if not torch.isfinite(logits).all():
                raise NumericalError("NaN or inf in the logits of the full-precision model")
            with torch.no_grad():  # y ~ p by the inverse CDF (multinomial is slow here)
                cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
                u = torch.rand(cdf.shape[0], 1, generator=gen) * cdf[:, -1:]
                y = torch.searchsorted(cdf, u)[:, 0].clamp(max=cdf.shape[1] - 1)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            (g,) = torch.autograd.grad(loss, h)
        grad[start : start + HEAD_CHUNK] = g
    return grad.view_as(hidden)


def directional_samples(
    model: nn.Module,
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    probes: Mapping[str, Sequence[Delta]],
    names: Sequence[str],
    n_probes: int,
    seed: int,
    progress: bool = True,
    pass_tokens: int = PASS_TOKENS,
) -> torch.Tensor:
    """D (S, N, n_probes): <dL_s/dW_i, dW_i> for every sequence s of ``tokens`` (S, T),
    layer i of ``names`` and each of its ``n_probes`` errors in ``probes``, the labels
    sampled from the model (generator seeded with ``seed``; when T is a multiple of
    ``HEAD_CHUNK`` the draws do not depend on ``pass_tokens``, the tokens per
    backward pass). The model is left as it was (its parameters' ``requires_grad``
    restored)."""
    modules = dict(adapter.iter_layers(model))
    device = next(model.parameters()).device
    S, T = tokens.shape
    N = len(names)
    D = torch.zeros(S, N, n_probes, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    per_batch = max(1, pass_tokens // T)
    starts = range(0, S, per_batch)
    release()  # what the calibration pass freed goes back to the OS first
    handle = _embedding_requires_grad(model)
    try:
        for p in params:
            p.requires_grad_(False)
        with _LayerGradients({n: modules[n] for n in names}, probes, names) as hooks:
            for start in tqdm(starts, desc="profile (reverse)", disable=not progress):
                ids = tokens[start : start + per_batch].to(device)
                hooks.D = torch.zeros(ids.shape[0], N, n_probes, dtype=torch.float64)
                with torch.enable_grad():
                    base: Any = model.base_model
                    hidden = base(input_ids=ids, use_cache=False).last_hidden_state
                    grad = _head_gradient(model, adapter, hidden, gen)
                    hidden.backward(grad)
                if not torch.isfinite(hooks.D).all():
                    raise NumericalError("NaN or inf in the reverse-mode sensitivity profile")
                D[start : start + ids.shape[0]] = hooks.D
                del hidden, grad
                trim()
    finally:
        handle.remove()
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
    return D


def reverse_profile(
    model: nn.Module,
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    probes: Mapping[str, Sequence[Delta]],
    names: list[str],
    settings: ProbeSettings,
    calib_sha256: str,
    progress: bool = True,
    families: int = 1,
) -> SensitivityProfile:
    """Gram matrices of the per-layer output changes, from sampled-label backward passes.

    ``tokens`` (S, T): the profile's sequences, one sample each. ``probes`` as
    for ``lwq.method.sensitivity.sensitivity_profile``; with ``families`` bases
    each layer holds every base's probe levels in turn, and the profile has one
    row per (base, layer), base-major. The model is left as it was (its
    parameters' ``requires_grad`` restored).
    """
    t0 = time.perf_counter()
    n_levels = len(probe_levels(settings)) * families
    D = directional_samples(
        model, adapter, tokens, probes, names, n_levels, settings.seed, progress
    )
    seconds = time.perf_counter() - t0
    return profile_from_samples(
        D, names, settings, tokens.shape[1], calib_sha256, seconds, families
    )


def shrink_cross_layer(X: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, float]:
    """The Gram matrix X^T X of samples X (S, k N), its cross-layer entries shrunk.

    Columns hold k quantities per layer (layer-major blocks of N). Each sample
    gives one rank-1 term, so the cross-layer entries are noisy estimates of
    small values: they are pulled towards zero by the data-chosen factor of
    Schaefer and Strimmer (the summed estimated variance of those entries over
    their summed squares), while every layer's own k x k block is kept. A convex
    combination of the Gram and its layer-block-diagonal part, the result stays
    positive semi-definite. Returns (summed Gram, shrinkage in [0, 1]).
    """
    S = X.shape[0]
    G = X.T @ X  # sums over samples
    layer = torch.arange(X.shape[1]) % n_layers
    cross = layer[:, None] != layer[None, :]
    mean = G / S
    # Variance of each entry's sample mean: var(x_i x_j) / S, from the samples.
    second = (X.square().T @ X.square()) / S  # E[x_i^2 x_j^2]
    var = (second - mean.square()).clamp(min=0.0) / max(1, S - 1)
    denom = float(mean[cross].square().sum())
    shrink = 1.0 if denom == 0.0 else min(1.0, float(var[cross].sum()) / denom)
    G = torch.where(cross, (1.0 - shrink) * G, G)
    return G, shrink


def profile_from_samples(
    D: torch.Tensor,
    names: Sequence[str],
    settings: ProbeSettings,
    seq_len: int,
    calib_sha256: str,
    seconds: float,
    families: int = 1,
) -> SensitivityProfile:
    """The profile from per-sequence directional derivatives D (S, N, levels) of layers
    ``names``; with ``families`` bases each layer's levels hold every base's in turn,
    and the profile has one row per (base, layer), base-major."""
    if families > 1:  # (S, N, F levels) -> (S, F N, levels): one row per option
        S, N, _ = D.shape
        D = D.view(S, N, families, -1).transpose(1, 2).reshape(S, families * N, -1)
        names = list(names) * families
    S, N, n_levels = D.shape
    A = D[:, :, 0]  # (S, N)
    B = (D[:, :, 0] - D[:, :, 1]) / settings.r_max
    G, shrink = shrink_cross_layer(torch.cat([A, B], dim=1), N)
    mid_sq = D[:, :, 2].square().sum(dim=0) if n_levels > 2 else torch.zeros(N)
    return assemble_profile(
        names,
        settings,
        G[:N, :N],
        G[:N, N:],
        G[N:, N:],
        mid_sq.double(),
        S * seq_len,
        calib_sha256,
        seconds,
        samples=S,
        shrinkage=shrink,
    )
