"""Set-up of a Dask worker process for lwq's tasks (a Dask preload module).

Importing torch, transformers and Prefect takes seconds; without this, every
worker pays it inside the first task it runs, that is inside the quantize
stage. With ``preload=["tasks.worker"]`` (the local cluster does it; for a
cluster of your own: ``dask worker --preload tasks.worker ...``) each worker
pays it once, when it starts, and runs torch on one thread: the workers are
the parallelism.
"""

from __future__ import annotations

import importlib
from typing import Any

# What a layer task imports; tasks.stages brings Prefect's task engine.
MODULES = ("tasks.stages", "lwq.loading", "lwq.method.state", "lwq.quant.layer", "lwq.pack.layer")


def dask_setup(worker: Any) -> None:
    import torch

    torch.set_num_threads(1)
    for name in MODULES:
        importlib.import_module(name)
