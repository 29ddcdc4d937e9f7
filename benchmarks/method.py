"""The method's benchmark (issue 7): does the QP predict, and does it win at equal bits?

Parts (``--parts``, default all):

corr   On each model, three families of >= 20 random feasible allocations
       (ratios in [0, r_max]): one with the mean ratio spread over the range,
       and two with every allocation at a mean ratio of about 0.1 and 0.02
       (one budget each). Every layer is quantized at its ratio from the
       full-precision Hessians (as the probes are); the measured KL divergence
       and cross-entropy increase on held-out text (the validation slice, never
       seen by calibration) are compared with the QP's prediction: full and
       diagonal on the fitted curves, and full on the chord (linear model):
       Spearman rank correlations and the predicted/measured ratio.
table  At each budget (average bits per quantized weight, measured from the
       bytes written): lwq (full QP), lwq on the chord instead of the fitted
       curves, lwq + learned clipping (LWC), diagonal only, one fixed ratio
       (4/2 bits), one fixed ratio with float16
       high-impact weights, and the nearest configurations below and above of:
       float16 0.45 % dense-and-sparse with a 2- or 3-bit rest, uniform GPTQ,
       and with --peer-python HQQ and llm-compressor's GPTQ. Perplexity on the
       validation slice and on WikiText-2 test (when ../shared is present), KL
       and cross-entropy increase on held-out text, bits, seconds.

The sensitivity profile is computed once per model and reused by every budget
(as ``lwq sweep`` does). Writes a JSON next to the markdown it prints.

    python benchmarks/method.py --peer-python /path/to/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `baselines`
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))  # for `common`
from common import heldout_windows  # noqa: E402

UNIFORM = [(2, 128), (2, 64), (2, 32), (3, 128)]
# Predictions compared in the corr part: the full QP objective and the diagonal
# one on the fitted curves, and the full one on the chord (the linear model).
OBJECTIVES = ("full", "diagonal", "chord")
HQQ = [(2, 128), (2, 64), (2, 32), (3, 128)]  # 2.25, 2.5, 3.0, 3.25 bits


def config_for(model: str, out: Path, args: argparse.Namespace, **method: Any) -> Any:
    from lwq.config import make_config

    return make_config(
        {
            "model": str(ZOO / model),
            "out": str(out),
            "overwrite": True,
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "mode": "sequential",
            },
            "quant": {"method": "lwq"},
            # The recorded zoo tables were measured with act order off.
            "gptq": {"act_order": False},
            "method": {**profile_settings(args), **method},
        }
    )


def profile_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.profile == "forward":
        return {"profile": "forward"}
    return {"profile_samples": args.profile_samples, "profile_seq_len": args.profile_seq_len}


class Setup:
    """Full-precision model, calibration set and the method's state for one model."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from lwq.adapters import adapter_for
        from lwq.calibration import build_calibration_set
        from lwq.method.state import HessianStore, prepare
        from lwq.models import load_model_dir

        self.name = model
        self.config = config_for(model, args.work / model, args)
        self.fp, _ = load_model_dir(ZOO / model)
        self.tok = AutoTokenizer.from_pretrained(ZOO / model)
        self.adapter = adapter_for(self.fp.config.model_type)
        self.calib = build_calibration_set(
            self.tok, ZOO / "data" / "calibration.txt", args.n_samples, args.seq_len, seed=0
        )
        t = time.perf_counter()
        hessians = args.work / model / "hessians"
        self.state = prepare(
            self.fp, self.adapter, self.calib, self.config, hessians, progress=False
        )
        self.prepare_seconds = time.perf_counter() - t
        self.hessians = HessianStore.open(hessians)
        self.windows = heldout_windows(self.tok, args.seq_len)


def random_allocations(
    n_layers: int, count: int, r_max: float, seed: int, level: float | None = None
) -> list[np.ndarray]:
    """Ratios in [0, r_max] with a per-layer log-normal spread around a mean level.

    ``level=None`` spreads the level over the range (allocations at many
    budgets); a fixed level gives allocations of about one budget, which only
    differ in where the ratio goes: the question the QP answers.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        lv = r_max * (0.05 + 0.6 * k / max(1, count - 1)) if level is None else level
        r = lv * rng.lognormal(0.0, 0.8, n_layers)
        out.append(np.clip(r, 0.0, r_max))
    rng.shuffle(out)  # type: ignore[arg-type]
    return out


def quantized_copy(s: Setup, ratios: np.ndarray) -> torch.nn.Module:
    """Every layer at its ratio from the full-precision Hessians (parallel mode)."""
    from lwq.quant.layer import quantize_layer

    model = copy.deepcopy(s.fp)
    settings = s.config.gptq.settings()
    modules = dict(s.adapter.iter_layers(model))
    for name, r in zip(s.state.names, ratios, strict=True):
        W = s.adapter.read_weight(modules[name])
        job = s.state.job(name, float(r))
        qw = quantize_layer(W, s.hessians.get(name), job, settings).weight
        s.adapter.write_weight(modules[name], qw.dequantize())
    return model


def part_corr(s: Setup, args: argparse.Namespace, level: float | None) -> dict[str, Any]:
    from lwq.eval.divergence import output_divergence

    profile = s.state.profile
    chord = dataclasses.replace(profile, gamma=None)
    rows = []
    n = len(s.state.names)
    for ratios in random_allocations(n, args.n_allocs, profile.r_max, 0, level):
        div = output_divergence(s.fp, quantized_copy(s, ratios), s.windows)
        bits = sum(c.bits(float(r)) for c, r in zip(s.state.costs, ratios, strict=True))
        rows.append(
            {
                "mean_ratio": float(ratios.mean()),
                "bits": bits / sum(c.n for c in s.state.costs),
                "pred_full": profile.predicted_loss(ratios.tolist(), "full"),
                "pred_diagonal": profile.predicted_loss(ratios.tolist(), "diagonal"),
                "pred_chord": chord.predicted_loss(ratios.tolist(), "full"),
                "kl": div.kl,
                "ce_increase": div.ce_increase,
            }
        )
    family = "spread levels" if level is None else f"mean ratio {level:g}"
    res: dict[str, Any] = {"model": s.name, "family": family, "n": len(rows), "rows": rows}
    for obj in OBJECTIVES:
        pred = [r[f"pred_{obj}"] for r in rows]
        res[f"spearman_kl_{obj}"] = float(spearmanr(pred, [r["kl"] for r in rows]).statistic)
        res[f"spearman_ce_{obj}"] = float(
            spearmanr(pred, [r["ce_increase"] for r in rows]).statistic
        )
        res[f"pred_over_kl_{obj}"] = float(
            np.median([p / r["kl"] for p, r in zip(pred, rows, strict=True)])
        )
    return res


def evaluate_checkpoint(path: Path, s: Setup, seq_len: int) -> dict[str, float]:
    from baselines import evaluate

    from lwq.eval.divergence import output_divergence
    from lwq.pack.checkpoint import load_quantized

    model, _, _ = load_quantized(path)
    div = output_divergence(s.fp, model, s.windows)
    return {**evaluate(path, seq_len), "kl": div.kl, "ce_increase": div.ce_increase}


def float16_state(s: Setup, lo_bits: int) -> Any:
    """The method's state with float16 high-impact weights and a ``lo_bits`` rest."""
    from lwq.method.cost import layer_cost
    from lwq.quant.grid import FLOAT_BITS, GridSpec

    g = s.state.lo.group_size
    lo, hi = GridSpec(lo_bits, g), GridSpec(FLOAT_BITS, g)
    costs = tuple(
        layer_cost(c.name, s.state.orders[c.name], c.shape, lo, hi) for c in s.state.costs
    )
    return dataclasses.replace(s.state, lo=lo, hi=hi, costs=costs)


ROW_NAMES = {
    "full": "lwq (QP)",
    "diagonal": "lwq diagonal",
    "fixed": "fixed ratio 4/2",
}


def lwq_row(
    s: Setup,
    budget: float | None,
    objective: str,
    args: argparse.Namespace,
    state: Any = None,
    label: str | None = None,
    **method: Any,
) -> dict[str, Any]:
    """Quantize at ``budget`` (or, with ``ratio=``, at one fixed ratio) and evaluate."""
    from lwq.method.state import allocate, fixed_allocation
    from lwq.quantize import MethodPlan, quantize_model

    state = s.state if state is None else state
    label = label or ROW_NAMES[objective]
    ratio = method.pop("ratio", None)
    out = args.work / s.name / f"{label.replace(' ', '_').replace('/', '')}-{budget}"
    if budget is not None:
        method["budget"] = budget
    cfg = config_for(s.name, out, args, objective=objective, **method)
    t = time.perf_counter()
    alloc = allocate(state, cfg) if ratio is None else fixed_allocation(state, ratio)
    plan = MethodPlan(state, alloc)
    report = quantize_model(ZOO / s.name, out, plan, s.calib, cfg, False)
    seconds = time.perf_counter() - t
    return {
        "row": label,
        "bits": report.bits,
        "mean_ratio": float(np.mean(alloc.ratios)),
        "predicted_kl": alloc.predicted_loss,
        "seconds": seconds,
        **evaluate_checkpoint(out, s, args.seq_len),
    }


def uniform_rows(s: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    from baselines import run_row

    rows = []
    for bits, group in UNIFORM:
        out = args.work / s.name / f"gptq-w{bits}g{group}"
        res = run_row(s.name, "gptq", bits, group, out, args.n_samples, args.seq_len)
        rows.append(
            {
                "row": f"GPTQ W{bits} g{group}",
                "bits": res["bits"],
                "seconds": res["seconds"],
                **evaluate_checkpoint(out, s, args.seq_len),
            }
        )
    return rows


def run_peer(args: argparse.Namespace, script: str, flags: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [args.peer_python, str(REPO / "benchmarks" / "peers" / script), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed: {proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])  # type: ignore[no-any-return]


def peer_rows(s: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """HQQ 2/3-bit and llm-compressor GPTQ, evaluated by the same code (peers/common.py)."""
    if not args.peer_python:
        return []
    model = str(ZOO / s.name)
    rows = []
    for bits, group in HQQ:
        res = run_peer(
            args,
            "hqq_quant.py",
            ["--model", model, "--bits", str(bits), "--group-size", str(group)],
        )
        rows.append({**res, "row": f"HQQ W{bits} g{group}"})
    for bits, group in UNIFORM:
        flags = ["--model", model, "--bits", str(bits), "--group-size", str(group), "--kl"]
        flags += ["--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
        res = run_peer(args, "llmcompressor_gptq.py", flags)
        rows.append(
            {**res, "bits": res["bits_per_weight"], "row": f"llm-compressor W{bits} g{group}"}
        )
    return rows


def nearest(rows: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
    """Per family of rows (tool), the configuration nearest below and nearest above."""
    out = []
    for family in dict.fromkeys(r["row"].rsplit(" W", 1)[0] for r in rows):
        mine = [r for r in rows if r["row"].rsplit(" W", 1)[0] == family]
        below = [r for r in mine if r["bits"] <= budget + 0.02]
        above = [r for r in mine if r["bits"] > budget + 0.02]
        if below:
            out.append(max(below, key=lambda r: r["bits"]))
        if above:
            out.append(min(above, key=lambda r: r["bits"]))
    return out


def chord_state(s: Setup) -> Any:
    """The method's state with the linear (chord) model of each layer: the same probes."""
    return dataclasses.replace(s.state, profile=dataclasses.replace(s.state.profile, gamma=None))


def part_table(s: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    fixed_ones = [] if args.skip_baselines else uniform_rows(s, args) + peer_rows(s, args)
    dense_sparse = []
    for lo_bits in () if args.skip_baselines else (2, 3):
        label = f"FP16 0.45% + W{lo_bits}"
        dense_sparse.append(
            lwq_row(
                s,
                None,
                "fixed",
                args,
                float16_state(s, lo_bits),
                label,
                ratio=0.0045,
                lo_bits=lo_bits,
                hi_bits=16,
            )
        )
    fp16 = float16_state(s, 2)
    table = []
    for budget in args.budgets:
        rows = [lwq_row(s, budget, obj, args) for obj in ("full", "diagonal", "fixed")]
        if s.state.profile.gamma is not None:
            rows.insert(1, lwq_row(s, budget, "full", args, chord_state(s), "lwq (QP) chord"))
        if args.lwc_models is None or s.name in args.lwc_models:
            rows.append(lwq_row(s, budget, "full", args, label="lwq (QP) + LWC", hi_refine="lwc"))
        rows.append(lwq_row(s, budget, "fixed", args, fp16, "fixed ratio FP16/2", hi_bits=16))
        rows += [copy.copy(r) for r in nearest(dense_sparse + fixed_ones, budget)]
        for r in rows:
            r.update(model=s.name, budget=budget)
        table.extend(rows)
    return table


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_corr(results: list[dict[str, Any]]) -> None:
    print(
        "\n| model | allocations | n | objective | Spearman KL | Spearman CE | pred/measured KL |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for obj in OBJECTIVES:
            if f"spearman_kl_{obj}" not in r:
                continue
            print(
                f"| {r['model']} | {r['family']} | {r['n']} | {obj} "
                f"| {r[f'spearman_kl_{obj}']:.3f} "
                f"| {r[f'spearman_ce_{obj}']:.3f} | {r[f'pred_over_kl_{obj}']:.3f} |"
            )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| model | budget | row | bits (bytes) | ppl val | ppl wiki | KL held-out "
        "| CE increase | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['budget']} | {r['row']} | {r['bits']:.4f} "
            f"| {r['ppl_validation']:.3f} | {fmt(r.get('ppl_wikitext2'), '.2f')} "
            f"| {r['kl']:.4f} | {r['ce_increase']:.4f} | {r['seconds']:.0f} |"
        )


def save(
    args: argparse.Namespace,
    result: dict[str, Any],
    prep: dict[str, Any],
    corr: list[dict[str, Any]],
    table: list[dict[str, Any]],
) -> None:
    result.update(prepare=prep, corr=corr, table=table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-6l-128d", "gpt2-6l-128d"])
    ap.add_argument("--parts", nargs="+", default=["corr", "table"], choices=["corr", "table"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.25, 2.5, 3.0])
    ap.add_argument("--n-allocs", type=int, default=24)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--profile", choices=["reverse", "forward"], default="reverse")
    ap.add_argument("--profile-samples", type=int, default=256)
    ap.add_argument("--profile-seq-len", type=int, default=128)
    ap.add_argument("--peer-python", help="python of the peer venv (HQQ, llm-compressor rows)")
    ap.add_argument(
        "--lwc-models", nargs="*", default=None, help="models with learned-clipping rows (all)"
    )
    ap.add_argument(
        "--skip-baselines",
        action="store_true",
        help="table: only lwq's own allocation rows (no uniform, peer or dense-and-sparse rows)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/lwq-bench/method"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "method.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    corr: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    prep: dict[str, Any] = {}
    for model in args.models:
        s = Setup(model, args)
        prep[model] = {"seconds": s.prepare_seconds, **s.state.seconds}
        print(f"{model}: prepare {s.prepare_seconds:.0f} s {s.state.seconds}", flush=True)
        if "corr" in args.parts:
            for level in (None, 0.1, 0.02):
                corr.append(part_corr(s, args, level))
                print_corr(corr[-1:])
            save(args, result, prep, corr, table)
        if "table" in args.parts:
            table.extend(part_table(s, args))
            save(args, result, prep, corr, table)  # after each model: nothing is lost
    if corr:
        print_corr(corr)
    if table:
        print_table(table)


if __name__ == "__main__":
    main()
