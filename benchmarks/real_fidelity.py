"""Does the sensitivity profile rank allocations on a real model? (issue 13, fidelity)

On SmolLM2-135M: the method's state (saliency, probes, the profile) is prepared
once from 64 x 512 calibration tokens; then for each family of random feasible
allocations (ratios in [0, r_max]: one with the mean ratio spread over the
range, and families with every allocation at one mean ratio, which differ only
in where the ratio goes) every layer is quantized at its ratio (GPTQ, from the
full-precision Hessians, as the probes are), and the KL divergence to the
full-precision model is measured on held-out WikiText-2 windows (from the
second half of wiki.test.raw; the perplexity protocol uses the first quarter).
Prints Spearman(predicted, measured) per family and objective and saves JSON.

With ``--bases 2,3`` (the method's default) an allocation gives every layer a
base and a ratio: ``spread`` draws the share of layers on the wider base and
the mean ratio over their ranges, and ``bits:B`` allocations all cost B bits
per weight (random bases and ratios, the ratios scaled to meet B), so they
differ only in where the bits go: the question the allocation answers.

With ``--windows 16`` or more the per-window KLs are kept and the measured side's
reliability is printed (Spearman between the KLs on the even and the odd
windows); ``--seed S --reuse-kl FILE`` predicts the same allocations by a profile
of another draw, and ``--compare FILES`` sets saved results side by side.
``--exact`` also predicts each allocation along its own errors (the quadratic
model without the probes' curves), and ``--jitter SIGMA K`` measures K
allocations again with their ratios shaken: how stable the measured KL is.

    python benchmarks/real_fidelity.py --profile-samples 256 --profile-seq-len 128
    python benchmarks/real_fidelity.py --bases 2,3 --levels spread bits:3.0
    python benchmarks/real_fidelity.py --bases 2,3 --levels bits:3.0 --n-allocs 32 \
        --windows 32 --json benchmarks/results/real_fidelity_bits3_32w.json
    python benchmarks/real_fidelity.py --compare benchmarks/results/real_fidelity_bits3_32w*.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method import random_allocations
from realmodel import (
    N_SAMPLES,
    REPO,
    SEQ_LEN,
    add_calib_arg,
    calib_source,
    heldout_windows,
    model_dir,
    second_quarter_windows,
)


@torch.no_grad()
def reference_logprobs(model: Any, windows: torch.Tensor) -> list[torch.Tensor]:
    return [torch.log_softmax(model(input_ids=w[None]).logits[0].float(), -1) for w in windows]


@torch.no_grad()
def kl_to(model: Any, windows: torch.Tensor, ref: list[torch.Tensor]) -> list[float]:
    """The KL divergence per token from the reference, one figure per window (the windows
    have one length, so their mean is the KL of them all)."""
    out = []
    for w, lp in zip(windows, ref, strict=True):
        lq = torch.log_softmax(model(input_ids=w[None]).logits[0].float(), -1)
        out.append(float((lp.exp() * (lp - lq)).sum()) / lp.shape[0])
    return out


def alloc_key(wider_bases: int, mean_ratio: float) -> tuple[int, float]:
    """What finds a seeded allocation again in a saved result (its index follows
    ``--n-allocs``): its number of layers on a wider base and its mean ratio."""
    return int(wider_bases), round(float(mean_ratio), 9)


def row_key(row: dict[str, Any]) -> tuple[int, float]:
    return alloc_key(row["wider_bases"], row["mean_ratio"])


def described(
    state: Any, families: np.ndarray, ratios: np.ndarray, kl: float, per_window: list[float]
) -> dict[str, Any]:
    """What a result row says of an allocation (bases ``families``, ``ratios``) whose
    KL was measured: its shape, the profile's predictions, the KL (per window if kept)."""
    prof = state.options(families.tolist())[0]
    return {
        "mean_ratio": float(np.mean(ratios)),
        "wider_bases": int(np.count_nonzero(families)),
        "pred_full": prof.predicted_loss(ratios.tolist(), "full"),
        "pred_diagonal": prof.predicted_loss(ratios.tolist(), "diagonal"),
        "kl": kl,
    } | ({"kl_windows": per_window} if per_window else {})


def measurement_reliability(rows: list[dict[str, Any]], preds: list[float]) -> dict[str, float]:
    """How far the measured side limits the ranking, from the per-window KLs: Spearman
    between the KLs on the even and on the odd windows (split half: two independent
    measurements of the same allocations), and Spearman of the prediction against the KL
    on the first 8 windows and on the first half, to set beside the one on all windows."""
    kw = np.array([r["kl_windows"] for r in rows])
    half = kw.shape[1] // 2
    return {
        "windows": int(kw.shape[1]),
        "split_half": float(spearmanr(kw[:, 0::2].mean(1), kw[:, 1::2].mean(1)).statistic),
        "first_8": float(spearmanr(preds, kw[:, :8].mean(1)).statistic),
        "first_half": float(spearmanr(preds, kw[:, :half].mean(1)).statistic),
        "second_half": float(spearmanr(preds, kw[:, half:].mean(1)).statistic),
    }


def mean_bits(costs: Any, ratios: np.ndarray, r_max: float) -> float:
    """Bits per weight of layers ``costs`` at ``ratios`` (capped at ``r_max``)."""
    r = np.minimum(r_max, ratios)
    return sum(c.bits(float(x)) for c, x in zip(costs, r, strict=True)) / sum(c.n for c in costs)


def bootstrap_spearman(pred: list[float], kls: list[float], n: int = 2000) -> list[float]:
    """The 5th and 95th percentiles of Spearman over allocations drawn with replacement:
    how far the figure of a few allocations can be trusted."""
    rng = np.random.default_rng(0)
    p, k = np.asarray(pred), np.asarray(kls)
    stats = []
    for _ in range(n):
        i = rng.integers(0, len(p), len(p))
        if len(np.unique(i)) > 3:
            stats.append(float(spearmanr(p[i], k[i]).statistic))
    if not stats:  # too few allocations to resample (fewer than 4)
        return [float("nan"), float("nan")]
    return [float(v) for v in np.nanpercentile(stats, [5, 95])]


def compare(paths: list[Path]) -> None:
    """Several results on the same allocations (``--reuse-kl``): each profile setting's
    ranking of the measured KL, and how its predictions rank against the first file's
    (two profiles of one setting and different seeds: how far the profile's own noise
    limits the ranking)."""
    docs = [json.loads(p.read_text()) for p in paths]
    print(
        "\n| file | family | n | profile | seed | Spearman full | diagonal "
        "| full vs the first file's | paired gain over the first (90 %) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p, doc in zip(paths, docs, strict=True):
        a = doc["args"]
        for fam in doc["families"]:
            first = next((f for f in docs[0]["families"] if f["family"] == fam["family"]), None)
            if first is None:
                continue
            ref = {row_key(r): r["pred_full"] for r in first["rows"]}
            rows = [r for r in fam["rows"] if row_key(r) in ref]
            pred = np.array([r["pred_full"] for r in rows])
            pred0 = np.array([ref[row_key(r)] for r in rows])
            kls = np.array([r["kl"] for r in rows])
            text = " (WikiText)" if a.get("profile_text", "calib") == "wikitext" else ""
            rng = np.random.default_rng(0)
            gains = []
            for _ in range(2000):
                i = rng.integers(0, len(rows), len(rows))
                gains.append(
                    spearmanr(pred[i], kls[i]).statistic - spearmanr(pred0[i], kls[i]).statistic
                )
            lo, hi = np.nanpercentile(gains, [5, 95])
            print(
                f"| {p.name} | {fam['family']} | {len(rows)} | "
                f"{a['profile_samples']} x {a['profile_seq_len']}{text} | {a.get('seed', 0)} | "
                f"{spearmanr(pred, kls).statistic:.3f} | "
                f"{spearmanr([r['pred_diagonal'] for r in rows], kls).statistic:.3f} | "
                f"{spearmanr(pred, pred0).statistic:.3f} | {lo:+.2f} to {hi:+.2f} |"
            )


def scaled_to(
    state: Any, families: np.ndarray, ratios: np.ndarray, target: float
) -> np.ndarray | None:
    """``ratios`` times the factor that puts layers on bases ``families`` at ``target``
    bits per weight (capped at r_max); None if no factor reaches it."""
    costs, r_max = state.options(families.tolist())[1], state.profile.r_max
    lo, hi = 0.0, r_max / max(float(ratios.min()), 1e-6)
    if not mean_bits(costs, ratios * lo, r_max) <= target <= mean_bits(costs, ratios * hi, r_max):
        return None
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        below = mean_bits(costs, ratios * mid, r_max) <= target
        lo, hi = (mid, hi) if below else (lo, mid)
    return np.minimum(r_max, ratios * lo)


def allocations(state: Any, count: int, level: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` random (bases, ratios) of ``level``: spread, a mean ratio (one base) or
    ``bits:B`` (several bases: every allocation at B bits per weight), seeded."""
    n, n_bases, r_max = len(state.names), state.n_families, state.profile.r_max
    if n_bases == 1:
        lv = None if level == "spread" else float(level)
        return [(np.zeros(n, dtype=int), r) for r in random_allocations(n, count, r_max, 0, lv)]
    rng = np.random.default_rng(0)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    target = None if level == "spread" else float(level.removeprefix("bits:"))
    while len(out) < count:
        k = len(out)
        spread = k / max(1, count - 1)
        share = spread if target is None else rng.uniform(0.2, 0.8)
        families = (rng.random(n) < share).astype(int) * (n_bases - 1)  # narrowest or widest
        lv = r_max * (0.05 + 0.6 * spread) if target is None else 0.05
        ratios = np.clip(lv * rng.lognormal(0.0, 0.8, n), 0.0, r_max)
        if target is not None:
            scaled = scaled_to(state, families, ratios, target)
            if scaled is None:
                continue  # these bases alone miss the target: draw again
            ratios = scaled
        out.append((families, ratios))
    rng.shuffle(out)  # type: ignore[arg-type]
    return out


def layer_errors(
    state: Any,
    name: str,
    W: torch.Tensor,
    H: torch.Tensor,
    gptq: Any,
    levels: tuple[float, ...],
    jobs: list[Any],
) -> list[Any]:
    """The errors W - Q (as ``Delta``) of ``jobs`` on layer ``name``, then of every
    base's probe ``levels`` (the order the profile's probes take), from one GPTQ pass
    per low grid."""
    from lwq.method.sensitivity import Delta
    from lwq.quant.layer import quantize_together

    jobs = jobs + [state.job(name, r, f) for f in range(state.n_families) for r in levels]
    return [Delta.of(W - q) for q in quantize_together([W] * len(jobs), H, jobs, gptq)]


def relinearized(
    state: Any,
    cfg: Any,
    fp: Any,
    adapter: Any,
    calib: Any,
    hessians: Any,
    alpha: float,
    budget: float,
) -> Any:
    """The state with its profile's backward passes taken at the model quantized a
    fraction ``alpha`` of the way to the QP's choice at ``budget`` (weights
    W + alpha (Q - W)): the Gauss-Newton curvature at the midpoint of the path
    (alpha 0.5) instead of at full precision. The probes' errors stay those of the
    full-precision weights."""
    import tempfile

    from lwq.method.reverse import profile_windows, reverse_profile
    from lwq.method.sensitivity import DeltaStore, probe_levels
    from lwq.method.state import allocate, probe_settings
    from lwq.quant.layer import quantize_layer

    alloc = allocate(state, cfg, budget)
    families = alloc.families or (0,) * len(state.names)
    settings = probe_settings(cfg)
    levels = probe_levels(settings)
    gptq = cfg.gptq.settings()
    model = copy.deepcopy(fp)
    modules = dict(adapter.iter_layers(model))
    work = tempfile.TemporaryDirectory(prefix="lwq-relin-")
    probes = DeltaStore(Path(work.name))
    t = time.perf_counter()
    for i, name in enumerate(state.names):
        W, H = adapter.read_weight(modules[name]), hessians.get(name)
        probes.put(name, layer_errors(state, name, W, H, gptq, levels, []))
        job = state.job(name, float(alloc.ratios[i]), int(families[i]))
        q = quantize_layer(W, H, job, gptq).weight.dequantize()
        adapter.write_weight(modules[name], W + alpha * (q - W))
    print(f"relinearize: probes and the choice's weights {time.perf_counter() - t:.0f} s")
    m = cfg.method
    ids = profile_windows(calib.input_ids, m.profile_samples, m.profile_seq_len, cfg.calib.seed)
    profile = reverse_profile(
        model,
        adapter,
        ids,
        probes,
        list(state.names),
        settings,
        calib.sha256,
        True,
        families=state.n_families,
    )
    work.cleanup()
    return dataclasses.replace(state, profile=profile)


def exact_predictions(
    state: Any,
    cfg: Any,
    fp: Any,
    adapter: Any,
    calib: Any,
    hessians: Any,
    allocs: list[tuple[np.ndarray, np.ndarray]],
    work: Path,
) -> dict[str, list[float]]:
    """The profile's second-order prediction of each allocation taken along its own
    errors, not through the probes' curves: every layer is quantized at each
    allocation's base and ratio (parallel mode, one GPTQ pass per layer and base for
    all allocations), and the backward passes of the profile (its sequences and
    sampled labels) give <dL_s/dW_i, dW_i> for each. With X_a(s) the sum over layers,
    the joint prediction is 1/2 sum_s X_a(s)^2 / tokens (every cross term, unshrunk),
    the diagonal one keeps each layer's own square, and the shrunk one pulls the cross
    terms towards zero by the profile's own factor. The probes' errors ride along, so
    the profile rebuilt from the same passes checks that the samples are the state's.
    The samples D (sequences, layers, allocations + probes) are saved in ``work``."""
    import tempfile

    from lwq.method.reverse import directional_samples, profile_from_samples, profile_windows
    from lwq.method.sensitivity import DeltaStore, probe_levels
    from lwq.method.state import probe_settings

    settings = probe_settings(cfg)
    levels = probe_levels(settings)
    F = state.n_families
    gptq = cfg.gptq.settings()
    modules = dict(adapter.iter_layers(fp))
    tmp = tempfile.TemporaryDirectory(prefix="lwq-exact-", dir=work)
    store = DeltaStore(Path(tmp.name))
    t = time.perf_counter()
    for i, name in enumerate(state.names):
        W, H = adapter.read_weight(modules[name]), hessians.get(name)
        jobs = [state.job(name, float(r[i]), int(f[i])) for f, r in allocs]
        store.put(name, layer_errors(state, name, W, H, gptq, levels, jobs))
    print(f"exact: every allocation's errors {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    m = cfg.method
    ids = profile_windows(calib.input_ids, m.profile_samples, m.profile_seq_len, cfg.calib.seed)
    n = len(allocs) + F * len(levels)
    D = directional_samples(
        fp, adapter, ids, store, list(state.names), n, settings.seed, True, 2048
    )
    print(f"exact: backward passes {time.perf_counter() - t:.0f} s", flush=True)
    tmp.cleanup()
    torch.save(D, work / "exact-samples.pt")
    S, T = ids.shape
    probes = D[:, :, len(allocs) :]
    rebuilt = profile_from_samples(probes, state.names, settings, T, calib.sha256, 0.0, F)
    X = D[:, :, : len(allocs)]  # (S, N, allocations)
    joint = 0.5 * X.sum(dim=1).square().sum(dim=0) / (S * T)
    diag = 0.5 * X.square().sum(dim=(0, 1)) / (S * T)
    shrink = state.profile.probe.shrinkage if state.profile.probe else 0.0
    return {
        "exact_joint": joint.tolist(),
        "exact_diagonal": diag.tolist(),
        "exact_shrunk": (diag + (1.0 - shrink) * (joint - diag)).tolist(),
        "rebuilt_full": [
            dataclasses.replace(state, profile=rebuilt)
            .options(f.tolist())[0]
            .predicted_loss(r.tolist(), "full")
            for f, r in allocs
        ],
    }


def jittered(
    state: Any,
    drawn: list[tuple[np.ndarray, np.ndarray]],
    rows: list[dict[str, Any]],
    target: float,
    jitter: list[float],
    measure: Any,
) -> dict[str, Any]:
    """The first K allocations measured again with their ratios shaken (each times a
    lognormal factor of width SIGMA, rescaled to ``target`` bits, bases kept): the
    change of measured KL against the spread of KL across allocations. A predictor
    that sees only a smooth function of the allocation cannot correlate with the
    measured KL beyond the square root of this retest reliability."""
    sigma, k = jitter[0], int(jitter[1])
    rng = np.random.default_rng(1)
    out: list[dict[str, Any]] = []
    for (families, ratios), row in list(zip(drawn, rows, strict=True))[:k]:
        t = time.perf_counter()
        shaken = scaled_to(state, families, ratios * rng.lognormal(0.0, sigma, len(ratios)), target)
        assert shaken is not None  # a small change of ratios that met the target
        per_window = measure(families, shaken)
        out.append(
            {"kl": row["kl"], "pred_full": row["pred_full"]}
            | {"kl_jitter": float(np.mean(per_window)), "kl_windows_jitter": per_window}
            | {"pred_jitter": state.options(families.tolist())[0].predicted_loss(shaken.tolist())}
        )
        print(
            f"jitter: KL {row['kl']:.4f} -> {out[-1]['kl_jitter']:.4f} "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    kl = np.array([r["kl"] for r in out])
    again = np.array([r["kl_jitter"] for r in out])
    spread = float(np.var(np.concatenate([kl, again]), ddof=1))
    retest = 1.0 - float(np.var(again - kl, ddof=1)) / (2.0 * spread)
    res = {
        "sigma": sigma,
        "rows": out,
        "pearson": float(np.corrcoef(kl, again)[0, 1]),
        "spearman": float(spearmanr(kl, again).statistic),
        "retest_reliability": retest,
        "ceiling": float(np.sqrt(max(retest, 0.0))),
        "pred_change_over_kl_change": float(
            np.median(np.abs([r["pred_jitter"] - r["pred_full"] for r in out]) / np.abs(again - kl))
        ),
    }
    print(
        f"jitter {sigma}: "
        + ", ".join(f"{key} {v:.3f}" for key, v in res.items() if key not in ("rows", "sigma"))
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=["reverse", "forward"], default="reverse")
    ap.add_argument("--profile-samples", type=int, default=256)
    ap.add_argument("--profile-seq-len", type=int, default=128)
    ap.add_argument("--n-allocs", type=int, default=24)
    ap.add_argument("--lo-bits", type=int, default=2, help="method.lo_bits of the allocations")
    ap.add_argument(
        "--bases",
        help="method.bases, e.g. 2,3: each allocation gives every layer a base (instead of "
        "--lo-bits); levels: spread or bits:B",
    )
    ap.add_argument("--r-max", type=float, default=0.3, help="method.r_max of the allocations")
    ap.add_argument(
        "--r-mid",
        type=float,
        default=0.03,
        help="method.r_mid: the ratio of the third probe, which fits each layer's curve",
    )
    ap.add_argument("--clip", choices=["minmax", "mse"], default="mse", help="gptq.clip")
    ap.add_argument("--levels", nargs="+", default=["spread", "0.1", "0.03"])
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument(
        "--reuse-kl",
        type=Path,
        help="a previous result: its measured KLs (same allocations, seeded) are reused, only "
        "the profile is computed again (to compare profile settings); with a larger "
        "--n-allocs only the allocations beyond the file's are measured",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="calib.seed: with the saved calibration set it draws only the profile's "
        "sequences and labels (with --reuse-kl: how far the profile's own draw moves the "
        "ranking)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/real-fidelity"))
    ap.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "real_fidelity.json"
    )
    ap.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        help="only print a comparison of saved results on the same allocations (no run)",
    )
    ap.add_argument(
        "--profile-text",
        choices=["calib", "wikitext"],
        default="calib",
        help="where the profile's sequences come from: the calibration set (the method's "
        "way) or the second quarter of wiki.test.raw (disjoint from the perplexity quarter "
        "and the held-out half), the Hessians and probes staying the calibration set's: "
        "how far the text the profile sees decides its ranking of the KL on WikiText",
    )
    ap.add_argument(
        "--qp",
        type=float,
        nargs="*",
        default=[],
        help="budgets at which the QP's own allocations (full and diagonal objective) are "
        "also measured (parallel mode), to set beside the random ones of the same bits",
    )
    ap.add_argument(
        "--load-state",
        action="store_true",
        help="take the method's state and Hessians an earlier run of the same settings "
        "saved in --work (state-seedS) instead of preparing them again",
    )
    ap.add_argument(
        "--relinearize",
        type=float,
        help="ALPHA: take the profile's backward passes at the model quantized ALPHA of the "
        "way to the QP's choice at the first --qp budget (0.5: the midpoint), not at full "
        "precision; saved as state-seedS-relinALPHA in --work",
    )
    ap.add_argument(
        "--exact",
        action="store_true",
        help="also predict each allocation along its own errors (every layer quantized at "
        "its ratio, the profile's backward passes dotted with those errors): the "
        "second-order model without the probes' curves; the samples go to --work",
    )
    ap.add_argument(
        "--jitter",
        type=float,
        nargs=2,
        metavar=("SIGMA", "K"),
        help="measure the first K allocations of each bits:B family again with every ratio "
        "times a lognormal factor of width SIGMA, rescaled to the same bits: how far the "
        "measured KL is a smooth function of the allocation (its retest reliability)",
    )
    add_calib_arg(ap)
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    from lwq.adapters import adapter_for
    from lwq.config import make_config
    from lwq.method.state import HessianStore, allocate, load_state, prepare, save_state
    from lwq.models import load_model_dir
    from lwq.quant.layer import quantize_layer
    from lwq.quantize import calibration_set

    torch.manual_seed(0)
    path = model_dir()
    budget = 3.0 if args.lo_bits == 2 else 3.5  # any budget the grids reach: not used here
    method: dict[str, Any] = {"budget": budget, "r_max": args.r_max, "r_mid": args.r_mid}
    if args.bases:
        method["bases"] = [int(b) for b in args.bases.split(",")]
    else:
        method["lo_bits"] = args.lo_bits
    if args.profile == "forward":
        method["profile"] = "forward"
    else:
        method.update(profile_samples=args.profile_samples, profile_seq_len=args.profile_seq_len)
    cfg = make_config(
        {
            "model": str(path),
            "calib": {
                "source": str(calib_source(args.calib)),
                "n_samples": N_SAMPLES,
                "seq_len": SEQ_LEN,
                "seed": args.seed,
            },
            "quant": {"method": "lwq"},
            "gptq": {"clip": args.clip},
            "method": method,
        }
    )
    fp, tok = load_model_dir(path)
    adapter = adapter_for(fp)
    calib = calibration_set(cfg, tok, fp.config)
    t = time.perf_counter()
    saved = args.work / f"state-seed{args.seed}"
    if args.load_state:  # what an earlier run of the same settings left in --work
        state = load_state(saved)
    else:
        text = None if args.profile_text == "calib" else second_quarter_windows(tok, SEQ_LEN)
        state = prepare(fp, adapter, calib, cfg, args.work / "hessians", True, text)
        save_state(state, saved)  # for other objectives, offline, and --load-state
    prepare_s = time.perf_counter() - t
    print(f"prepare {prepare_s:.0f} s {state.seconds}", flush=True)
    hessians = HessianStore.open(args.work / "hessians")
    if args.relinearize is not None:
        t = time.perf_counter()
        at = args.qp[0] if args.qp else 3.0  # the budget whose QP choice sets the point
        state = relinearized(state, cfg, fp, adapter, calib, hessians, args.relinearize, at)
        save_state(state, args.work / f"state-seed{args.seed}-relin{args.relinearize}")
        print(f"relinearized profile {time.perf_counter() - t:.0f} s", flush=True)
    windows = heldout_windows(tok, args.windows)
    ref = reference_logprobs(fp, windows)
    profile = state.profile
    gptq = cfg.gptq.settings()
    results: dict[str, Any] = {"args": vars(args) | {"work": str(args.work), "json": ""}}
    results.update(prepare_seconds=prepare_s, stages=state.seconds, families=[])
    model = copy.deepcopy(fp)
    modules = dict(adapter.iter_layers(model))
    originals = {n: adapter.read_weight(modules[n]) for n in state.names}
    reused: dict[str, dict[tuple[int, float], dict[str, Any]]] = {}
    if args.reuse_kl:  # allocations are found by content: their order follows --n-allocs
        old = json.loads(args.reuse_kl.read_text())
        reused = {f["family"]: {row_key(r): r for r in f["rows"]} for f in old["families"]}
    results["shrinkage"] = profile.probe.shrinkage if profile.probe else None

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")

    def measure(families: np.ndarray, ratios: np.ndarray) -> list[float]:
        """Every layer quantized at its base and ratio (parallel mode, from the
        full-precision Hessians): the KL on each held-out window."""
        for name, f, r in zip(state.names, families, ratios, strict=True):
            job = state.job(name, float(r), int(f))
            q = quantize_layer(originals[name], hessians.get(name), job, gptq).weight
            adapter.write_weight(modules[name], q.dequantize())
        return kl_to(model, windows, ref)

    results["qp"] = []
    for budget in args.qp:  # the QP's own choices, measured like the random allocations
        for objective in ("full", "diagonal"):
            t = time.perf_counter()
            m = cfg.method.model_copy(update={"objective": objective})
            alloc = allocate(state, cfg.model_copy(update={"method": m}), budget)
            families = np.array(alloc.families or (0,) * len(state.names), dtype=int)
            ratios = np.array(alloc.ratios)
            qp_windows = measure(families, ratios)
            results["qp"].append(
                {"budget": budget, "objective": objective, "bits": alloc.bits}
                | described(state, families, ratios, float(np.mean(qp_windows)), qp_windows)
            )
            print(f"qp {budget} {objective}: {results['qp'][-1]} ({time.perf_counter() - t:.0f} s)")
    if args.qp:
        save()
    for level in args.levels:
        rows: list[dict[str, Any]] = []
        drawn = allocations(state, args.n_allocs, level)
        exact: dict[str, list[float]] = {}
        if args.exact:
            exact = exact_predictions(state, cfg, fp, adapter, calib, hessians, drawn, args.work)
        for k, (families, ratios) in enumerate(drawn):
            t = time.perf_counter()
            key = alloc_key(int(np.count_nonzero(families)), float(np.mean(ratios)))
            per_window: list[float] = []
            if key in reused.get(level, {}):  # the same seeded allocation: not measured again
                kl = reused[level][key]["kl"]
                per_window = reused[level][key].get("kl_windows", [])
            else:
                per_window = measure(families, ratios)
                kl = float(np.mean(per_window))
            prof, costs = state.options(families.tolist())
            bits = sum(c.bits(float(r)) for c, r in zip(costs, ratios, strict=True))
            chord = dataclasses.replace(prof, gamma=None).predicted_loss(ratios.tolist(), "full")
            rows.append(
                {"bits": bits / sum(c.n for c in costs), "pred_chord": chord}
                | {f"pred_{kind}": v[k] for kind, v in exact.items()}
                | described(state, families, ratios, kl, per_window)
            )
            print(
                f"{level} {k}: bits {rows[-1]['bits']:.3f} kl {kl:.4f} "
                f"pred {rows[-1]['pred_full']:.4f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
        fam: dict[str, Any] = {"family": level, "rows": rows}
        for obj in ("full", "diagonal", "chord", *exact):
            pred = [r[f"pred_{obj}"] for r in rows]
            kls = [r["kl"] for r in rows]
            fam[f"spearman_{obj}"] = float(spearmanr(pred, kls).statistic)
            fam[f"pred_over_kl_{obj}"] = float(np.median(np.array(pred) / np.array(kls)))
            fam[f"spearman_{obj}_90"] = bootstrap_spearman(pred, kls)
        for kind in exact:
            print(f"{level}: Spearman {kind} {fam[f'spearman_{kind}']:.3f}", flush=True)
        if exact:  # the rebuilt profile against the state's: the same samples?
            state_pred, rebuilt = np.array([r["pred_full"] for r in rows]), exact["rebuilt_full"]
            fam["rebuilt_vs_state"] = float(spearmanr(state_pred, rebuilt).statistic)
            fam["rebuilt_over_state"] = float(np.median(np.array(rebuilt) / state_pred))
            print(
                f"{level}: rebuilt profile against the state's: Spearman "
                f"{fam['rebuilt_vs_state']:.4f}, ratio {fam['rebuilt_over_state']:.4f}",
                flush=True,
            )
        if args.jitter and level.startswith("bits:"):
            fam["jitter"] = jittered(
                state, drawn, rows, float(level.removeprefix("bits:")), args.jitter, measure
            )
            save()
        if all(len(r.get("kl_windows", [])) >= 16 for r in rows):
            fam["reliability"] = measurement_reliability(rows, [r["pred_full"] for r in rows])
            print(f"{level}: measured side {fam['reliability']}", flush=True)
        results["families"].append(fam)
        save()
    print(
        "\n| allocations | n | Spearman full | 90 % bootstrap | diagonal | chord "
        "| predicted/measured (full) |"
    )
    print("|---|---|---|---|---|---|---|")
    for fam in results["families"]:
        lo, hi = fam["spearman_full_90"]
        print(
            f"| {fam['family']} | {len(fam['rows'])} | {fam['spearman_full']:.3f} | "
            f"{lo:.2f}-{hi:.2f} | "
            f"{fam['spearman_diagonal']:.3f} | {fam['spearman_chord']:.3f} | "
            f"{fam['pred_over_kl_full']:.2f} |"
        )
    kls = [r["kl"] for f in results["families"] for r in f["rows"]]
    preds = [r["pred_full"] for f in results["families"] for r in f["rows"]]
    for q in results["qp"]:  # where the QP's choice sits among the random allocations
        print(
            f"QP ({q['objective']}) at {q['budget']} bits: {q['bits']:.4f} bits, KL "
            f"{q['kl']:.4f} (predicted {q['pred_full']:.4f}); random allocations with a lower "
            f"KL: {sum(k < q['kl'] for k in kls)} of {len(kls)} (best {min(kls, default=0):.4f}), "
            f"with a lower prediction: {sum(p < q['pred_full'] for p in preds)}"
        )


if __name__ == "__main__":
    main()
