"""Mask encodings: exact round trips, and sizes that depend only on the count."""

from __future__ import annotations

import math

import pytest
import torch

from lwq.pack.maskcode import (
    cheapest_encoding,
    decode_mask,
    ef_decode,
    ef_encode,
    ef_nbytes,
    encode_mask,
    is_column_mask,
    mask_nbytes,
)


@pytest.mark.parametrize("m", [1, 2, 17, 500, 4096])
@pytest.mark.parametrize("universe", [4096, 100_003])
def test_elias_fano_round_trip_and_size(m: int, universe: int) -> None:
    gen = torch.Generator().manual_seed(m)
    pos = torch.sort(torch.randperm(universe, generator=gen)[:m]).values
    low, high = ef_encode(pos, universe)
    assert (low.numel(), high.numel()) == ef_nbytes(m, universe)
    assert torch.equal(ef_decode(low, high, m, universe), pos)


def test_elias_fano_size_does_not_depend_on_positions() -> None:
    n, m = 50_000, 1_500
    clustered = torch.arange(m)  # all at the start
    spread = torch.arange(m) * (n // m)
    sizes = {tuple(x.numel() for x in ef_encode(p, n)) for p in (clustered, spread)}
    assert sizes == {ef_nbytes(m, n)}


def test_elias_fano_costs_about_log2_inverse_ratio_plus_two() -> None:
    n = 1_000_000
    for r in (0.005, 0.02, 0.05, 0.2):
        m = int(r * n)
        per_weight = mask_nbytes("elias_fano", m, (1000, 1000)) * 8 / m
        assert math.log2(1 / r) <= per_weight <= math.log2(1 / r) + 3


def test_cheapest_encoding_switches_to_bitmap_at_high_ratios() -> None:
    assert cheapest_encoding(100, (100, 1000)) == "elias_fano"
    assert cheapest_encoding(60_000, (100, 1000)) == "bitmap"
    # a mask of whole columns costs a bit per column, whatever the count
    assert cheapest_encoding(100, (100, 1000), columns=True) == "columns"
    assert mask_nbytes("columns", 60_000, (100, 1000)) == 125


@pytest.mark.parametrize("encoding", ["bitmap", "elias_fano"])
def test_mask_round_trip(encoding: str) -> None:
    mask = torch.rand(37, 91, generator=torch.Generator().manual_seed(0)) < 0.07
    parts = dict(encode_mask(mask, encoding))
    m = int(mask.sum())
    assert sum(p.numel() for p in parts.values()) == mask_nbytes(encoding, m, (37, 91))
    assert torch.equal(decode_mask(parts, encoding, m, (37, 91)), mask)


@pytest.mark.parametrize("n_cols", [0, 1, 13, 91])
def test_column_mask_round_trip(n_cols: int) -> None:
    cols = torch.randperm(91, generator=torch.Generator().manual_seed(n_cols))[:n_cols]
    mask = torch.zeros(37, 91, dtype=torch.bool)
    mask[:, cols] = True
    assert is_column_mask(mask)
    parts = dict(encode_mask(mask, "columns"))
    assert sum(p.numel() for p in parts.values()) == mask_nbytes("columns", 37 * n_cols, (37, 91))
    assert torch.equal(decode_mask(parts, "columns", 37 * n_cols, (37, 91)), mask)


def test_column_encoding_refuses_scattered_masks_and_wrong_counts() -> None:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[1, 2] = True
    assert not is_column_mask(mask)
    with pytest.raises(ValueError, match="whole input columns"):
        encode_mask(mask, "columns")
    mask[:, 2] = True
    parts = dict(encode_mask(mask, "columns"))
    with pytest.raises(ValueError, match="cannot hold 5 weights"):
        decode_mask(parts, "columns", 5, (4, 8))
