"""The sensitivity profile: how each layer's quantization moves the output.

docs/method.md, "The objective": for every quantizable layer i, quantize only
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

With ``r_mid`` set, a third probe per layer measures the damage at r_mid,
||z_i(r_mid)||^2, and finds the point of the chord with that damage: the
smaller root s_mid of ||a_i - s b_i||^2 = ||z_i(r_mid)||^2 (the chord's
minimum when there is none). The exponent of the curve s = r_max (r / r_max)^gamma
through it is gamma_i = log(s_mid / r_max) / log(r_mid / r_max), clipped to
[GAMMA_MIN, 1] (1: the chord; small: most of the gain comes from the first
weights protected). The layer's own predicted loss is then exact at the three
probes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.errors import NumericalError
from lwq.method.qp import ProbeInfo, SensitivityProfile
from lwq.stats import BlockInputs, InMemoryCausalLM, capture_block_inputs, run_block

GAMMA_MIN = 0.2


@dataclass(frozen=True)
class ProbeSettings:
    r_max: float = 0.3
    sketch_dim: int = 128
    seed: int = 0
    batch_size: int = 8
    r_mid: float | None = None  # a third probe: the curve's exponent per layer


@dataclass(frozen=True)
class Delta:
    """A probe's weight error W - Q(W), (d_out, d_in), in about one byte per weight.

    int8 codes with a float32 scale per row and block of ``BLOCK`` columns: the
    rounding error is at most 0.4 % of each block's largest error, far below
    what the profile's estimates resolve, and three probes of every layer of a
    model take about three bytes per weight instead of twelve.
    """

    codes: torch.Tensor  # (d_out, d_in) int8
    scales: torch.Tensor  # (d_out, ceil(d_in / BLOCK)) float32
    BLOCK = 64

    @classmethod
    def of(cls, dW: torch.Tensor) -> Delta:
        d_out, d_in = dW.shape
        nb = -(-d_in // cls.BLOCK)
        padded = torch.nn.functional.pad(dW.float(), (0, nb * cls.BLOCK - d_in))
        blocks = padded.view(d_out, nb, cls.BLOCK)
        scales = blocks.abs().amax(dim=2).clamp(min=1e-30) / 127.0  # (d_out, nb)
        codes = torch.round(blocks / scales[:, :, None]).to(torch.int8)
        return cls(codes.view(d_out, nb * cls.BLOCK)[:, :d_in].contiguous(), scales)

    def dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The error as a float32 (d_out, d_in) matrix, written into ``out`` if given
        (on ``out``'s device: the int8 codes travel, not the floats)."""
        d_out, d_in = self.codes.shape
        device = self.codes.device if out is None else out.device
        codes, scales = self.codes.to(device), self.scales.to(device)
        if out is None:
            out = torch.empty(d_out, d_in, dtype=torch.float32, device=device)
        if d_in % self.BLOCK == 0:  # the usual case: no padding to cut
            blocks = (d_out, d_in // self.BLOCK, self.BLOCK)
            torch.mul(codes.view(blocks), scales[:, :, None], out=out.view(blocks))
        else:
            torch.mul(codes, scales.repeat_interleave(self.BLOCK, dim=1)[:, :d_in], out=out)
        return out


class DeltaStore(Mapping[str, Sequence[Delta]]):
    """Probe errors in a file, read one layer at a time when a profile needs them.

    Plain reads into fresh tensors, not a memory map: mapped pages would count
    in the process's resident memory, these are only the OS's page cache. The
    three probes of every layer of a model then cost no resident memory.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "probes.bin"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, list[tuple[int, tuple[int, int], int, tuple[int, int]]]] = {}
        self._end = 0
        self.path.write_bytes(b"")

    def put(self, name: str, deltas: Sequence[Delta]) -> None:
        entries = []
        with self.path.open("ab") as f:
            for d in deltas:
                codes = d.codes.contiguous().numpy().tobytes()
                scales = d.scales.contiguous().numpy().tobytes()
                f.write(codes + scales)
                entries.append(
                    (self._end, tuple(d.codes.shape), self._end + len(codes), tuple(d.scales.shape))
                )
                self._end += len(codes) + len(scales)
        self.index[name] = entries  # type: ignore[assignment]

    def __getitem__(self, name: str) -> list[Delta]:
        out = []
        with self.path.open("rb") as f:
            for codes_at, codes_shape, scales_at, scales_shape in self.index[name]:
                codes = torch.empty(codes_shape, dtype=torch.int8)
                scales = torch.empty(scales_shape, dtype=torch.float32)
                for at, t in ((codes_at, codes), (scales_at, scales)):
                    f.seek(at)  # read straight into the tensor's memory: one copy
                    if f.readinto(t.numpy().data.cast("B")) != t.numel() * t.element_size():
                        raise OSError(f"{self.path}: the probes of {name} are cut short")
                out.append(Delta(codes, scales))
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def probe_levels(settings: ProbeSettings) -> tuple[float, ...]:
    """The ratios each layer is probed at: 0, r_max, and r_mid for the power curve."""
    if settings.r_mid is None:
        return (0.0, settings.r_max)
    return (0.0, settings.r_max, settings.r_mid)


def chord_point(
    a_sq: torch.Tensor, ab: torch.Tensor, b_sq: torch.Tensor, mid_sq: torch.Tensor
) -> torch.Tensor:
    """The smaller s with ||a - s b||^2 = mid_sq (per layer; the minimiser if none)."""
    a_sq, ab, b_sq, mid_sq = (x.double() for x in (a_sq, ab, b_sq, mid_sq))
    b_sq = b_sq.clamp(min=1e-300)
    disc = ab * ab - b_sq * (a_sq - mid_sq)
    return (ab - disc.clamp(min=0.0).sqrt()) / b_sq


def curve_exponents(along: torch.Tensor, r_mid: float, r_max: float) -> torch.Tensor:
    """gamma from t = phi(r_mid) / r_max, the fraction of the chord reached at r_mid."""
    x = r_mid / r_max
    t = along.double().clamp(min=x, max=1.0)
    gamma = torch.log(t) / torch.log(torch.tensor(x, dtype=torch.float64))
    return gamma.clamp(GAMMA_MIN, 1.0)


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
        for j in range(block, len(blocks)):
            h = run_block(blocks[j], inputs.moved([h]), j)[0]
    finally:
        adapter.write_weight(module, w_fp)
    return adapter.head(model, h).reshape(logits.shape) - logits


@torch.no_grad()
def sensitivity_profile(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    calib: CalibrationSet,
    probes: Mapping[str, Sequence[Delta]],
    names: list[str],
    settings: ProbeSettings = ProbeSettings(),
    progress: bool = True,
) -> SensitivityProfile:
    """Gram matrices of the per-layer output changes on ``calib`` (forward probes).

    ``probes[name]`` holds layer ``name``'s weight errors at r = 0, r = r_max
    and, with ``settings.r_mid``, at r_mid, in that order (``probe_levels``).
    Each probe re-runs the blocks from the layer's own onward and the head, so
    the cost grows as layers x depth x vocabulary: ``lwq.method.reverse`` is
    the estimator that scales. ``model`` is the full-precision model in memory;
    it is left unchanged.
    """
    t0 = time.perf_counter()
    source = InMemoryCausalLM(model, adapter)
    blocks = adapter.get_blocks(model)
    modules = dict(adapter.iter_layers(model))
    r_max, r_mid = settings.r_max, settings.r_mid
    if r_mid is not None and not 0 < r_mid < r_max:
        raise ValueError(f"r_mid={r_mid} must lie strictly between 0 and r_max={r_max}")
    fp = {n: adapter.read_weight(modules[n]) for n in names}
    vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    P = sketch_matrix(vocab, settings.sketch_dim, settings.seed).to(source.device)
    N = len(names)
    AtA = torch.zeros(N, N, dtype=torch.float64)
    AtB = torch.zeros_like(AtA)
    BtB = torch.zeros_like(AtA)
    mid_sq = torch.zeros(N, dtype=torch.float64)  # sum ||z(r_mid)||^2
    n_tokens = 0
    for batch in tqdm(calib.batches(settings.batch_size), desc="sensitivity", disable=not progress):
        inputs = capture_block_inputs(source, [batch])
        # Full-precision input of every block, and the reference logits.
        block_in = [inputs.hidden[0]]
        for j, blk in enumerate(blocks):
            block_in.append(run_block(blk, inputs.moved([block_in[-1]]), j)[0])
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
                    adapter.block_index(name),
                    fp[name] - d.dense(),
                    fp[name],
                    block_in,
                    inputs,
                    logits,
                )
                for d in probes[name]
            ]
            z = [sketch(d) for d in deltas]  # (T, K) each
            if not all(torch.isfinite(x).all() for x in z):
                raise NumericalError(f"{name}: NaN or inf in the output change of its probe")
            z0, zmax = z[0], z[1]
            A[i] = z0.reshape(-1).cpu()
            B[i] = ((z0 - zmax) / r_max).reshape(-1).cpu()
            if r_mid is not None:
                mid_sq[i] += float(z[2].double().square().sum())
        A64, B64 = A.double(), B.double()
        AtA += A64 @ A64.T
        AtB += A64 @ B64.T
        BtB += B64 @ B64.T
        n_tokens += T
    return assemble_profile(
        names, settings, AtA, AtB, BtB, mid_sq, n_tokens, calib.sha256, time.perf_counter() - t0
    )


def assemble_profile(
    names: Sequence[str],
    settings: ProbeSettings,
    AtA: torch.Tensor,
    AtB: torch.Tensor,
    BtB: torch.Tensor,
    mid_sq: torch.Tensor,
    n_tokens: int,
    calib_sha256: str,
    seconds: float,
    samples: int = 0,
    shrinkage: float = 0.0,
) -> SensitivityProfile:
    """The profile from summed Gram matrices (and damages at r_mid) over ``n_tokens``
    (``samples`` > 0: a reverse-mode estimate from that many sequences, its
    cross-layer terms shrunk by ``shrinkage``)."""
    r_max, r_mid = settings.r_max, settings.r_mid
    gamma = None
    if r_mid is not None:
        s_mid = chord_point(AtA.diagonal(), AtB.diagonal(), BtB.diagonal(), mid_sq)
        gamma = curve_exponents(s_mid / r_max, r_mid, r_max)
    estimator = "reverse" if samples else "forward"
    info = ProbeInfo(
        settings.sketch_dim,
        r_mid,
        settings.seed,
        calib_sha256,
        seconds,
        estimator,
        samples,
        shrinkage,
    )
    return SensitivityProfile(
        tuple(names),
        r_max,
        AtA / n_tokens,
        AtB / n_tokens,
        BtB / n_tokens,
        n_tokens,
        info,
        gamma=gamma,
    )
