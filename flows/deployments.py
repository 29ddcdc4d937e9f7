"""Deployments of the zoo flow, served by ``lwq deploy`` against a Prefect server.

Wiring only: which flow, on which schedule, with which parameters, and how
many runs at once. The process that serves them runs each flow run in a child
process; the Prefect server keeps the schedule and the run history.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

from lwq.errors import ConfigError, LwqError

ZOO_FLOW = "lwq-zoo"
REGISTERED_FLOW = "lwq-registered"


def prefect_api() -> str:
    """The configured Prefect server's API URL, checked to answer; an error names the setting."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "this command needs a Prefect server that keeps schedules and runs: set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after 'prefect server start'; "
            "infra/compose.yaml starts one)"
        )
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as r:
            json.load(r)
    except (OSError, ValueError, urllib.error.URLError) as err:
        raise LwqError(
            f"the Prefect server at {url} does not answer ({err}); start it or correct "
            "PREFECT_API_URL"
        ) from err
    return str(url)


def check_schedule(cron: str | None, interval: float | None, timezone: str | None) -> None:
    """One valid schedule, or a ConfigError naming the flag."""
    if (cron is None) == (interval is None):
        raise ConfigError("give one schedule: --cron EXPRESSION or --interval SECONDS")
    if cron is not None:
        check_cron(cron, timezone)
    elif interval is not None and interval <= 0:
        raise ConfigError(f"--interval {interval:g}: give a positive number of seconds")


def check_cron(cron: str, timezone: str | None) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        first = str(err).splitlines()[2] if len(str(err).splitlines()) > 2 else str(err)
        raise ConfigError(
            f"--cron {cron!r} (timezone {timezone or 'UTC'}): {first.strip()}; give five "
            "fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *'"
        ) from err


def zoo_deployment(
    manifest: Path,
    name: str,
    cron: str | None = None,
    interval: float | None = None,
    timezone: str | None = None,
) -> Any:
    """The zoo flow on ``manifest`` (read again at every run), one run at a time.

    A tick that comes while a run is still going is cancelled, not queued:
    the next tick compresses whatever is left.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.deployments.runner import EntrypointType

    from flows.zoo import zoo

    check_schedule(cron, interval, timezone)
    if cron is not None:
        schedule: Any = CronSchedule(cron=cron, timezone=timezone)
    else:
        assert interval is not None
        schedule = IntervalSchedule(interval=timedelta(seconds=interval))
    limit = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return zoo.to_deployment(
        name=name,
        schedule=schedule,
        concurrency_limit=limit,
        parameters={"manifest": str(manifest.resolve())},
        description=f"lwq: compress the zoo manifest {manifest.resolve()}",
        tags=["lwq"],
        # Flow runs import flows.zoo from the installed package, wherever this was started.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def registered_deployment(manifest: Path, name: str) -> Any:
    """The registered-base flow with the manifest's defaults, started by the trigger
    receiver (``run_deployment(f"lwq-registered/{name}", parameters={"model": ...})``).
    Its runs queue: each is a different base model version."""
    from prefect.deployments.runner import EntrypointType

    from flows.zoo import compress_registered

    return compress_registered.to_deployment(
        name=name,
        parameters={"manifest": str(manifest.resolve())},
        description=f"lwq: compress a registered base model with the defaults of {manifest}",
        tags=["lwq"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(*deployments: Any) -> None:
    """Serve the deployments until interrupted, one flow run at a time on this machine.

    On shutdown the schedules are paused, so no run piles up while nothing serves.
    """
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=1, pause_on_shutdown=True, print_starting_message=False)
