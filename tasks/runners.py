"""Task runners: Prefect's default locally, a Dask cluster for scale-out."""

from __future__ import annotations

from typing import Any

from lwq.config import PipelineConfig
from lwq.errors import ConfigError


def task_runner_for(pipeline: PipelineConfig) -> Any:
    """One worker thread locally (torch already uses every core), or Dask."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if pipeline.task_runner == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    import os

    import dask
    from prefect_dask import DaskTaskRunner

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "pipeline.task_runner=dask needs a Prefect server (each Dask worker would "
            "otherwise start its own ephemeral one): run `prefect server start` and set "
            "PREFECT_API_URL"
        )
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 slows torch almost 2x in workers.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    if pipeline.dask_address:
        return DaskTaskRunner(address=pipeline.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": pipeline.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            # Imports paid when a worker starts, not inside the first task it runs.
            "preload": ["tasks.worker"],
            # One torch thread per worker process: the workers are the parallelism.
            "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        }
    )
