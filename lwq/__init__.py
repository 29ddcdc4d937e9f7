"""lwq: layer-wise high-impact ratio post-training quantization for causal LMs.

The package is the pure algorithm library: tensors in, typed results out.
It never imports prefect, mlflow or boto3 (``tests/test_layering.py``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(source: str, device: str = "cpu", packed: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, manifest) of a packed checkpoint: a local folder, or a registry
    URI such as ``models:/NAME@champion`` (MLflow: MLFLOW_TRACKING_URI). See ``lwq.sources``.
    ``packed=False`` dequantises the layers instead of computing from their codes."""
    from lwq.sources import load as load_source

    loaded = load_source(source, device, packed)
    return loaded.model, loaded.tokenizer, loaded.manifest
