"""The sensitivity profile: how each layer's quantization moves the output.

METHOD.md, "How to get the o_i": for every quantizable layer i, quantize only
that layer, at r = 0 and at r = r_max (every other layer full precision), and
record the change o of the logits on the calibration tokens. Weighted by the
output Fisher without forming it, z = sqrt(p) * (o - <p, o>) has
||z||^2 = o^T (diag p - p p^T) o, and 1/2 ||z||^2 is the KL divergence to second
order. z is sketched from the vocabulary to K dimensions by a fixed Gaussian
matrix. a_i = z_i(0) and b_i = (z_i(0) - z_i(r_max)) / r_max; only their Gram
matrices are kept, accumulated batch by batch, so memory is N x (batch tokens)
x K whatever the calibration size. Each probe re-runs only the blocks from the
perturbed layer's block onward, starting from the cached full-precision input
of that block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.method.qp import SensitivityProfile
from lwq.stats import BlockInputs, InMemoryCausalLM, NumericalError, capture_block_inputs, run_block


@dataclass(frozen=True)
class ProbeSettings:
    r_max: float = 0.3
    sketch_dim: int = 128
    seed: int = 0
    batch_size: int = 8


class FisherSketch:
    """Sketched F^(1/2) o per token for one batch of reference ``logits`` (T, V).

    z = (sqrt(p) * (o - <p, o>)) P = (sqrt(p) * o) P - <p, o> (sqrt(p) P): the
    softmax and sqrt(p) P are computed once per batch, so each probe costs one
    elementwise product, one row-dot and one (T, V) x (V, K) product.
    """

    def __init__(self, logits: torch.Tensor, P: torch.Tensor) -> None:
        self.p = torch.softmax(logits.float(), dim=-1)  # (T, V) reference distribution
        self.sqrt_p = self.p.sqrt()
        self.P = P
        self.sqrt_p_P = self.sqrt_p @ P  # (T, K)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """delta (T, V) -> z (T, K)."""
        dot = (self.p * delta).sum(dim=-1, keepdim=True)  # <p, o> per token
        return (self.sqrt_p * delta) @ self.P - dot * self.sqrt_p_P


def fisher_sketch(logits: torch.Tensor, delta: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Sketched F^(1/2) o per token: logits, delta (T, V), P (V, K) -> (T, K)."""
    return FisherSketch(logits, P)(delta)


def sketch_matrix(vocab: int, k: int, seed: int) -> torch.Tensor:
    """(V, K) Gaussian with variance 1/K, so E ||z P||^2 = ||z||^2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, k, generator=gen) / k**0.5


def _block_of(name: str, adapter: ModelAdapter) -> int:
    return int(name[len(adapter.blocks) + 1 :].split(".", 1)[0])


def _logit_change(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    module: torch.nn.Module,
    block: int,
    w: torch.Tensor,
    w_fp: torch.Tensor,
    block_in: list[torch.Tensor],
    inputs: BlockInputs,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Logit change (T, V) with only ``module``'s weight set to ``w``; restored after."""
    blocks = adapter.get_blocks(model)
    adapter.write_weight(module, w)
    try:
        h = block_in[block]
        for blk in list(blocks)[block:]:
            h = run_block(blk, BlockInputs([h], inputs.args, inputs.kwargs))[0]
    finally:
        adapter.write_weight(module, w_fp)
    return adapter.head(model, h).reshape(logits.shape) - logits


@torch.no_grad()
def sensitivity_profile(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    calib: CalibrationSet,
    probe: Callable[[str, float], torch.Tensor],
    names: list[str],
    settings: ProbeSettings = ProbeSettings(),
    progress: bool = True,
) -> SensitivityProfile:
    """Gram matrices of the per-layer output changes on ``calib``.

    ``probe(name, r)`` returns layer ``name``'s dequantised (d_out, d_in) weight
    at ratio r (called for r = 0 and r = r_max, once each; the results are kept).
    ``model`` is the full-precision model in memory; it is left unchanged.
    """
    t0 = time.perf_counter()
    source = InMemoryCausalLM(model, adapter)
    blocks = adapter.get_blocks(model)
    modules = dict(adapter.iter_layers(model))
    r_max = settings.r_max
    fp = {n: adapter.read_weight(modules[n]) for n in names}
    probes = {
        n: (probe(n, 0.0), probe(n, r_max))
        for n in tqdm(names, desc="probes", disable=not progress)
    }
    vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    P = sketch_matrix(vocab, settings.sketch_dim, settings.seed).to(source.device)
    N = len(names)
    AtA = torch.zeros(N, N, dtype=torch.float64)
    AtB = torch.zeros_like(AtA)
    BtB = torch.zeros_like(AtA)
    n_tokens = 0
    for batch in tqdm(calib.batches(settings.batch_size), desc="sensitivity", disable=not progress):
        inputs = capture_block_inputs(source, [batch])
        # Full-precision input of every block, and the reference logits.
        block_in = [inputs.hidden[0]]
        for blk in blocks:
            block_in.append(
                run_block(blk, BlockInputs([block_in[-1]], inputs.args, inputs.kwargs))[0]
            )
        logits = adapter.head(model, block_in[-1])
        T = logits.shape[0] * logits.shape[1]
        logits = logits.reshape(T, -1)
        sketch = FisherSketch(logits, P)

        A = torch.empty(N, T * settings.sketch_dim)
        B = torch.empty_like(A)
        for i, name in enumerate(names):
            deltas = [
                _logit_change(
                    model,
                    adapter,
                    modules[name],
                    _block_of(name, adapter),
                    w,
                    fp[name],
                    block_in,
                    inputs,
                    logits,
                )
                for w in probes[name]
            ]
            z0 = sketch(deltas[0])  # (T, K)
            zmax = sketch(deltas[1])
            if not (torch.isfinite(z0).all() and torch.isfinite(zmax).all()):
                raise NumericalError(f"{name}: NaN or inf in the output change of its probe")
            A[i] = z0.reshape(-1).cpu()
            B[i] = ((z0 - zmax) / r_max).reshape(-1).cpu()
        A64, B64 = A.double(), B.double()
        AtA += A64 @ A64.T
        AtB += A64 @ B64.T
        BtB += B64 @ B64.T
        n_tokens += T
    meta = (
        ("sketch_dim", str(settings.sketch_dim)),
        ("seed", str(settings.seed)),
        ("calib_sha256", calib.sha256),
        ("seconds", f"{time.perf_counter() - t0:.2f}"),
    )
    return SensitivityProfile(
        tuple(names), r_max, AtA / n_tokens, AtB / n_tokens, BtB / n_tokens, n_tokens, meta
    )
