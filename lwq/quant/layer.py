"""One layer, one job: the single entry point every quantization path goes through.

A ``LayerJob`` says how to quantize one (d_out, d_in) weight: its ``lo`` grid
and, for the method's mixed layers, the high-impact ``mask`` and its ``hi``
grid. Uniform RTN and GPTQ are the job without a mask; the layer-wise method
(docs/method.md, "Quantization of one layer") is the job with one. With a
Hessian and GPTQ settings the layer gets one (mixed-precision) GPTQ pass,
otherwise round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lwq.pack.maskcode import is_column_mask
from lwq.quant.gptq import GPTQSettings, gptq_quantize
from lwq.quant.grid import GridSpec
from lwq.quant.lwc import LWCSettings, learn_clipping
from lwq.quant.rtn import rtn_quantize
from lwq.quant.types import QuantizedWeight


@dataclass(frozen=True)
class LayerJob:
    name: str
    lo: GridSpec
    hi: GridSpec | None = None
    mask: torch.Tensor | None = None  # (d_out, d_in) bool: True -> the hi grid
    # GPTQ quantizes the low columns first and the high ones last, so that the
    # finer grid absorbs the coarse one's error (a mask of whole columns only)
    hi_last: bool = False

    def __post_init__(self) -> None:
        assert (self.mask is None) == (self.hi is None), "a mask needs its hi grid"
        if self.hi_last and self.mask is not None:
            assert is_column_mask(self.mask), "hi_last: whole columns"

    def column_order(self, priority: torch.Tensor | None = None) -> torch.Tensor | None:
        """GPTQ's column order: None (as GPTQ's settings say) or low columns, then
        high ones, each part left to right or by decreasing ``priority`` (d_in,)."""
        if not self.hi_last or self.mask is None:
            return None
        cols = self.mask.all(dim=0)
        parts = [torch.nonzero(~cols).flatten(), torch.nonzero(cols).flatten()]
        if priority is not None:
            parts = [p[torch.argsort(priority[p], descending=True, stable=True)] for p in parts]
        return torch.cat(parts)


@dataclass(frozen=True)
class LayerOutcome:
    weight: QuantizedWeight
    gptq_loss: float | None  # GPTQ's proxy loss; None for RTN
    # tr(dW H dW^T) / tr(W H W^T): the layer's relative output error on the
    # calibration inputs; None unless measured (it costs two more matmuls).
    output_error: float | None


def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) for W, Wq (d_out, d_in) and H (d_in, d_in)."""
    dW = W - Wq
    return float(((dW @ H) * dW).sum() / ((W @ H) * W).sum().clamp(min=1e-30))


def quantize_layer(
    W: torch.Tensor,
    H: torch.Tensor | None,
    job: LayerJob,
    gptq: GPTQSettings | None,
    lwc: LWCSettings | None = None,
    measure_error: bool = False,
) -> LayerOutcome:
    """Quantize ``W`` (d_out, d_in) as ``job`` says.

    GPTQ when ``gptq`` is given (it needs ``H``), else RTN. ``lwc`` learns the
    high grid's clipping first (GPTQ with an integer high grid only).
    ``measure_error`` reports the relative output error (needs ``H``).
    """
    mask = job.mask if job.mask is not None and bool(job.mask.any()) else None
    hi = job.hi if mask is not None else None
    loss: float | None = None
    if gptq is None:
        qw = rtn_quantize(W, job.lo, mask, hi)
    else:
        if H is None:
            raise ValueError(f"{job.name}: GPTQ needs the layer's input Hessian")
        hi_grid = None
        if lwc is not None and mask is not None and hi is not None and not hi.is_float:
            hi_grid = learn_clipping(W, H, mask, hi, lwc)
        res = gptq_quantize(
            W,
            H,
            job.lo,
            gptq,
            mask=mask,
            hi=hi,
            name=job.name,
            hi_grid=hi_grid,
            column_order=None
            if mask is None
            else job.column_order(H.diagonal() if gptq.act_order else None),
        )
        qw, loss = res.weight, res.loss
    error = None
    if measure_error and H is not None:
        error = relative_output_error(W, qw.dequantize(), H)
    return LayerOutcome(qw, loss, error)


def quantize_together(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    jobs: Sequence[LayerJob],
    gptq: GPTQSettings | None,
) -> list[torch.Tensor]:
    """The dequantized result of each ``jobs[k]`` on ``weights[k]``, all with input Hessian ``H``.

    GPTQ quantizes each row given H alone (the rounding error moves along the
    row, through the inverse Hessian's Cholesky factor), so jobs that share H,
    the low grid and the high grid run as one pass over their stacked rows: one
    factorization and one column loop instead of one per job, with the same
    result up to float rounding. A job without a mask takes an empty one. Jobs
    that cannot share a pass (whole-column masks, which set their own column
    order) run alone, as every job does without ``gptq`` (RTN).
    """
    assert len(weights) == len(jobs)
    out: list[torch.Tensor | None] = [None] * len(jobs)
    groups: dict[GridSpec, list[int]] = {}  # by low grid
    his: dict[GridSpec, GridSpec] = {}  # each group's high grid
    for k, job in enumerate(jobs):
        alone = gptq is None or job.hi_last
        if alone or (job.hi is not None and his.setdefault(job.lo, job.hi) != job.hi):
            out[k] = quantize_layer(weights[k], H, job, gptq).weight.dequantize()
        else:
            groups.setdefault(job.lo, []).append(k)
    for lo, group in groups.items():
        assert gptq is not None
        for members in _chunks(group, [weights[k].numel() for k in group]):
            _quantize_stack(weights, H, jobs, lo, his.get(lo), members, gptq, out)
    done = [t for t in out if t is not None]
    assert len(done) == len(jobs), "every job quantized"
    return done


# Elements of one stacked pass at most (128 MB in float32): the pass holds a few
# working copies of its rows, so large layers of large models go in several.
STACK_ELEMENTS = 1 << 25


def _chunks(members: list[int], sizes: list[int]) -> list[list[int]]:
    out: list[list[int]] = [[]]
    total = 0
    for k, n in zip(members, sizes, strict=True):
        if out[-1] and total + n > STACK_ELEMENTS:
            out.append([])
            total = 0
        out[-1].append(k)
        total += n
    return out


def _quantize_stack(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    jobs: Sequence[LayerJob],
    lo: GridSpec,
    hi: GridSpec | None,
    members: list[int],
    gptq: GPTQSettings,
    out: list[torch.Tensor | None],
) -> None:
    """One GPTQ pass over the stacked rows of ``jobs[k]``, k in ``members``."""
    W = torch.cat([weights[k] for k in members])
    mask = None
    if hi is not None:
        empty = lambda k: torch.zeros_like(weights[k], dtype=torch.bool)  # noqa: E731
        mask = torch.cat([m if (m := jobs[k].mask) is not None else empty(k) for k in members])
        if not bool(mask.any()):
            mask, hi = None, None
    name = "+".join(jobs[k].name for k in members)
    deq = gptq_quantize(W, H, lo, gptq, mask=mask, hi=hi, name=name).weight.dequantize()
    for k, part in zip(members, deq.split([weights[k].shape[0] for k in members]), strict=True):
        out[k] = part
