"""The ratio allocation: a convex QP over the per-layer high-impact ratios.

docs/method.md, "The quadratic program": with a_i the output (logit) change of
quantizing layer i alone at r = 0 and b_i its chord slope up to r_max, both
weighted by the output Fisher and sketched, the predicted loss increase is

    1/2 || sum_i (a_i - r_i b_i) ||^2 = const - c^T r + 1/2 r^T Q r,

Q = B^T B, c_j = sum_i (A^T B)_ij. The cross terms of Q and c are the
inter-layer dependencies; ``objective="diagonal"`` drops them, ``"fixed"``
gives every layer one ratio.

The output change is not linear in r: the first weights protected are the most
salient, so most of the gain comes early. With a third probe at r_mid the
profile carries a per-layer exponent gamma_i in (0, 1], and the output change
is a_i - s_i b_i with s_i = phi_i(r_i) = r_max (r_i / r_max)^gamma_i (gamma = 1
is the chord). The objective is the same quadratic in s; the budget, a convex
function of s (r = r_max (s / r_max)^(1/gamma)), enters as a piecewise-linear
upper bound (chords between breakpoints, exact at them), so the problem stays a
QP for either solver. The budget sum_i bits_i(r_i) <= B * sum_i n_i uses
the exact cost curves of ``lwq.method.cost``; they are concave in r, so the
constraint is replaced by its tangent at the current solution (a tangent
over-estimates a concave function, so the budget still holds), solved, and
repeated; a last exact repair scales the ratios so the true bytes meet the budget.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lwq.errors import ConfigError, LwqError
from lwq.method.cost import LayerCost

log = logging.getLogger(__name__)

Objective = Literal["full", "diagonal", "fixed"]
SOLVERS = ("CLARABEL", "OSQP")


class SolverError(LwqError):
    """The QP solver did not reach an optimal solution."""


@dataclass(frozen=True)
class ProbeInfo:
    """How a profile was measured (recorded with every allocation it makes)."""

    sketch_dim: int
    r_mid: float | None  # the third probe; None: the chord
    seed: int
    calib_sha256: str
    seconds: float
    estimator: str = "forward"  # or "reverse" (lwq.method.reverse)
    samples: int = 0  # reverse: profile sequences (one sample each)
    shrinkage: float = 0.0  # reverse: how far the cross-layer terms were pulled to zero


@dataclass(frozen=True)
class SensitivityProfile:
    """Gram matrices of the per-layer output changes: the whole QP input.

    ``AtA[i, j] = <a_i, a_j>``, ``AtB[i, j] = <a_i, b_j>``, ``BtB[i, j] = <b_i, b_j>``,
    each divided by the number of calibration tokens, so 1/2 ||sum_i a_i||^2 is
    the predicted mean KL divergence per token.
    """

    names: tuple[str, ...]
    r_max: float
    AtA: torch.Tensor  # (N, N) float64
    AtB: torch.Tensor
    BtB: torch.Tensor
    n_tokens: int
    probe: ProbeInfo | None = None
    version: int = 1
    gamma: torch.Tensor | None = None  # (N,) curve exponents; None: the chord

    def exponents(self) -> torch.Tensor:
        """gamma_i of s_i = r_max (r_i / r_max)^gamma_i (ones for the chord)."""
        if self.gamma is None:
            return torch.ones(len(self.names), dtype=torch.float64)
        return self.gamma.double()

    def effective(self, ratios: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """s = phi(r): the ratios as the linear model of the output change sees them."""
        r = torch.as_tensor(ratios, dtype=torch.float64).clamp(0.0, self.r_max)
        if self.gamma is None:
            return r
        return self.r_max * (r / self.r_max) ** self.exponents()

    def predicted_loss(
        self, ratios: Sequence[float] | torch.Tensor, objective: Objective = "full"
    ) -> float:
        """1/2 ||sum_i (a_i - s_i b_i)||^2, s = phi(r) (diagonal: the per-layer terms)."""
        r = self.effective(ratios)
        if objective == "diagonal":
            d = self.AtA.diagonal() - 2 * r * self.AtB.diagonal() + r * r * self.BtB.diagonal()
            return 0.5 * float(d.sum())
        return 0.5 * float(self.AtA.sum() - 2 * (self.AtB.sum(dim=0) * r).sum() + r @ self.BtB @ r)

    def subset(self, index: Sequence[int]) -> SensitivityProfile:
        """The profile of the rows ``index`` (one option per layer of a profile over
        several bases)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        pick = lambda M: M[idx][:, idx]  # noqa: E731
        return SensitivityProfile(
            tuple(self.names[i] for i in index),
            self.r_max,
            pick(self.AtA),
            pick(self.AtB),
            pick(self.BtB),
            self.n_tokens,
            self.probe,
            self.version,
            None if self.gamma is None else self.gamma[idx],
        )

    def per_layer_loss(self, ratios: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Each layer's own term 1/2 ||a_i - s_i b_i||^2 (cross terms excluded)."""
        r = self.effective(ratios)
        return 0.5 * (
            self.AtA.diagonal() - 2 * r * self.AtB.diagonal() + r * r * self.BtB.diagonal()
        )


@dataclass(frozen=True)
class Allocation:
    names: tuple[str, ...]
    ratios: tuple[float, ...]
    objective: str
    budget: float  # requested average bits per quantized weight
    bits: float  # cost-model bits per weight of this allocation (= bytes on disk)
    predicted_loss: float  # full objective, whatever was optimised
    solver: str
    seconds: float
    iterations: int
    version: int = 1
    # The option of each layer with several bases (index into the bases); empty:
    # every layer on the first (or only) base.
    families: tuple[int, ...] = ()


def total_bits(costs: Sequence[LayerCost], ratios: Sequence[float]) -> float:
    return sum(c.bits(r) for c, r in zip(costs, ratios, strict=True))


def feasible_range(costs: Sequence[LayerCost], r_max: float) -> tuple[float, float]:
    """(min, max) average bits per weight reachable with 0 <= r <= r_max."""
    n = sum(c.n for c in costs)
    return total_bits(costs, [0.0] * len(costs)) / n, total_bits(costs, [r_max] * len(costs)) / n


def _scale_to_budget(
    costs: Sequence[LayerCost], base: np.ndarray, r_max: float, budget_bits: float
) -> np.ndarray:
    """The largest s in [0, inf) with exact bits of min(r_max, s * base) within budget."""

    def ratios(s: float) -> np.ndarray:
        return np.minimum(r_max, s * base)

    lo, hi = 0.0, 1.0
    while total_bits(costs, ratios(hi).tolist()) <= budget_bits and hi < 1e6:
        if np.all(ratios(hi) >= r_max):
            return ratios(hi)
        lo, hi = hi, hi * 2
    while hi - lo > 1e-6 * hi:  # ~20 halvings: far below one bit of the budget
        mid = 0.5 * (lo + hi)
        if total_bits(costs, ratios(mid).tolist()) <= budget_bits:
            lo = mid
        else:
            hi = mid
    return ratios(lo)


def _project_psd(Q: np.ndarray) -> np.ndarray:
    """Nearest PSD matrix (eigenvalues clipped at 0): B^T B is PSD up to rounding."""
    w, V = np.linalg.eigh(0.5 * (Q + Q.T))
    if w.min() >= 0:
        return 0.5 * (Q + Q.T)
    return (V * np.clip(w, 0.0, None)) @ V.T


CURVE_PIECES = 12  # chords of r(s) in the budget constraint


def _ratio_of(s: np.ndarray, gamma: np.ndarray, r_max: float) -> np.ndarray:
    """r = phi^-1(s) = r_max (s / r_max)^(1 / gamma)."""
    return r_max * np.clip(s / r_max, 0.0, 1.0) ** (1.0 / gamma)


def _effective_of(r: np.ndarray, gamma: np.ndarray, r_max: float) -> np.ndarray:
    """s = phi(r) = r_max (r / r_max)^gamma (``SensitivityProfile.effective`` per group)."""
    return r_max * np.clip(r / r_max, 0.0, 1.0) ** gamma


def _solve_qp(
    Q: np.ndarray,
    c: np.ndarray,
    slope: np.ndarray,
    rhs: float,
    r_max: float,
    ties: Sequence[Sequence[int]],
    solver: str,
    tol: float,
    gamma: np.ndarray,
) -> np.ndarray:
    """The effective ratios s minimising 1/2 s^T Q s - c^T s within the budget."""
    import cvxpy as cp

    n = len(c)
    s = cp.Variable(n)
    cons = [s >= 0, s <= r_max]
    if np.all(gamma == 1.0):
        cons.append(slope @ s <= rhs)
    else:
        # r(s) is convex: bound it above by its chords between breakpoints
        # (their maximum is the piecewise-linear interpolant, exact at the knots).
        u = cp.Variable(n)
        knots = r_max * np.linspace(0.0, 1.0, CURVE_PIECES + 1)
        for k0, k1 in itertools.pairwise(knots):
            r0 = _ratio_of(np.full(n, k0), gamma, r_max)
            r1 = _ratio_of(np.full(n, k1), gamma, r_max)
            m = (r1 - r0) / (k1 - k0)
            cons.append(u >= cp.multiply(m, s) + (r0 - m * k0))
        cons.append(slope @ u <= rhs)
    for group in ties:
        cons += [s[i] == s[group[0]] for i in group[1:]]
    # Q is handed to the solver as the QP's quadratic term (no factorisation);
    # it is PSD by construction, projected once by the caller.
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(s, cp.psd_wrap(Q)) - c @ s), cons)
    kwargs = {
        "CLARABEL": {"tol_gap_abs": tol, "tol_gap_rel": tol, "tol_feas": tol},
        "OSQP": {"eps_abs": tol, "eps_rel": tol, "max_iter": 200_000},
    }[solver]
    try:
        prob.solve(solver=solver, **kwargs)
    except cp.error.SolverError as err:
        other = next(s for s in SOLVERS if s != solver)
        raise SolverError(
            f"the QP solver {solver} failed ({err}); set method.solver={other}"
        ) from err
    if prob.status not in ("optimal", "optimal_inaccurate") or s.value is None:
        other = next(s for s in SOLVERS if s != solver)
        raise SolverError(
            f"the QP solver {solver} ended with status {prob.status!r}; "
            f"set method.solver={other} or loosen method.solver_tol"
        )
    return np.clip(np.asarray(s.value, dtype=np.float64), 0.0, r_max)


def solve_allocation(
    profile: SensitivityProfile,
    costs: Sequence[LayerCost],
    budget: float,
    objective: Objective = "full",
    solver: str = "CLARABEL",
    ties: Sequence[Sequence[int]] = (),
    iterations: int = 4,
    tol: float = 1e-8,
    overhead: float = 0.0,
) -> Allocation:
    """Ratios per layer that minimise the predicted loss within ``budget`` bits/weight.

    ``overhead`` (bits per weight) is what the files add beyond the layers'
    payload (headers); it is part of the budget and of the reported range.
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ConfigError(f"method.solver={solver!r}: choose one of {SOLVERS}")
    assert [c.name for c in costs] == list(profile.names), "costs and profile disagree"
    r_max = profile.r_max
    n_total = sum(c.n for c in costs)
    lo, hi = (x + overhead for x in feasible_range(costs, r_max))
    if not lo <= budget <= hi:
        raise ConfigError(
            f"budget {budget} bits per weight is infeasible: with these grids and "
            f"0 <= r <= r_max={r_max} the feasible range is [{lo:.4f}, {hi:.4f}]"
        )
    budget_bits = (budget - overhead) * n_total
    n = len(costs)
    # The fixed-ratio allocation: the feasible start of the iteration and the ablation.
    r = _scale_to_budget(costs, np.full(n, r_max), r_max, budget_bits)
    r = np.full(n, float(r.min()))
    done = 0
    if objective != "fixed":
        AtB = profile.AtB.double().numpy()
        BtB = profile.BtB.double().numpy()
        if objective == "diagonal":
            Q, c = np.diag(np.diag(BtB)), np.diag(AtB).copy()
        else:
            Q, c = _project_psd(BtB), AtB.sum(axis=0)
        step = max(1e-4, 0.02 * r_max)
        gamma = profile.exponents().numpy().copy()
        for group in ties:  # tied layers share one ratio, so one curve
            gamma[list(group)] = gamma[list(group)].mean()

        def objective_of(x: np.ndarray) -> float:
            eff = _effective_of(x, gamma, r_max)
            return float(0.5 * eff @ Q @ eff - c @ eff)

        best, best_value = r, objective_of(r)
        for it in range(1, iterations + 1):
            slope = np.array(
                [cost.slope(float(ri), step, r_max) for cost, ri in zip(costs, r, strict=True)]
            )
            at = np.array([cost.bits(float(ri)) for cost, ri in zip(costs, r, strict=True)])
            rhs = budget_bits - float((at - slope * r).sum())
            if rhs <= 0:  # the tangent at r cuts off every ratio: keep the best so far
                break
            done = it
            eff = _solve_qp(Q, c, slope, rhs, r_max, ties, solver, tol, gamma)
            new = _ratio_of(eff, gamma, r_max)
            moved = float(np.abs(new - r).max())
            # Exact repair: the tangent is only an approximation of the step-wise cost.
            r = _scale_to_budget(costs, np.maximum(new, 1e-12), r_max, budget_bits)
            if objective_of(r) < best_value:
                best, best_value = r, objective_of(r)
            if moved < 1e-5:
                break
        r = best
    ratios = tuple(float(x) for x in r)
    return Allocation(
        names=profile.names,
        ratios=ratios,
        objective=objective,
        budget=budget,
        bits=total_bits(costs, ratios) / n_total + overhead,
        predicted_loss=profile.predicted_loss(ratios),
        solver=solver if objective != "fixed" else "bisection",
        seconds=time.perf_counter() - t0,
        iterations=done,
    )


# Ratios the choice of bases tries per layer: denser near 0, where the curves bend.
FAMILY_GRID = 40


def choose_families(
    profile: SensitivityProfile,
    costs: Sequence[LayerCost],
    n_layers: int,
    budget: float,
    objective: Objective = "full",
    overhead: float = 0.0,
    evaluate: Callable[[tuple[int, ...]], float] | None = None,
    tries: int = 8,
) -> tuple[int, ...]:
    """Each layer's base when it may take one of several (``method.bases``).

    ``profile`` and ``costs`` hold one option per (base, layer), base-major. The
    choice is discrete, so it is made on the Lagrangian of the same objective:
    for a price ``lam`` per bit, each layer in turn takes the base and the ratio
    (from a grid) that minimise its terms of 1/2 ||sum_i (a_i - s_i b_i)||^2
    (its own and, with ``objective="full"``, its cross terms with the others as
    they stand) plus ``lam`` times its exact bits, until no layer changes; the
    price is bisected until the bits meet the budget. The QP then sets the
    ratios on the chosen bases.

    A base is a large step in bits, so the price that meets the budget leaves
    some unspent: with ``evaluate`` (the QP's predicted loss of an assignment),
    the ``tries`` layers closest to changing base (smallest Lagrangian margin)
    are then changed one at a time, each change kept if the QP's loss falls,
    until none does.
    """
    N = n_layers
    F = len(costs) // N
    assert len(costs) == F * N == len(profile.names), "one option per base and layer"
    r_max = profile.r_max
    grid = r_max * np.linspace(0.0, 1.0, FAMILY_GRID + 1) ** 2
    gamma = profile.exponents().numpy()
    S = r_max * (grid[None, :] / r_max) ** gamma[:, None]  # (F N, G) effective ratios
    n_total = sum(c.n for c in costs[:N])
    bits = np.array([[c.bits(float(r)) for r in grid] for c in costs]) / n_total
    AtA = profile.AtA.double().numpy()
    AtB = profile.AtB.double().numpy()
    BtB = profile.BtB.double().numpy()
    own = 0.5 * (
        np.diag(AtA)[:, None] - 2 * S * np.diag(AtB)[:, None] + S**2 * np.diag(BtB)[:, None]
    )
    target = budget - overhead
    z = np.zeros(N, dtype=int)
    k = np.zeros(N, dtype=int)

    def local(i: int, lam: float) -> np.ndarray:
        """Layer i's objective terms over (base, grid ratio), the others as they stand."""
        v = z * N + np.arange(N)
        s = S[v, k]
        others = np.arange(N) != i
        cand = np.arange(F) * N + i
        if objective == "full":
            vj, sj = v[others], s[others]
            alpha = (AtA[np.ix_(cand, vj)] - AtB[np.ix_(cand, vj)] * sj).sum(axis=1)
            beta = (AtB[np.ix_(vj, cand)].T - BtB[np.ix_(cand, vj)] * sj).sum(axis=1)
        else:
            alpha = beta = np.zeros(F)
        out: np.ndarray = own[cand] + alpha[:, None] - S[cand] * beta[:, None] + lam * bits[cand]
        return out

    def margins(lam: float) -> np.ndarray:
        """How much worse each layer's best option on another base is than its own."""
        out = np.zeros(N)
        for i in range(N):
            J = local(i, lam).min(axis=1)
            out[i] = np.delete(J, z[i]).min() - J[z[i]]
        return out

    def descend(lam: float) -> float:
        layers = np.arange(N)
        for _ in range(12):
            changed = False
            for i in range(N):
                J = local(i, lam)
                f, g = np.unravel_index(int(np.argmin(J)), J.shape)
                if (f, g) != (z[i], k[i]):
                    z[i], k[i], changed = f, g, True
            if not changed:
                break
        return float(bits[z * N + layers, k].sum())

    lo, hi = 1e-8, 1e8  # the price per bit (loss per average bit per weight)
    for _ in range(40):  # geometric bisection: ~2 % on the price
        mid = (lo * hi) ** 0.5
        if descend(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.02:
            break
    descend(hi)  # the cheaper side: within the budget
    best = tuple(int(f) for f in z)
    if evaluate is None:
        return best
    best_loss = evaluate(best)
    for _ in range(4):  # rounds of single changes, nearest to changing first
        improved = False
        for i in np.argsort(margins(hi))[:tries]:
            for f in range(F):
                if f == best[i]:
                    continue
                trial = (*best[:i], f, *best[i + 1 :])
                loss = evaluate(trial)
                if loss < best_loss:
                    best, best_loss, improved = trial, loss, True
        if not improved:
            break
        z[:] = best
    return best
