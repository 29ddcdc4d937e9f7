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
- the high-impact weights as one list sorted by row and high group, with a
  count per (row, high group) (``hi_counts``) and a float16 scale per (row,
  high group): each entry is one 16-bit word (32-bit when it does not fit)
  holding the column within its group and the code minus its zero (so a weight
  is one product), or the column alone with ``hi_values`` (float32) for a
  float16 high grid. A layer with fewer than ``ROW_LIST_BELOW`` entries per
  group on average keeps one list per row instead (``hi_cols`` uint16 and
  ``hi_codes`` int8, code minus zero), which the kernels walk without a step
  per group. A layer with so many high-impact weights that a second grid laid
  out like ``codes`` takes no more bytes than the list (about a quarter of the
  weights at 4 bits) keeps them that way (``hi_grid_codes``, with
  ``hi_zeros``): the high code at the high-impact places, the high zero
  everywhere else, so the layer is the sum of two dense products, which is
  also faster than walking the list.

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
ROW_LIST_BELOW = 8  # mean entries per (row, high group) under which a layer's list is per row
LAYOUT_BITS = (2, 3, 4, 8)


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
    rowptr: torch.Tensor | None = None  # (n_out + 1,) int32: first entry of each row
    hi_counts: torch.Tensor | None = None  # (n_out, hi_n_groups) int16 holding uint16
    hi_entries: torch.Tensor | None = None  # (n_hi,) int16 (uint16) or int32
    hi_scales: torch.Tensor | None = None  # (n_out, hi_n_groups) float16
    hi_values: torch.Tensor | None = None  # (n_hi,) float32, float16 high grid
    hi_cols: torch.Tensor | None = None  # (n_hi,) int16 holding uint16: sparse layers
    hi_codes: torch.Tensor | None = None  # (n_hi,) int8 code - zero: sparse layers
    hi_group: int = 0
    hi_code_bits: int = 0  # low bits of an entry holding code - zero + 2**(bits - 1)
    # A dense high grid (layers with many high-impact weights; no lists then):
    hi_grid_codes: torch.Tensor | None = None  # like codes, at hi_bits; the zero elsewhere
    hi_zeros: torch.Tensor | None = None  # (n_out, hi_n_groups) uint8
    hi_bits: int = 0

    @property
    def padded_group(self) -> int:
        return self.n_blocks * BLOCK

    @property
    def reads(self) -> tuple[int, int, int]:
        """What fixes the activations' padded layout: layers with equal values
        read one input the same way (and can share a native call)."""
        return (self.n_in, self.group, self.n_blocks)

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

    def hi_grid(self) -> Layout | None:
        """The dense high grid as a layer of its own (its weights are zero off
        the high-impact places, as the low grid's are on them), or None."""
        if self.hi_grid_codes is None:
            return None
        assert self.hi_scales is not None and self.hi_zeros is not None
        n_groups = self.hi_scales.shape[1]
        return Layout(
            n_out=self.n_out,
            n_in=self.n_in,
            bits=self.hi_bits,
            group=self.hi_group,
            n_groups=n_groups,
            n_blocks=self.hi_group // BLOCK,
            last_blocks=-(-(self.n_in - (n_groups - 1) * self.hi_group) // BLOCK),
            codes=self.hi_grid_codes,
            scales=self.hi_scales,
            zeros=self.hi_zeros,
        )

    @property
    def n_hi(self) -> int:
        for t in (self.hi_entries, self.hi_cols):
            if t is not None:
                return int(t.numel())
        return 0

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
    group, n_groups = lo.group_len(n_in), lo.n_groups(n_in)
    n_blocks = -(-group // BLOCK)
    last_blocks = -(-(n_in - (n_groups - 1) * group) // BLOCK)
    zeros = qw.zeros.round().to(torch.uint8)
    codes = qw.codes.clone()
    if qw.mask is not None:
        codes[qw.mask] = zeros[:, lo.group_index(n_in)][qw.mask]
    layout = Layout(
        n_out=n_out,
        n_in=n_in,
        bits=lo.bits,
        group=group,
        n_groups=n_groups,
        n_blocks=n_blocks,
        last_blocks=last_blocks,
        codes=_grid_codes(codes, group, n_groups, n_blocks, last_blocks, lo.bits),
        scales=qw.scales.to(torch.float16),
        zeros=zeros,
    )
    if qw.mask is None or not bool(qw.mask.any()):
        return layout
    listed = _high_lists(layout, qw)
    if not _grid_fits(qw, layout):
        return listed
    grid = _high_grid(layout, qw)
    return grid if grid.nbytes <= listed.nbytes else listed


def _high_grid(layout: Layout, qw: QuantizedWeight) -> Layout:
    """The high-impact weights as a second grid in the low grid's block layout:
    the high code at the high-impact places, the high zero elsewhere."""
    hi, n_in = qw.hi, qw.shape[1]
    assert hi is not None and qw.mask is not None
    assert qw.hi_scales is not None and qw.hi_zeros is not None
    hi_group, hi_n_groups = hi.group_len(n_in), hi.n_groups(n_in)
    hi_zeros = qw.hi_zeros.round().to(torch.uint8)
    hi_codes = hi_zeros[:, hi.group_index(n_in)]
    hi_codes[qw.mask] = qw.codes[qw.mask].to(torch.uint8)
    blocks, last = hi_group // BLOCK, (n_in - (hi_n_groups - 1) * hi_group) // BLOCK
    return replace(
        layout,
        hi_grid_codes=_grid_codes(hi_codes, hi_group, hi_n_groups, blocks, last, hi.bits),
        hi_scales=qw.hi_scales.to(torch.float16),
        hi_zeros=hi_zeros,
        hi_group=hi_group,
        hi_bits=hi.bits,
    )


def _high_lists(layout: Layout, qw: QuantizedWeight) -> Layout:
    """The high-impact weights as a list sorted by row and high group."""
    hi, (n_out, n_in) = qw.hi, qw.shape
    assert hi is not None and qw.mask is not None
    hi_group, hi_n_groups = hi.group_len(n_in), hi.n_groups(n_in)
    rows, cols = torch.nonzero(qw.mask, as_tuple=True)  # row-major: rows, groups, columns
    groups = cols // hi_group
    counts = torch.bincount(rows * hi_n_groups + groups, minlength=n_out * hi_n_groups)
    rowptr = torch.zeros(n_out + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(counts.view(n_out, hi_n_groups).sum(dim=1), 0).to(torch.int32)
    code_bits = 0 if hi.is_float else hi.bits + 1  # code - zero lies in (-2**bits, 2**bits)
    entries = (cols - groups * hi_group) << code_bits
    extra: dict[str, torch.Tensor | int] = {}
    if hi.is_float:
        assert qw.hi_values is not None
        extra["hi_values"] = qw.hi_values[qw.mask].to(torch.float32)
    else:
        assert qw.hi_scales is not None and qw.hi_zeros is not None
        zero = qw.hi_zeros.round().to(torch.int64)[rows, groups]
        entries |= qw.codes[qw.mask].to(torch.int64) - zero + (1 << hi.bits)
        extra["hi_scales"] = qw.hi_scales.to(torch.float16)
    if not hi.is_float and hi.bits <= 7 and len(rows) < ROW_LIST_BELOW * counts.numel():
        # Few entries per group: one list per row (a column and a code per entry)
        # decodes faster than walking every group, for a byte more per entry.
        centred = (entries & ((1 << code_bits) - 1)) - (1 << hi.bits)
        return replace(
            layout,
            rowptr=rowptr,
            hi_cols=_as_uint16(cols),
            hi_codes=centred.to(torch.int8),
            hi_group=hi_group,
            **extra,  # type: ignore[arg-type]
        )
    wide = (hi_group - 1).bit_length() + code_bits > 16
    return replace(
        layout,
        rowptr=rowptr,
        hi_counts=_as_uint16(counts.view(n_out, hi_n_groups)),
        hi_entries=entries.to(torch.int32) if wide else _as_uint16(entries),
        hi_group=hi_group,
        hi_code_bits=code_bits,
        **extra,  # type: ignore[arg-type]
    )


def _grid_codes(
    codes: torch.Tensor, group: int, n_groups: int, n_blocks: int, last_blocks: int, bits: int
) -> torch.Tensor:
    """(n_out, n_in) codes -> (n_out, row_blocks * 4 * bits) bytes: each group
    padded to whole 32-column blocks, each block packed as ``kernels.c`` reads it."""
    n_out, n_in = codes.shape
    padded = torch.zeros(n_out, n_groups * group, dtype=torch.uint8)
    padded[:, :n_in] = codes
    blocks = torch.zeros(n_out, n_groups, n_blocks * BLOCK, dtype=torch.uint8)
    blocks[:, :, :group] = padded.view(n_out, n_groups, group)
    whole = blocks.view(n_out, -1, BLOCK)[:, : (n_groups - 1) * n_blocks + last_blocks]
    return _pack_blocks(whole.reshape(-1, BLOCK), bits).view(n_out, -1)


def _grid_fits(qw: QuantizedWeight, layout: Layout) -> bool:
    """Whether the high-impact weights can be a second grid: an integer grid of
    a width the kernels read, integer zeros, and groups of whole 32-column
    blocks on both grids (so both read the activations in the same layout)."""
    hi, n_in = qw.hi, qw.shape[1]
    assert hi is not None
    return (
        not hi.is_float
        and hi.bits in LAYOUT_BITS
        and hi.group_len(n_in) % BLOCK == 0
        and layout.row_blocks * BLOCK == n_in
        and qw.hi_zeros is not None
        and bool((qw.hi_zeros == qw.hi_zeros.round()).all())
    )


def _as_uint16(t: torch.Tensor) -> torch.Tensor:
    """Values in [0, 65536) stored in int16 (the kernels read uint16)."""
    if t.numel() and int(t.max()) >= 1 << 16:
        raise ModelLoadError("a high-impact group of more than 65535 weights has no compute layout")
    return t.to(torch.int32).to(torch.int16)


def _uint16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFF if t.dtype == torch.int16 else t.to(torch.int64)


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
    hi = L.hi_grid()
    if hi is not None:  # zero where the other grid holds the weight: the sum is exact
        return w.add_(dequantize(hi))
    if L.rowptr is None:
        return w
    rows, cols, values = hi_entries(L)
    w[rows, cols] = values
    return w


def hi_entries(L: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and float value of each high-impact entry."""
    assert L.rowptr is not None
    if L.hi_cols is not None:  # one list per row
        assert L.hi_codes is not None and L.hi_scales is not None
        counts = (L.rowptr[1:] - L.rowptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(L.n_out, device=counts.device), counts)
        cols = _uint16(L.hi_cols)
        s = L.hi_scales.to(torch.float32)[rows, cols // L.hi_group]
        return rows, cols, s * L.hi_codes.to(torch.float32)
    assert L.hi_counts is not None and L.hi_entries is not None
    n_groups = L.hi_counts.shape[1]
    cell = torch.repeat_interleave(
        torch.arange(L.n_out * n_groups, device=L.hi_entries.device), _uint16(L.hi_counts).view(-1)
    )
    rows, groups = cell // n_groups, cell % n_groups
    e = _uint16(L.hi_entries)
    cols = groups * L.hi_group + (e >> L.hi_code_bits)
    if L.hi_values is not None:
        return rows, cols, L.hi_values
    assert L.hi_scales is not None
    code = (e & ((1 << L.hi_code_bits) - 1)) - (1 << (L.hi_code_bits - 1))
    return rows, cols, L.hi_scales.to(torch.float32)[rows, groups] * code.to(torch.float32)
