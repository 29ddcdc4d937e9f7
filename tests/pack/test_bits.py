from __future__ import annotations

import pytest
import torch

from lwq.pack.bits import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 2_100_003])
def test_round_trip_is_exact(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_layout_is_little_endian_dense() -> None:
    # 3-bit codes 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001
    packed = pack_bits(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b00000001]
    two = pack_bits(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2)
    assert two.tolist() == [0b10010011]


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)
