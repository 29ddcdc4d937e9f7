"""Bit packing of integer codes: b-bit codes as a dense little-endian bit stream.

Code k occupies bits [k*b, (k+1)*b) of the stream, least significant bit
first; the stream is padded with zero bits to a whole byte. Works for any b in
1..8 (3-bit codes straddle bytes) and on any device.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 20  # codes per step, a multiple of 8 so chunks end on byte boundaries


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) integer codes < 2**bits -> (ceil(n*bits/8),) uint8."""
    assert 1 <= bits <= 8
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    weights = 2 ** torch.arange(8, device=flat.device, dtype=torch.int32)  # bit values
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)  # (m*bits,) bits, LSB first
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(out) if out else flat.new_zeros(0)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: (nbytes,) uint8 -> (n,) uint8 codes."""
    assert 1 <= bits <= 8
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"packed stream has {packed.numel()} bytes, {bits}-bit x {n} needs "
            f"{packed_nbytes(n, bits)}"
        )
    if bits == 8:
        return packed.clone()
    shifts8 = torch.arange(8, device=packed.device, dtype=torch.uint8)
    weights = 2 ** torch.arange(bits, device=packed.device, dtype=torch.int32)
    out = []
    step = _CHUNK * bits // 8  # bytes per chunk of _CHUNK codes
    for start in range(0, packed.numel(), step):
        chunk = packed[start : start + step]
        stream = ((chunk[:, None] >> shifts8) & 1).reshape(-1)  # bits, LSB first
        m = min(_CHUNK, n - (start * 8) // bits)
        codes = stream[: m * bits].view(m, bits).to(torch.int32)
        out.append((codes * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(out) if out else packed.new_zeros(0)
