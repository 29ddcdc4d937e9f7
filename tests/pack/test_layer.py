"""Packing a layer: exact round trips, and the cost model equals the bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lwq.errors import ChecksumError
from lwq.fileio import current_umask
from lwq.pack.layer import PackedLayer, pack_layer, payload_nbytes, unpack_layer
from lwq.quant.grid import GridSpec
from lwq.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 100, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_single_grid_round_trip(bits: int, group_size: int, symmetric: bool) -> None:
    W = torch.randn(24, 200)
    qw = rtn_quantize(W, GridSpec(bits, group_size, symmetric))
    p = pack_layer("l", qw)
    back = unpack_layer(p)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scales, qw.scales)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert p.nbytes == payload_nbytes(24, 200, qw.lo)


@pytest.mark.parametrize("ratio", [0.0, 0.004, 0.05, 0.3])
@pytest.mark.parametrize("lo_bits,hi_bits", [(2, 4), (3, 8), (2, 3), (2, 16)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("encoding", ["bitmap", "elias_fano", "auto"])
def test_two_grid_round_trip(
    ratio: float, lo_bits: int, hi_bits: int, symmetric: bool, encoding: str
) -> None:
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(32, 256, generator=gen)
    mask = torch.rand(32, 256, generator=gen) < ratio
    lo, hi = GridSpec(lo_bits, 64, symmetric), GridSpec(hi_bits, 64, symmetric)
    qw = rtn_quantize(W, lo, mask, hi)
    p = pack_layer("l", qw, encoding)
    back = unpack_layer(p)
    assert back.mask is not None and torch.equal(back.mask, mask)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert p.n_hi == int(mask.sum())
    assert p.mask_encoding is not None
    expected = payload_nbytes(32, 256, lo, hi, p.n_hi, p.n_hi_groups, p.mask_encoding)
    assert p.nbytes == expected
    assert p.entry("f", 0).nbytes == expected


def test_a_packed_layer_file_round_trips_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    W = torch.randn(16, 64)
    mask = torch.rand(16, 64) < 0.1
    p = pack_layer("blk.0.q", rtn_quantize(W, GridSpec(2, 32), mask, GridSpec(4, 32)))
    f = p.save(tmp_path / "l.safetensors")
    assert oct(f.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    back = PackedLayer.load(f)
    assert back.name == p.name and back.sections == p.sections and torch.equal(back.data, p.data)
    assert torch.equal(unpack_layer(back).dequantize(), unpack_layer(p).dequantize())
    from lwq.fileio import save_tensors

    save_tensors({"packed": p.data[:-3]}, tmp_path / "short.safetensors", {
        "name": "blk.0.q", "entry": p.entry("x", 0).model_dump_json()})  # fmt: skip
    with pytest.raises(ChecksumError, match=r"blk\.0\.q: \d+ bytes where its manifest entry"):
        PackedLayer.load(tmp_path / "short.safetensors")


def test_bits_per_weight_of_plain_w4_g128() -> None:
    # 4-bit codes + fp16 scale + 4-bit zero per 128 weights = 4 + 20/128 bits.
    p = pack_layer("l", rtn_quantize(torch.randn(256, 512), GridSpec(4, 128)))
    assert p.nbytes * 8 / p.n_weights == pytest.approx(4 + 20 / 128)
