"""The cost model equals the bytes the packer writes, at every ratio."""

from __future__ import annotations

import math

import pytest
import torch

from lwq.method.cost import layer_cost, reachable_bits
from lwq.method.saliency import Structure, ranking, top_mask
from lwq.pack.layer import pack_layer
from lwq.quant.grid import GridSpec
from lwq.quant.rtn import rtn_quantize


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.01, 0.03, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("group", [32, 48])
@pytest.mark.parametrize("hi_bits", [4, 16])
@pytest.mark.parametrize("structure", ["weights", "columns"])
def test_cost_model_equals_packed_bytes(
    ratio: float, group: int, hi_bits: int, structure: Structure
) -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 160, generator=gen)
    scores = W.abs() * (torch.rand(160, generator=gen) + 0.1)  # column-structured saliency
    order = ranking(scores, structure=structure)
    lo, hi = GridSpec(2, group), GridSpec(hi_bits, group)
    cost = layer_cost("l", order, (40, 160), lo, hi, structure)
    mask = top_mask(order, (40, 160), ratio, structure)
    assert int(mask.sum()) == cost.n_hi(ratio)
    if ratio == 0.0:
        packed = pack_layer("l", rtn_quantize(W, lo))
    else:
        packed = pack_layer("l", rtn_quantize(W, lo, mask, hi))
    assert cost.nbytes(ratio) == packed.nbytes


def test_cost_grows_with_ratio_and_slope_is_positive() -> None:
    W = torch.randn(64, 256)
    cost = layer_cost("l", ranking(W.abs()), (64, 256), GridSpec(2, 128), GridSpec(4, 128))
    values = [cost.bits(r) for r in (0.0, 0.01, 0.05, 0.1, 0.2)]
    assert values == sorted(values)
    assert cost.slope(0.05, 0.01, 0.3) > 0
    assert cost.slope(0.3, 0.01, 0.3) > 0  # backward difference at r_max


def test_a_ranking_cut_at_r_max_gives_the_same_costs_and_masks_within_it() -> None:

    W = torch.randn(48, 256)
    full, cut = ranking(W.abs()), ranking(W.abs(), keep=0.3)
    assert cut.dtype == torch.int32 and cut.numel() == math.ceil(0.3 * W.numel())
    lo, hi = GridSpec(2, 64), GridSpec(4, 64)
    a = layer_cost("l", full, (48, 256), lo, hi)
    b = layer_cost("l", cut, (48, 256), lo, hi)
    for r in (0.0, 0.01, 0.1, 0.3):
        assert a.nbytes(r) == b.nbytes(r)
        assert torch.equal(top_mask(full, (48, 256), r), top_mask(cut, (48, 256), r))
    with pytest.raises(ValueError, match="needs 3688 ranked weights, the ranking holds 3687"):
        top_mask(cut, (48, 256), 0.3001)


@pytest.mark.parametrize("r_max", [0.001, 0.05, 0.3])
@pytest.mark.parametrize("structure", ["weights", "columns"])
def test_reachable_bits_bound_the_exact_range(r_max: float, structure: Structure) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(40, 160), (96, 64)]
    lo, hi = GridSpec(2, 32), GridSpec(4, 32)
    costs = [
        layer_cost(
            "l", ranking(torch.rand(s, generator=gen), structure=structure), s, lo, hi, structure
        )
        for s in shapes
    ]
    n = sum(c.n for c in costs)
    exact_low = sum(c.bits(0.0) for c in costs) / n
    exact_high = sum(c.bits(r_max) for c in costs) / n
    low, high = reachable_bits(shapes, lo, hi, r_max, structure)
    assert low == pytest.approx(exact_low)
    assert exact_low < exact_high <= high


def test_columns_protect_whole_columns_and_cost_a_bit_per_column() -> None:
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(64, 256, generator=gen)
    scores = W.abs()
    scores[:, 7] += 10.0  # one clearly salient input column
    order = ranking(scores, structure="columns")
    assert int(order[0]) == 7
    mask = top_mask(order, (64, 256), 0.1, "columns")
    assert mask.all(dim=0).sum() == math.ceil(0.1 * 256) and bool(mask[:, 7].all())
    lo, hi = GridSpec(2, 128), GridSpec(4, 128)
    by_weight = layer_cost("l", ranking(scores), (64, 256), lo, hi)
    by_column = layer_cost("l", order, (64, 256), lo, hi, "columns")
    # beyond the 2-bit base: 2 more code bits per weight, the 256-bit column
    # map, and a 4-bit grid (16-bit scale, 4-bit zero) for every (row, group)
    # holding a column: both groups of all 64 rows, as the top 26 columns span both
    groups = len({int(c) // 128 for c in order[:26]})
    extra = 2 * 26 * 64 + 256 + 64 * groups * 20
    assert by_column.bits(0.1) - by_column.bits(0.0) == extra
    assert by_weight.bits(0.1) - by_weight.bits(0.0) > extra + 3 * 26 * 64  # ~5 bits/weight map
