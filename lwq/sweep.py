"""``lwq sweep``: one sensitivity profile, one checkpoint per budget, a Pareto table.

The profile depends only on the model, the calibration set, the scoring and
the grids, so it is computed once; each budget then costs a QP solve and one
quantization pass. Every budget is checked against the feasible range and
every output directory against ``overwrite`` before anything is quantized.
Writes ``<out>/bits-<B>/`` checkpoints and, beside them, ``pareto.json``,
``pareto.md``, ``pareto.png`` (bits against perplexity) and ``allocation.png``
(the ratio of every layer at every budget, coloured by module type).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwq.config import LwqConfig, resolve_inputs
from lwq.errors import ConfigError
from lwq.eval.perplexity import perplexity_of_text
from lwq.method.state import HessianStore
from lwq.models import check_model_dir, context_window, load_model_dir
from lwq.pack.checkpoint import check_output_dir, load_quantized
from lwq.plots import allocation_plot, pareto_front, pareto_plot
from lwq.quantize import MethodPlan, check_budgets, plan_for, prepare_method, quantize_model
from lwq.textio import read_text


@dataclass(frozen=True)
class SweepRow:
    budget: float
    out: Path
    bits: float  # measured from the files
    predicted_kl: float
    perplexity: float | None
    seconds: float
    ratios: tuple[float, ...]


@dataclass(frozen=True)
class SweepReport:
    out: Path
    rows: list[SweepRow]
    names: tuple[str, ...]
    fp_perplexity: float | None
    prepare_seconds: float
    seconds: float

    def table(self) -> str:
        front = pareto_front([(r.bits, r.perplexity or r.predicted_kl) for r in self.rows])
        lines = [
            "| budget | bits (bytes) | perplexity | predicted KL | mean ratio | s | Pareto |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, best in zip(self.rows, front, strict=True):
            ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
            mean = sum(r.ratios) / len(r.ratios)
            lines.append(
                f"| {r.budget} | {r.bits:.4f} | {ppl} | {r.predicted_kl:.4f} | {mean:.2%} "
                f"| {r.seconds:.1f} | {'yes' if best else ''} |"
            )
        if self.fp_perplexity is not None:
            lines.append(f"\nfull precision perplexity: {self.fp_perplexity:.3f}")
        return "\n".join(lines)


def checkpoint_dir(out: Path, budget: float) -> Path:
    return out / f"bits-{budget:g}"


def sweep(
    config: LwqConfig,
    budgets: list[float],
    eval_data: Path | None = None,
    progress: bool = True,
) -> SweepReport:
    """Quantize ``config.model`` at every budget, sharing the sensitivity profile.

    Perplexities on ``eval_data`` use ``lwq.models.context_window`` (the model's
    context capped at 2048), as every other command does.
    """
    t0 = time.perf_counter()
    if not budgets:
        raise ConfigError("--bits: give at least one budget, e.g. --bits 2.25,2.5,3.0")
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"--bits {budgets}: a budget is repeated")
    config.check_for("sweep")
    config = resolve_inputs(config)
    config.require("model", "out", "calib.source")
    model_dir, out = Path(str(config.model)), Path(str(config.out))
    check_model_dir(model_dir)
    for b in budgets:
        check_output_dir(checkpoint_dir(out, b), config.overwrite)
    config = check_budgets(model_dir, config, budgets)
    text = None if eval_data is None else read_text(eval_data, "--data")
    model, tokenizer = load_model_dir(model_dir, device=config.device)
    work = tempfile.TemporaryDirectory(prefix="lwq-hessians-")
    keep = Path(work.name) if config.calib.block_mode == "parallel" else None
    prep = prepare_method(model, tokenizer, config, progress, keep)
    store = None if keep is None else HessianStore.open(keep)
    window = context_window(model.config)
    fp_ppl = None
    if text is not None:
        fp_ppl = perplexity_of_text(model, tokenizer, text, window, batch_size=8).perplexity
    del model
    prepare_seconds = time.perf_counter() - t0
    # Solve every budget first: an infeasible one fails before anything is written.
    plans = [plan_for(config, prep.state, b) for b in budgets]
    rows = []
    for b, plan in zip(budgets, plans, strict=True):
        t = time.perf_counter()
        dest = checkpoint_dir(out, b)
        report = quantize_model(model_dir, dest, plan, prep.calib, config, progress, store)
        ppl = None
        if text is not None:
            qmodel, qtok, _ = load_quantized(dest, device=config.device)
            ppl = perplexity_of_text(qmodel, qtok, text, window, batch_size=8).perplexity
        assert isinstance(plan, MethodPlan)
        rows.append(
            SweepRow(
                b,
                dest,
                report.bits,
                plan.alloc.predicted_loss,
                ppl,
                time.perf_counter() - t,
                plan.alloc.ratios,
            )
        )
    report_ = SweepReport(
        out, rows, prep.state.names, fp_ppl, prepare_seconds, time.perf_counter() - t0
    )
    write_sweep_files(report_)
    work.cleanup()
    return report_


def write_sweep_files(report: SweepReport) -> None:
    out = report.out
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "fp_perplexity": report.fp_perplexity,
        "prepare_seconds": report.prepare_seconds,
        "seconds": report.seconds,
        "layers": list(report.names),
        "rows": [
            {
                "budget": r.budget,
                "checkpoint": str(r.out),
                "bits": r.bits,
                "predicted_kl": r.predicted_kl,
                "perplexity": r.perplexity,
                "seconds": r.seconds,
                "ratios": list(r.ratios),
            }
            for r in report.rows
        ],
    }
    (out / "pareto.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "pareto.md").write_text(report.table() + "\n", encoding="utf-8")
    have_ppl = all(r.perplexity is not None for r in report.rows)
    points = [
        (r.bits, r.perplexity if r.perplexity is not None and have_ppl else r.predicted_kl)
        for r in report.rows
    ]
    pareto_plot(
        {"lwq": points},
        out / "pareto.png",
        ylabel="perplexity" if have_ppl else "predicted KL",
        reference=report.fp_perplexity if have_ppl else None,
    )
    allocation_plot(
        report.names,
        {f"{r.budget:g} bits ({r.bits:.3f} measured)": r.ratios for r in report.rows},
        out / "allocation.png",
    )
