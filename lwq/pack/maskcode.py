"""Encodings of the high-impact mask of a layer.

``bitmap``: one bit per weight, whatever the ratio.

``elias_fano``: the sorted row-major positions p_1 < ... < p_m of the m masked
weights among U = d_out * d_in, split into L = floor(log2(U / m)) low bits,
stored as a dense m x L bit array, and high parts p_i >> L, stored as a unary
bit vector with a one at (p_i >> L) + i. Its size, m L + m + (U - 1 >> L) + 1
bits (two byte-aligned parts), depends only on (m, U): about log2(1/r) + 2 bits
per masked weight, an exact closed form that the cost model uses as it is.
Both directions are vectorised.

``columns``: one bit per input column, for a mask made of whole columns
(``method.structure=columns``): d_in bits for the layer, whatever the ratio.
"""

from __future__ import annotations

import torch

from lwq.pack.bits import pack_bits, packed_nbytes, unpack_bits

ENCODINGS = ("bitmap", "elias_fano", "columns")


def ef_low_bits(m: int, universe: int) -> int:
    """floor(log2(universe / m)), computed on integers (no float rounding)."""
    return max(0, (universe // m).bit_length() - 1) if m else 0


def ef_nbytes(m: int, universe: int) -> tuple[int, int]:
    """Bytes of the (low, high) parts for m positions among ``universe``."""
    if m == 0:
        return 0, 0
    low = ef_low_bits(m, universe)
    high_len = m + ((universe - 1) >> low) + 1
    return packed_nbytes(m * low, 1), packed_nbytes(high_len, 1)


def mask_nbytes(encoding: str, m: int, shape: tuple[int, int]) -> int:
    """Bytes of a mask of ``m`` weights of a (d_out, d_in) layer under ``encoding``."""
    universe = shape[0] * shape[1]
    if encoding == "bitmap":
        return packed_nbytes(universe, 1)
    if encoding == "elias_fano":
        return sum(ef_nbytes(m, universe))
    if encoding == "columns":
        return packed_nbytes(shape[1], 1)
    raise ValueError(f"unknown mask encoding {encoding!r}; known: {ENCODINGS}")


def cheapest_encoding(m: int, shape: tuple[int, int], columns: bool = False) -> str:
    """The smallest encoding of the mask; ``columns`` says it is made of whole columns."""
    usable = ENCODINGS if columns else tuple(e for e in ENCODINGS if e != "columns")
    return min(usable, key=lambda e: mask_nbytes(e, m, shape))


def is_column_mask(mask: torch.Tensor) -> bool:
    """Is every input column of the (d_out, d_in) mask all in or all out?"""
    return bool((mask.all(dim=0) | ~mask.any(dim=0)).all())


def ef_encode(positions: torch.Tensor, universe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct positions (m,) in [0, universe) -> (low, high) uint8 parts."""
    m = positions.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)
    p = positions.to(torch.int64)
    assert bool((p[1:] > p[:-1]).all()) and int(p[-1]) < universe and int(p[0]) >= 0
    L = ef_low_bits(m, universe)
    low_bits = ((p[:, None] >> torch.arange(L)) & 1).reshape(-1)  # (m * L,) LSB first
    high_len = m + ((universe - 1) >> L) + 1
    high = torch.zeros(high_len, dtype=torch.uint8)
    high[(p >> L) + torch.arange(m)] = 1
    return pack_bits(low_bits, 1), pack_bits(high, 1)


def ef_decode(low: torch.Tensor, high: torch.Tensor, m: int, universe: int) -> torch.Tensor:
    """Inverse of ``ef_encode``: the (m,) sorted positions, int64."""
    if m == 0:
        return torch.zeros(0, dtype=torch.int64)
    L = ef_low_bits(m, universe)
    high_len = m + ((universe - 1) >> L) + 1
    ones = torch.nonzero(unpack_bits(high, 1, high_len)).reshape(-1)  # (m,)
    hi_part = ones - torch.arange(m)
    low_bits = unpack_bits(low, 1, m * L).view(m, L).to(torch.int64)
    lo_part = (low_bits << torch.arange(L)).sum(dim=1) if L else torch.zeros(m, dtype=torch.int64)
    return (hi_part << L) | lo_part


def encode_mask(mask: torch.Tensor, encoding: str) -> list[tuple[str, torch.Tensor]]:
    """The mask's sections under ``encoding``."""
    flat = mask.reshape(-1)
    if encoding == "bitmap":
        return [("mask", pack_bits(flat, 1))]
    if encoding == "elias_fano":
        low, high = ef_encode(torch.nonzero(flat).reshape(-1), flat.numel())
        return [("mask_low", low), ("mask_high", high)]
    if encoding == "columns":
        if not is_column_mask(mask):
            raise ValueError("mask encoding 'columns' needs a mask of whole input columns")
        return [("mask_cols", pack_bits(mask.any(dim=0), 1))]
    raise ValueError(f"unknown mask encoding {encoding!r}; known: {ENCODINGS}")


def decode_mask(
    sections: dict[str, torch.Tensor], encoding: str, m: int, shape: tuple[int, int]
) -> torch.Tensor:
    n = shape[0] * shape[1]
    if encoding == "bitmap":
        return unpack_bits(sections["mask"], 1, n).view(shape).bool()
    if encoding == "elias_fano":
        pos = ef_decode(sections["mask_low"], sections["mask_high"], m, n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[pos] = True
        return mask.view(shape)
    if encoding == "columns":
        cols = unpack_bits(sections["mask_cols"], 1, shape[1]).bool()
        if int(cols.sum()) * shape[0] != m:
            raise ValueError(f"a column mask of {int(cols.sum())} columns cannot hold {m} weights")
        return cols[None, :].expand(shape).contiguous()
    raise ValueError(f"unknown mask encoding {encoding!r}; known: {ENCODINGS}")
