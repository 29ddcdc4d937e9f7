"""One quantized layer as bytes: the sections of packed format v1.

A layer is a sequence of byte-aligned sections, concatenated:

=============  =============================================================
codes_lo       b_lo-bit codes of the weights not in the mask, row-major
codes_hi       b_hi-bit codes of the masked (high-impact) weights, row-major;
               with a float16 high grid, their float16 values
scales         float16 scale per (row, group) of the low grid
zeros          b_lo-bit zero point per (row, group); absent when symmetric
mask...        the high-impact map: 1 bit per weight (``bitmap``), the
               Elias-Fano code of its positions (``elias_fano``, sections
               mask_low and mask_high), or 1 bit per input column for a mask
               of whole columns (``columns``, section mask_cols); see
               ``lwq.pack.maskcode``
hi_scales      float16 scale of the high grid, only for the (row, group)
               pairs that hold at least one masked weight
hi_zeros       b_hi-bit zero points of those pairs; absent when symmetric
=============  =============================================================

A float16 high grid (``hi.bits == 16``) has no hi_scales or hi_zeros.

``payload_nbytes`` computes the same byte count from the layer's shape and
settings alone; it is the cost model, and a test holds it equal to what
``pack_layer`` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lwq.errors import ChecksumError, ModelLoadError
from lwq.pack.bits import pack_bits, packed_nbytes, unpack_bits
from lwq.pack.manifest import FORMAT_VERSION, GridMeta, LayerEntry
from lwq.pack.maskcode import (
    cheapest_encoding,
    decode_mask,
    ef_nbytes,
    encode_mask,
    is_column_mask,
    mask_nbytes,
)
from lwq.quant.grid import GridSpec
from lwq.quant.types import QuantizedWeight


def section_sizes(
    d_out: int,
    d_in: int,
    lo: GridSpec,
    hi: GridSpec | None = None,
    n_hi: int = 0,
    n_hi_groups: int = 0,
    mask_encoding: str = "elias_fano",
) -> dict[str, int]:
    """Each section's bytes, from the layer's shape and settings alone."""
    n = d_out * d_in
    n_groups = d_out * lo.n_groups(d_in)
    sizes = {"codes_lo": packed_nbytes(n - n_hi, lo.bits)}
    if hi is not None:
        sizes["codes_hi"] = 2 * n_hi if hi.is_float else packed_nbytes(n_hi, hi.bits)
    sizes["scales"] = 2 * n_groups
    if not lo.symmetric:
        sizes["zeros"] = packed_nbytes(n_groups, lo.bits)
    if hi is None:
        return sizes
    if mask_encoding == "elias_fano":
        sizes["mask_low"], sizes["mask_high"] = ef_nbytes(n_hi, n)
    else:
        key = "mask_cols" if mask_encoding == "columns" else "mask"
        sizes[key] = mask_nbytes(mask_encoding, n_hi, (d_out, d_in))
    if not hi.is_float:
        sizes["hi_scales"] = 2 * n_hi_groups
        if not hi.symmetric:
            sizes["hi_zeros"] = packed_nbytes(n_hi_groups, hi.bits)
    return sizes


def payload_nbytes(
    d_out: int,
    d_in: int,
    lo: GridSpec,
    hi: GridSpec | None = None,
    n_hi: int = 0,
    n_hi_groups: int = 0,
    mask_encoding: str = "elias_fano",
) -> int:
    """Bytes of one packed layer: the cost model of the format."""
    return sum(section_sizes(d_out, d_in, lo, hi, n_hi, n_hi_groups, mask_encoding).values())


@dataclass(frozen=True)
class PackedLayer:
    """A quantized layer as stored: one uint8 blob and its section table."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    lo: GridSpec
    hi: GridSpec | None
    n_hi: int  # masked weights
    n_hi_groups: int  # (row, group) pairs with a high grid
    data: torch.Tensor  # (nbytes,) uint8
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, len)
    mask_encoding: str | None = None
    version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    def check(self) -> None:
        """Refuse a layer this version cannot read: another format version, or
        sections whose sizes do not follow from the layer's shape and settings."""
        if self.version != FORMAT_VERSION:
            raise ModelLoadError(
                f"layer {self.name}: packed format v{self.version}; this lwq reads "
                f"v{FORMAT_VERSION} (install the lwq that wrote it, or re-quantize)"
            )
        want = section_sizes(
            *self.shape,
            self.lo,
            self.hi,
            self.n_hi,
            self.n_hi_groups,
            self.mask_encoding or "elias_fano",
        )
        got = {k: length for k, (_, length) in self.sections.items()}
        if got != want:
            wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            detail = ", ".join(
                f"{k} {got.get(k, 'missing')} (expected {want.get(k, 'none')})" for k in wrong
            )
            raise ChecksumError(
                f"layer {self.name}: section sizes do not match its shape {self.shape} "
                f"and grids: {detail}; the checkpoint is damaged"
            )

    def section(self, name: str) -> torch.Tensor:
        off, length = self.sections[name]
        return self.data[off : off + length]

    def entry(self, file: str, offset: int) -> LayerEntry:
        """What the manifest records of this layer: everything but the bytes."""
        return LayerEntry(
            shape=self.shape,
            lo=grid_meta(self.lo),
            hi=None if self.hi is None else grid_meta(self.hi),
            n_hi=self.n_hi,
            n_hi_groups=self.n_hi_groups,
            mask_encoding=self.mask_encoding,  # type: ignore[arg-type]
            sections=self.sections,
            nbytes=self.nbytes,
            file=file,
            offset=offset,
        )

    @classmethod
    def from_entry(cls, name: str, entry: LayerEntry, data: torch.Tensor) -> PackedLayer:
        if data.numel() != entry.nbytes:
            raise ChecksumError(
                f"layer {name}: {data.numel()} bytes where its manifest entry says "
                f"{entry.nbytes}; the checkpoint is damaged"
            )
        return cls(
            name=name,
            shape=entry.shape,
            lo=grid_from_meta(entry.lo),
            hi=None if entry.hi is None else grid_from_meta(entry.hi),
            n_hi=entry.n_hi,
            n_hi_groups=entry.n_hi_groups,
            data=data,
            sections=dict(entry.sections),
            mask_encoding=entry.mask_encoding,
        )

    def save(self, path: Path) -> Path:
        """This layer alone as a safetensors file (what a per-layer task hands on)."""
        from lwq.fileio import save_tensors

        entry = self.entry(file=Path(path).name, offset=0).model_dump(mode="json")
        meta = {"name": self.name, "entry": json.dumps(entry)}
        return save_tensors({"packed": self.data}, path, meta)

    @classmethod
    def load(cls, path: Path) -> PackedLayer:
        from lwq.fileio import load_tensors

        tensors, meta = load_tensors(path)
        try:
            entry = LayerEntry.model_validate_json(meta["entry"])
            name = meta["name"]
        except (KeyError, ValueError) as err:
            raise ChecksumError(f"{path}: not a packed lwq layer ({err})") from err
        return cls.from_entry(name, entry, tensors["packed"])


def grid_meta(g: GridSpec) -> GridMeta:
    return GridMeta(bits=g.bits, group_size=g.group_size, symmetric=g.symmetric)


def grid_from_meta(meta: GridMeta) -> GridSpec:
    return GridSpec(meta.bits, meta.group_size, meta.symmetric)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().reshape(-1).view(torch.uint8)


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.clone().view(torch.float16).to(torch.float32)  # clone: offset may be odd


def pack_layer(name: str, qw: QuantizedWeight, mask_encoding: str = "auto") -> PackedLayer:
    """Pack ``qw``; ``mask_encoding`` "auto" takes the cheaper encoding for its ratio."""
    d_out, d_in = qw.shape
    lo, hi = qw.lo, qw.hi
    parts: list[tuple[str, torch.Tensor]] = []
    codes = qw.codes.cpu()
    if qw.mask is None:
        parts.append(("codes_lo", pack_bits(codes.reshape(-1), lo.bits)))
    else:
        mask = qw.mask.cpu()
        parts.append(("codes_lo", pack_bits(codes[~mask], lo.bits)))
        assert hi is not None
        if qw.hi_values is not None:
            parts.append(("codes_hi", _fp16_bytes(qw.hi_values.cpu()[mask])))
        else:
            parts.append(("codes_hi", pack_bits(codes[mask], hi.bits)))
    parts.append(("scales", _fp16_bytes(qw.scales.cpu())))
    if not lo.symmetric:
        parts.append(("zeros", pack_bits(qw.zeros.cpu().reshape(-1), lo.bits)))
    n_hi = n_hi_groups = 0
    encoding = None
    if qw.mask is not None:
        assert hi is not None
        mask = qw.mask.cpu()
        n_hi = int(mask.sum())
        encoding = mask_encoding
        if encoding == "auto":
            encoding = cheapest_encoding(n_hi, (d_out, d_in), is_column_mask(mask))
        parts.extend(encode_mask(mask, encoding))
    if qw.mask is not None and qw.hi_values is None:
        assert hi is not None and qw.hi_scales is not None and qw.hi_zeros is not None
        active = _active_groups(mask, hi)  # (d_out, n_groups) bool
        n_hi_groups = int(active.sum())
        parts.append(("hi_scales", _fp16_bytes(qw.hi_scales.cpu()[active])))
        if not hi.symmetric:
            parts.append(("hi_zeros", pack_bits(qw.hi_zeros.cpu()[active], hi.bits)))
    sections, offset = {}, 0
    for key, blob in parts:
        sections[key] = (offset, int(blob.numel()))
        offset += int(blob.numel())
    data = torch.cat([b for _, b in parts])
    return PackedLayer(name, (d_out, d_in), lo, hi, n_hi, n_hi_groups, data, sections, encoding)


def _active_groups(mask: torch.Tensor, grid: GridSpec) -> torch.Tensor:
    """(d_out, n_groups): does the (row, group) hold any masked weight?"""
    d_out, d_in = mask.shape
    g, n_groups = grid.group_len(d_in), grid.n_groups(d_in)
    padded = torch.nn.functional.pad(mask, (0, n_groups * g - d_in))  # short last group
    return padded.view(d_out, n_groups, g).any(dim=2)


def unpack_layer(p: PackedLayer) -> QuantizedWeight:
    """Rebuild the exact ``QuantizedWeight`` that was packed."""
    p.check()
    d_out, d_in = p.shape
    n = d_out * d_in
    lo, hi = p.lo, p.hi
    n_groups = lo.n_groups(d_in)
    scales = _from_fp16_bytes(p.section("scales")).view(d_out, n_groups)
    if lo.symmetric:
        zeros = torch.full_like(scales, (lo.maxq + 1) // 2)
    else:
        zeros = unpack_bits(p.section("zeros"), lo.bits, d_out * n_groups).float()
        zeros = zeros.view(d_out, n_groups)
    if hi is None:
        codes = unpack_bits(p.section("codes_lo"), lo.bits, n).view(d_out, d_in)
        return QuantizedWeight(lo, codes, scales, zeros)
    assert p.mask_encoding is not None
    names = [k for k in p.sections if k.startswith("mask")]
    mask = decode_mask({k: p.section(k) for k in names}, p.mask_encoding, p.n_hi, p.shape)
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8)
    codes[~mask] = unpack_bits(p.section("codes_lo"), lo.bits, n - p.n_hi)
    if hi.is_float:
        values = torch.zeros(d_out, d_in)
        values[mask] = _from_fp16_bytes(p.section("codes_hi"))
        return QuantizedWeight(lo, codes, scales, zeros, hi, mask, hi_values=values)
    codes[mask] = unpack_bits(p.section("codes_hi"), hi.bits, p.n_hi)
    active = _active_groups(mask, hi)
    hi_scales = torch.ones(d_out, hi.n_groups(d_in))
    hi_zeros = torch.zeros_like(hi_scales)
    hi_scales[active] = _from_fp16_bytes(p.section("hi_scales"))
    if hi.symmetric:
        hi_zeros[:] = (hi.maxq + 1) // 2
    else:
        hi_zeros[active] = unpack_bits(p.section("hi_zeros"), hi.bits, p.n_hi_groups).float()
    return QuantizedWeight(lo, codes, scales, zeros, hi, mask, hi_scales, hi_zeros)
