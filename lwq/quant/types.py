"""The result of quantizing one layer: codes, grids, and the high-impact mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lwq.quant.grid import GridSpec, dequantize


@dataclass(frozen=True)
class QuantizedWeight:
    """A (d_out, d_in) weight on one grid, or on two grids chosen by ``mask``.

    ``codes`` holds each weight's code on the grid its mask assigns: the
    ``lo`` grid where ``mask`` is False (or absent), the ``hi`` grid where it
    is True. Scales are float32 values exactly representable in float16; zeros
    are integers stored as float32 for arithmetic. When the high grid is float16
    (``hi.is_float``), the masked weights are ``hi_values`` (float16-exact,
    zero elsewhere), their codes are 0 and there are no high scales or zeros.
    """

    lo: GridSpec
    codes: torch.Tensor  # (d_out, d_in) uint8
    scales: torch.Tensor  # (d_out, n_groups) float32
    zeros: torch.Tensor  # (d_out, n_groups) float32, integer-valued
    hi: GridSpec | None = None
    mask: torch.Tensor | None = None  # (d_out, d_in) bool: True -> hi grid
    hi_scales: torch.Tensor | None = None  # (d_out, n_groups_hi)
    hi_zeros: torch.Tensor | None = None
    hi_values: torch.Tensor | None = None  # (d_out, d_in) float32, float16 high grid only

    def __post_init__(self) -> None:
        d_out, d_in = self.codes.shape
        assert self.codes.dtype == torch.uint8
        assert self.scales.shape == self.zeros.shape == (d_out, self.lo.n_groups(d_in))
        if self.mask is not None:
            assert self.hi is not None and self.mask.shape == (d_out, d_in)
            if self.hi.is_float:
                assert self.hi_values is not None and self.hi_values.shape == (d_out, d_in)
            else:
                assert self.hi_scales is not None and self.hi_zeros is not None
                assert self.hi_scales.shape == (d_out, self.hi.n_groups(d_in))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The weight the quantized layer computes with: (d_out, d_in) float32."""
        d_in = self.shape[1]
        q = self.codes.to(torch.float32)
        g = self.lo.group_index(d_in, q.device)
        w = dequantize(q, self.scales[:, g], self.zeros[:, g])
        if self.mask is not None and self.hi_values is not None:
            w = torch.where(self.mask, self.hi_values, w)
        elif self.mask is not None:
            assert self.hi is not None and self.hi_scales is not None
            assert self.hi_zeros is not None
            gh = self.hi.group_index(d_in, q.device)
            w_hi = dequantize(q, self.hi_scales[:, gh], self.hi_zeros[:, gh])
            w = torch.where(self.mask, w_hi, w)
        return w
