"""The layout a packed layer computes from, and its pure-torch operations.

The storage format (``lwq.pack.layer``) is made to be small: the low-grid
codes of the masked weights are left out and the mask is an Elias-Fano code.
Neither can be read by a matrix product. At load time each layer is rearranged
once into this layout, which keeps about the same bytes and can be:

- ``codes``: the low-grid code of every weight, the masked ones set to their
  group's zero (so they add nothing), each row cut into groups of input
  columns, each group padded to whole blocks of 32 columns, each block stored
  in ``4 * bits`` bytes arranged so that neighbouring columns sit in
  neighbouring bytes (see ``kernels.c``);
- ``scales`` (float16) and ``zeros`` (uint8) of each (row, group);
- the high-impact weights as a row-sorted list: ``rowptr`` (int32), ``cols``
  (uint16), ``hi_codes`` with ``hi_scales`` per (row, high group): up to 7
  bits the codes are stored centred (code minus its zero, int8, so a weight is
  one product), 8-bit codes as uint8 with ``hi_zeros``; or ``hi_values``
  (float32) for a float16 high grid.

Every operation here is plain torch and runs on any device (it is the path on
CUDA and wherever the native kernels are not built); ``lwq.runtime.native``
computes the same on CPU without materialising the float weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from lwq.errors import ModelLoadError
from lwq.quant.types import QuantizedWeight

BLOCK = 32
LAYOUT_BITS = (2, 3, 4, 8)
MAX_COLUMNS = 1 << 16  # high-impact columns are uint16


@dataclass(frozen=True)
class Layout:
    """One layer in the compute layout. Tensors are the only state."""

    n_out: int
    n_in: int
    bits: int
    group: int  # columns per low group (the last one may be shorter)
    n_groups: int
    n_blocks: int  # 32-column blocks of a whole group
    last_blocks: int  # 32-column blocks of the last group
    codes: torch.Tensor  # (n_out, row_blocks * 4 * bits) uint8
    scales: torch.Tensor  # (n_out, n_groups) float16
    zeros: torch.Tensor  # (n_out, n_groups) uint8
    rowptr: torch.Tensor | None = None  # (n_out + 1,) int32
    cols: torch.Tensor | None = None  # (n_hi,) int16 holding uint16
    hi_codes: torch.Tensor | None = None  # (n_hi,) int8 centred, or uint8 with hi_zeros
    hi_values: torch.Tensor | None = None  # (n_hi,) float32, float16 high grid
    hi_scales: torch.Tensor | None = None  # (n_out, hi_n_groups) float16
    hi_zeros: torch.Tensor | None = None  # (n_out, hi_n_groups) uint8, 8-bit high grids
    hi_group: int = 0

    @property
    def padded_group(self) -> int:
        return self.n_blocks * BLOCK

    @property
    def row_blocks(self) -> int:
        return (self.n_groups - 1) * self.n_blocks + self.last_blocks

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """(m, n_in) -> (m, row_blocks * 32): each group padded with zeros to whole blocks."""
        width = self.row_blocks * BLOCK
        if width == self.n_in:
            return x
        m, g = x.shape[0], self.group
        flat = torch.nn.functional.pad(x, (0, self.n_groups * g - self.n_in))
        out = x.new_zeros(m, self.n_groups, self.padded_group)
        out[:, :, :g] = flat.view(m, self.n_groups, g)
        return out.view(m, -1)[:, :width].contiguous()

    @property
    def n_hi(self) -> int:
        return 0 if self.cols is None else int(self.cols.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds in memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Layout:
        """The same layer with its tensors replaced (moved to another device)."""
        return replace(self, **tensors)  # type: ignore[arg-type]


def build_layout(name: str, qw: QuantizedWeight) -> Layout:
    """Rearrange an unpacked layer into the compute layout."""
    n_out, n_in = qw.shape
    lo = qw.lo
    if lo.bits not in LAYOUT_BITS:
        raise ModelLoadError(f"layer {name}: a {lo.bits}-bit low grid has no compute layout")
    if n_in > MAX_COLUMNS:
        raise ModelLoadError(
            f"layer {name}: {n_in} input columns; packed modules hold at most {MAX_COLUMNS} "
            "(load this checkpoint dequantised)"
        )
    group, n_groups = lo.group_len(n_in), lo.n_groups(n_in)
    n_blocks = -(-group // BLOCK)
    last_blocks = -(-(n_in - (n_groups - 1) * group) // BLOCK)
    zeros = qw.zeros.round().to(torch.uint8)
    codes = qw.codes.clone()
    if qw.mask is not None:
        g_idx = lo.group_index(n_in)
        codes[qw.mask] = zeros[:, g_idx][qw.mask]
    padded = torch.zeros(n_out, n_groups * group, dtype=torch.uint8)
    padded[:, :n_in] = codes
    padded = padded.view(n_out, n_groups, group)
    blocks = torch.zeros(n_out, n_groups, n_blocks * BLOCK, dtype=torch.uint8)
    blocks[:, :, :group] = padded
    layout = Layout(
        n_out=n_out,
        n_in=n_in,
        bits=lo.bits,
        group=group,
        n_groups=n_groups,
        n_blocks=n_blocks,
        last_blocks=last_blocks,
        codes=_pack_blocks(
            blocks.view(n_out, -1, BLOCK)[:, : (n_groups - 1) * n_blocks + last_blocks].reshape(
                -1, BLOCK
            ),
            lo.bits,
        ).view(n_out, -1),
        scales=qw.scales.to(torch.float16),
        zeros=zeros,
    )
    if qw.mask is None or not bool(qw.mask.any()):
        return layout
    assert qw.hi is not None
    rows, cols = torch.nonzero(qw.mask, as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=n_out)
    rowptr = torch.zeros(n_out + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    hi: dict[str, torch.Tensor | int | None] = {
        "rowptr": rowptr,
        "cols": cols.to(torch.int32).to(torch.int16),  # wraps above 32767: read as uint16
    }
    if qw.hi_values is not None:
        hi["hi_values"] = qw.hi_values[qw.mask].to(torch.float32)
    else:
        assert qw.hi_scales is not None and qw.hi_zeros is not None
        codes = qw.codes[qw.mask]
        hi["hi_scales"] = qw.hi_scales.to(torch.float16)
        if qw.hi.bits <= 7:
            zero = qw.hi_zeros.round().to(torch.int16)[:, qw.hi.group_index(n_in)][qw.mask]
            hi["hi_codes"] = (codes.to(torch.int16) - zero).to(torch.int8)
        else:
            hi["hi_codes"] = codes.clone()
            hi["hi_zeros"] = qw.hi_zeros.round().to(torch.uint8)
        hi["hi_group"] = qw.hi.group_len(n_in)
    return replace(layout, **hi)  # type: ignore[arg-type]


def _pack_blocks(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, 32) codes -> (n, 4 * bits) bytes in the block order of ``kernels.c``."""
    q = q.to(torch.int32)
    if bits == 8:
        return q.to(torch.uint8)
    if bits == 4:
        k = q.view(-1, 2, 16)
        return (k[:, 0] | (k[:, 1] << 4)).to(torch.uint8)
    low = (q & 3).view(-1, 4, 8)  # [k, j]: column 8k + j
    shifts2 = torch.arange(0, 8, 2, dtype=torch.int32).view(1, 4, 1)
    low_bytes = (low << shifts2).sum(dim=1)  # (n, 8)
    if bits == 2:
        return low_bytes.to(torch.uint8)
    third = ((q >> 2) & 1).view(-1, 4, 8)  # byte 8 + k, bit j
    shifts1 = torch.arange(8, dtype=torch.int32).view(1, 1, 8)
    high_bytes = (third << shifts1).sum(dim=2)  # (n, 4)
    return torch.cat([low_bytes, high_bytes], dim=1).to(torch.uint8)


def unpack_blocks(b: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, 4 * bits) bytes -> (n, 32) codes as int32: the inverse of ``_pack_blocks``."""
    b = b.to(torch.int32)
    if bits == 8:
        return b
    if bits == 4:
        return torch.cat([b & 15, b >> 4], dim=1)
    shifts2 = torch.arange(0, 8, 2, dtype=torch.int32, device=b.device).view(1, 4, 1)
    q = ((b[:, None, :8] >> shifts2) & 3).reshape(-1, BLOCK)  # (n, 4, 8) -> column 8k + j
    if bits == 2:
        return q
    shifts1 = torch.arange(8, dtype=torch.int32, device=b.device).view(1, 1, 8)
    third = ((b[:, 8:12, None] >> shifts1) & 1).reshape(-1, BLOCK)  # (n, 4, 8)
    return q | (third << 2)


def dequantize(layout: Layout) -> torch.Tensor:
    """The (n_out, n_in) float32 weight, equal to ``QuantizedWeight.dequantize``."""
    L = layout
    q = unpack_blocks(L.codes.view(-1, 4 * L.bits), L.bits).to(torch.float32)
    q = q.view(L.n_out, L.row_blocks * BLOCK)
    q = torch.nn.functional.pad(q, (0, L.n_groups * L.padded_group - q.shape[1]))
    q = q.view(L.n_out, L.n_groups, L.padded_group)[:, :, : L.group]
    s = L.scales.to(torch.float32)[:, :, None]
    z = L.zeros.to(torch.float32)[:, :, None]
    w = (s * (q - z)).reshape(L.n_out, L.n_groups * L.group)[:, : L.n_in].contiguous()
    if L.rowptr is None:
        return w
    assert L.cols is not None
    counts = (L.rowptr[1:] - L.rowptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(L.n_out, device=w.device), counts)
    cols = L.cols.to(torch.int64) & 0xFFFF
    w[rows, cols] = hi_weights(L, rows, cols)
    return w


def hi_weights(L: Layout, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The float value of each high-impact entry."""
    if L.hi_values is not None:
        return L.hi_values
    assert L.hi_codes is not None and L.hi_scales is not None
    g = cols // L.hi_group
    s = L.hi_scales.to(torch.float32)[rows, g]
    if L.hi_zeros is None:  # centred codes
        return s * L.hi_codes.to(torch.float32)
    return s * (L.hi_codes.to(torch.float32) - L.hi_zeros.to(torch.float32)[rows, g])


def linear(layout: Layout, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias through the float weight (any device)."""
    w = dequantize(layout).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
