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
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ConfigError(
            "pipeline.task_runner=dask needs prefect-dask: pip install -e '.[dask]'"
        ) from err
    if pipeline.dask_address:
        return DaskTaskRunner(address=pipeline.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": pipeline.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
        }
    )
