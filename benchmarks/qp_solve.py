"""Solve time of the allocation QP at LLaMA-7B and LLaMA-70B layer counts.

Synthetic profiles (random sketched output changes with a shared component,
K = 128) and synthetic cost curves of the real layer shapes (7 linears per
block, activation ranks of the high grid's (row, group) pairs drawn at random),
solved end to end by ``solve_allocation`` (tangent iterations plus the exact
budget repair). Prints the median of several runs per setting.

    python benchmarks/qp_solve.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lwq.method.cost import LayerCost
from lwq.method.qp import SensitivityProfile, feasible_range, solve_allocation
from lwq.quant.grid import GridSpec

SHAPES = {  # (d_out, d_in) of q, k, v, o, gate, up, down
    "7B": (32, [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]),
    "70B": (
        80,
        [
            (8192, 8192),
            (1024, 8192),
            (1024, 8192),
            (8192, 8192),
            (28672, 8192),
            (28672, 8192),
            (8192, 28672),
        ],
    ),
}


def synthetic(
    blocks: int, shapes: list[tuple[int, int]], k: int = 128, seed: int = 0
) -> tuple[SensitivityProfile, list[LayerCost]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = GridSpec(2, 128), GridSpec(4, 128)
    costs, names = [], []
    for b in range(blocks):
        for j, (d_out, d_in) in enumerate(shapes):
            name = f"layers.{b}.{j}"
            pairs = d_out * hi.n_groups(d_in)
            # A pair activates at the rank of its best weight: roughly uniform ranks.
            ranks = torch.sort(torch.randint(0, d_out * d_in, (pairs,), generator=gen)).values
            costs.append(LayerCost(name, (d_out, d_in), lo, hi, ranks))
            names.append(name)
    n = len(names)
    r_max = 0.1
    shared = torch.randn(k, 1, generator=gen, dtype=torch.float64)
    A = 0.5 * shared + torch.randn(k, n, generator=gen, dtype=torch.float64)
    A = A * (torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.1)
    B = A / r_max * (0.4 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64))
    return SensitivityProfile(tuple(names), r_max, A.T @ A, A.T @ B, B.T @ B, 1), costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print("| model | N layers | objective | solver | median s | min s | bits (budget 2.5) |")
    print("|---|---|---|---|---|---|---|")
    for model, (blocks, shapes) in SHAPES.items():
        profile, costs = synthetic(blocks, shapes)
        lo, hi = feasible_range(costs, profile.r_max)
        budget = min(max(2.5, lo), hi)
        for objective, solver in (("full", "CLARABEL"), ("full", "OSQP"), ("diagonal", "CLARABEL")):
            times, bits = [], 0.0
            for _ in range(args.repeats):
                alloc = solve_allocation(
                    profile,
                    costs,
                    budget,
                    objective,  # type: ignore[arg-type]
                    solver=solver,
                    tol=1e-7,
                )
                times.append(alloc.seconds)
                bits = alloc.bits
            print(
                f"| {model} | {len(costs)} | {objective} | {solver} | "
                f"{statistics.median(times):.3f} | {min(times):.3f} | {bits:.4f} |"
            )


if __name__ == "__main__":
    main()
