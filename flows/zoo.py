"""The zoo flow: every entry of a manifest through ``flows.compress``.

Wiring only. An entry whose every width is already registered with the same
fingerprint is skipped; an entry that fails is reported and the next one runs.
Deployed on a schedule (``lwq deploy``) it reads the manifest at each run, so
an edited manifest takes effect at the next tick.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.compress import already_registered, run_checked
from lwq.errors import LwqError
from lwq.zoofile import Job, job_for, load_manifest
from tasks.tracking import Registered, fetch_base, registered_metrics

REGISTERED, ALREADY, FAILED = "registered", "already registered", "failed"


@dataclass(frozen=True)
class ZooRow:
    entry: str
    status: str  # REGISTERED, ALREADY or FAILED
    bits_target: float | None  # the budget or width (None: the entry failed before)
    name: str | None = None  # registered model
    version: str | None = None
    bits: float | None = None  # measured from the checkpoint's bytes
    perplexity: float | None = None
    seconds: float = 0.0
    error: str | None = None


def _skipped(job: Job, done: list[Registered | None]) -> list[ZooRow]:
    rows = []
    for b, reg in zip(job.budgets, done, strict=True):
        assert reg is not None
        m = registered_metrics(job.config, reg)
        rows.append(
            ZooRow(job.label, ALREADY, b, reg.name, reg.version, m.get("bits"), m.get("perplexity"))
        )
    return rows


def run_job(job: Job) -> list[ZooRow]:
    """One entry: skipped when registered, else run; a failure becomes a row."""
    t = time.perf_counter()
    try:
        done = already_registered(job.config, job.budgets)
        if all(reg is not None for reg in done):
            return _skipped(job, done)
        results = run_checked(job.config, job.budgets)
    except Exception as err:  # one entry's failure must not stop the zoo
        get_run_logger().error("%s failed:\n%s", job.label, traceback.format_exc())
        return [ZooRow(job.label, FAILED, None, seconds=time.perf_counter() - t, error=str(err))]
    seconds = (time.perf_counter() - t) / len(results)
    return [
        ZooRow(
            job.label,
            REGISTERED if r.registered.new else ALREADY,
            r.budget,
            r.registered.name,
            r.registered.version,
            r.report.bits,
            r.report.perplexity,
            seconds,
        )
        for r in results
    ]


def table(rows: list[ZooRow]) -> str:
    """The summary: one line per entry and width, failures' reasons below."""
    lines = [
        "| entry | bits target | status | registered | bits | perplexity | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r.bits_target is None else f"{r.bits_target:g}"
        reg = "-" if r.version is None else f"{r.name} v{r.version}"
        bits = "-" if r.bits is None else f"{r.bits:.4f}"
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
        lines.append(
            f"| {r.entry} | {target} | {r.status} | {reg} | {bits} | {ppl} | {r.seconds:.1f} |"
        )
    lines += [f"{r.entry}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


@flow(name="lwq-zoo", validate_parameters=False)
def zoo(manifest: str) -> list[ZooRow]:
    """Compress every entry of the manifest at ``manifest`` that is not registered yet."""
    jobs = load_manifest(Path(manifest), resolve=fetch_base)
    rows = [row for job in jobs for row in run_job(job)]
    get_run_logger().info("zoo %s:\n%s", manifest, table(rows))
    return rows


@flow(name="lwq-registered", validate_parameters=False)
def compress_registered(manifest: str, model: str) -> list[ZooRow]:
    """One registered base model (``models:/NAME/VERSION``) with the manifest's defaults,
    registered under ``lwq-NAME`` unless the defaults name another registry name."""
    job = job_for(Path(manifest), model, resolve=fetch_base)
    rows = run_job(job)
    get_run_logger().info("%s:\n%s", model, table(rows))
    failed = [r.error for r in rows if r.status == FAILED]
    if failed:
        raise LwqError(f"{model}: {failed[0]}")
    return rows
