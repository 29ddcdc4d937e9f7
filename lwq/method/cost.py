"""The cost model: bytes of a layer at ratio r, exactly as the packer writes them.

With the mask fixed by the saliency ranking (the top ceil(r n) weights), every
term of ``lwq.pack.layer.payload_nbytes`` is known before quantization: the
codes and the Elias-Fano mask depend only on the count, and the high grid's
parameters are paid per (row, group) pair that holds a masked weight, which
becomes active at the rank of its most salient weight. ``LayerCost`` keeps those
activation ranks sorted, so the exact cost at any r is one binary search.
With a high-impact set of whole columns the ranks are those of columns, and a
group's d_out pairs activate together, at the rank of its first column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lwq.method.saliency import Structure, n_protected, n_units
from lwq.pack.layer import payload_nbytes
from lwq.pack.maskcode import cheapest_encoding
from lwq.quant.grid import GridSpec


@dataclass(frozen=True)
class LayerCost:
    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    lo: GridSpec
    hi: GridSpec
    activation_ranks: torch.Tensor  # (pairs,) sorted: rank at which each (row, group) activates
    structure: Structure = "weights"

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]

    def n_units(self, ratio: float) -> int:
        """Ranked units (weights or columns) protected at ``ratio``."""
        return n_protected(n_units(self.shape, self.structure), ratio)

    def n_hi(self, ratio: float) -> int:
        """Weights on the high grid at ``ratio``."""
        per_unit = self.shape[0] if self.structure == "columns" else 1
        return self.n_units(ratio) * per_unit

    def nbytes(self, ratio: float) -> int:
        """Bytes of the packed layer at ``ratio`` (what ``pack_layer`` writes)."""
        k = self.n_hi(ratio)
        d_out, d_in = self.shape
        if k == 0:
            return payload_nbytes(d_out, d_in, self.lo)
        # pairs whose first protected unit ranks below the count protected
        active = int(torch.searchsorted(self.activation_ranks, self.n_units(ratio)))
        enc = cheapest_encoding(k, self.shape, self.structure == "columns")
        return payload_nbytes(d_out, d_in, self.lo, self.hi, k, active, enc)

    def bits(self, ratio: float) -> float:
        return 8.0 * self.nbytes(ratio)

    def slope(self, ratio: float, step: float, r_max: float) -> float:
        """Bits per unit of ratio, by a forward difference (backward at r_max)."""
        a, b = (ratio, min(r_max, ratio + step))
        if b - a < step / 2:
            a, b = max(0.0, ratio - step), ratio
        return (self.bits(b) - self.bits(a)) / (b - a)


def layer_cost(
    name: str,
    order: torch.Tensor,
    shape: tuple[int, int],
    lo: GridSpec,
    hi: GridSpec,
    structure: Structure = "weights",
) -> LayerCost:
    """Cost curve of a layer from its saliency ``ranking`` (of weights or of columns).

    The ranking may be cut short (the top r_max of the units): a (row, group)
    pair none of whose weights is in it never activates within the range.
    """
    d_out, d_in = shape
    units = n_units(shape, structure)
    rank = torch.full((units,), units, dtype=torch.int64)
    rank[order.long()] = torch.arange(order.numel())
    g = hi.group_len(d_in)
    if structure == "columns":
        first = torch.full((hi.n_groups(d_in),), units, dtype=torch.int64)
        first.scatter_reduce_(0, torch.arange(d_in) // g, rank, reduce="amin")
        ranks = torch.sort(first.repeat_interleave(d_out)).values
        return LayerCost(name, shape, lo, hi, ranks, structure)
    n = units
    cols = torch.arange(d_in).repeat(d_out)
    rows = torch.arange(d_out).repeat_interleave(d_in)
    pair = rows * hi.n_groups(d_in) + cols // g  # (n,) the (row, group) of each weight
    first = torch.full((d_out * hi.n_groups(d_in),), n, dtype=torch.int64)
    first.scatter_reduce_(0, pair, rank, reduce="amin")
    return LayerCost(name, shape, lo, hi, torch.sort(first).values)


def reachable_bits(
    shapes: list[tuple[int, int]],
    lo: GridSpec,
    hi: GridSpec,
    r_max: float,
    structure: Structure = "weights",
) -> tuple[float, float]:
    """Bounds of the average bits per weight the method can reach, from shapes alone.

    The lower bound is exact (every layer at r = 0); the upper one assumes that
    every (row, group) pair of the high grid is active at r_max, the most the
    saliency ranking can cost. The exact range, known after the profile, lies
    inside; these bounds let a budget outside it fail before any work.
    """
    low = high = 0.0
    for d_out, d_in in shapes:
        per_unit = d_out if structure == "columns" else 1
        k = n_protected(n_units((d_out, d_in), structure), r_max) * per_unit
        pairs = min(k, d_out * hi.n_groups(d_in))  # each active pair holds a protected weight
        enc = cheapest_encoding(k, (d_out, d_in), structure == "columns")
        low += 8.0 * payload_nbytes(d_out, d_in, lo)
        high += 8.0 * payload_nbytes(d_out, d_in, lo, hi, k, pairs, enc)
    total = sum(o * i for o, i in shapes)
    return low / total, high / total
