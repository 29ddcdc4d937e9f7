"""The allocation QP on synthetic profiles with known structure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lwq.errors import ConfigError
from lwq.method.cost import LayerCost, layer_cost
from lwq.method.qp import SensitivityProfile, feasible_range, solve_allocation, total_bits
from lwq.method.saliency import ranking
from lwq.quant.grid import GridSpec


def synthetic(
    n_layers: int,
    k: int = 64,
    seed: int = 0,
    r_max: float = 0.3,
    shape: tuple[int, int] = (16, 128),
    curved: bool = False,
) -> tuple[SensitivityProfile, list[LayerCost]]:
    """Layers whose output changes a_i shrink with r (linearly, or along power curves
    r_max (r / r_max)^gamma_i), with shared directions."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(k, generator=gen, dtype=torch.float64)
    scale = torch.rand(n_layers, generator=gen, dtype=torch.float64) * 3 + 0.2
    A = torch.stack(
        [s * (0.7 * shared + torch.randn(k, generator=gen, dtype=torch.float64)) for s in scale],
        dim=1,
    )  # (k, N) columns a_i
    B = A / r_max * (0.5 + 0.5 * torch.rand(n_layers, generator=gen, dtype=torch.float64))
    names = tuple(f"l{i}" for i in range(n_layers))
    gamma = 0.25 + 0.75 * torch.rand(n_layers, generator=gen, dtype=torch.float64)
    profile = SensitivityProfile(
        names, r_max, A.T @ A, A.T @ B, B.T @ B, n_tokens=1, gamma=gamma if curved else None
    )
    lo, hi = GridSpec(2, 64), GridSpec(4, 64)
    costs = [layer_cost(n, ranking(torch.rand(shape, generator=gen)), shape, lo, hi) for n in names]
    return profile, costs


@pytest.mark.parametrize("curved", [False, True])
def test_full_beats_diagonal_beats_fixed_at_equal_bits(curved: bool) -> None:
    profile, costs = synthetic(12, curved=curved)
    lo, hi = feasible_range(costs, profile.r_max)
    budget = lo + 0.3 * (hi - lo)
    runs = {o: solve_allocation(profile, costs, budget, o) for o in ("fixed", "diagonal", "full")}
    for a in runs.values():
        assert a.bits <= budget + 1e-9
        assert a.bits >= budget - 0.02
        assert all(0 <= r <= profile.r_max + 1e-9 for r in a.ratios)
    assert len(set(runs["fixed"].ratios)) == 1
    assert runs["full"].predicted_loss <= runs["diagonal"].predicted_loss + 1e-9
    assert runs["full"].predicted_loss < runs["fixed"].predicted_loss


@pytest.mark.parametrize("curved", [False, True])
def test_matches_brute_force_on_two_layers(curved: bool) -> None:
    profile, costs = synthetic(2, shape=(32, 256), curved=curved)
    lo, hi = feasible_range(costs, profile.r_max)
    budget = lo + 0.4 * (hi - lo)
    alloc = solve_allocation(profile, costs, budget, "full")
    grid = np.linspace(0, profile.r_max, 121)
    best = min(
        (
            profile.predicted_loss([a, b])
            for a, b in itertools.product(grid, grid)
            if total_bits(costs, [a, b]) <= budget * sum(c.n for c in costs)
        ),
    )
    assert alloc.predicted_loss <= best * 1.01 + 1e-9


@pytest.mark.parametrize("curved", [False, True])
def test_solvers_agree_and_ties_hold(curved: bool) -> None:
    profile, costs = synthetic(8, curved=curved)
    lo, hi = feasible_range(costs, profile.r_max)
    budget = 0.5 * (lo + hi)
    a = solve_allocation(profile, costs, budget, "full", solver="CLARABEL")
    b = solve_allocation(profile, costs, budget, "full", solver="OSQP", tol=1e-7)
    assert a.predicted_loss == pytest.approx(b.predicted_loss, rel=1e-2)
    tied = solve_allocation(profile, costs, budget, "full", ties=[[0, 1, 2], [5, 6]])
    assert tied.ratios[0] == pytest.approx(tied.ratios[1], abs=1e-6)
    assert tied.ratios[0] == pytest.approx(tied.ratios[2], abs=1e-6)
    assert tied.ratios[5] == pytest.approx(tied.ratios[6], abs=1e-6)


def test_infeasible_budget_states_the_range() -> None:
    profile, costs = synthetic(4)
    lo, hi = feasible_range(costs, profile.r_max)
    with pytest.raises(ConfigError, match=rf"feasible range is \[{lo:.4f}, {hi:.4f}\]"):
        solve_allocation(profile, costs, lo - 0.1)
    with pytest.raises(ConfigError, match="infeasible"):
        solve_allocation(profile, costs, hi + 0.1)
    with pytest.raises(ConfigError, match=r"method\.solver"):
        solve_allocation(profile, costs, lo, solver="GUROBI")


def test_curved_prediction_is_the_quadratic_at_the_effective_ratios() -> None:
    profile, _ = synthetic(5, curved=True)
    assert profile.gamma is not None
    r = torch.tensor([0.0, 0.01, 0.05, 0.2, 0.3], dtype=torch.float64)
    s = profile.r_max * (r / profile.r_max) ** profile.gamma
    chord = SensitivityProfile(
        profile.names, profile.r_max, profile.AtA, profile.AtB, profile.BtB, 1
    )
    assert profile.predicted_loss(r) == pytest.approx(chord.predicted_loss(s))
    assert profile.per_layer_loss(r).tolist() == pytest.approx(chord.per_layer_loss(s).tolist())


def two_bases(n_layers: int, seed: int = 0) -> tuple[SensitivityProfile, list[LayerCost]]:
    """A profile over two bases, base-major: on the wider base (3 bits) every layer's
    output change is smaller, by a factor that differs per layer."""
    gen = torch.Generator().manual_seed(seed)
    p2, c2 = synthetic(n_layers, seed=seed, curved=True)
    shrink = 0.02 + 0.3 * torch.rand(n_layers, generator=gen, dtype=torch.float64)
    d = torch.cat([torch.ones(n_layers, dtype=torch.float64), shrink])
    A = torch.cat([torch.eye(n_layers, dtype=torch.float64)] * 2, dim=1) * d  # (N, 2N) maps
    assert p2.gamma is not None
    profile = SensitivityProfile(
        p2.names * 2,
        p2.r_max,
        A.T @ p2.AtA @ A,
        A.T @ p2.AtB @ A,
        A.T @ p2.BtB @ A,
        n_tokens=1,
        gamma=torch.cat([p2.gamma, p2.gamma]),
    )
    lo3, hi = GridSpec(3, 64), GridSpec(4, 64)
    c3 = [
        layer_cost(c.name, ranking(torch.rand(c.shape, generator=gen)), c.shape, lo3, hi)
        for c in c2
    ]
    return profile, c2 + c3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bases_chosen_are_the_best_assignment(seed: int) -> None:
    from lwq.method.qp import choose_families

    n = 6
    profile, costs = two_bases(n, seed)
    low = feasible_range(costs[:n], profile.r_max)[0]
    high = feasible_range(costs[n:], profile.r_max)[0]
    budget = 0.5 * (low + high)  # between the two bases at r = 0: some layers on each

    def solved(families: tuple[int, ...]) -> float:
        idx = [f * n + i for i, f in enumerate(families)]
        sub, sub_costs = profile.subset(idx), [costs[k] for k in idx]
        try:
            a = solve_allocation(sub, sub_costs, budget)
        except ConfigError:
            return float("inf")
        assert a.bits <= budget + 1e-9
        return a.predicted_loss

    chosen = choose_families(profile, costs, n, budget, evaluate=solved)
    every: dict[tuple[int, ...], float] = {
        tuple(z): solved(tuple(z)) for z in itertools.product((0, 1), repeat=n)
    }
    best = min(every.values())
    best_z: tuple[int, ...] = min(every, key=every.__getitem__)
    assert set(best_z) == {0, 1}  # the best mixes the bases
    # Found among the 64 assignments (brute force: one QP each) by the price and the
    # single changes after it.
    assert set(chosen) == {0, 1} and solved(chosen) <= best * (1 + 1e-6)
    assert solved(chosen) < every[(0,) * n]  # the narrow base for all (the wide one is over)
    assert every[(1,) * n] == float("inf")
