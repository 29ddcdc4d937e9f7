"""lwq: layer-wise high-impact ratio post-training quantization for causal LMs.

The package is the pure algorithm library: tensors in, typed results out.
It never imports prefect, mlflow or boto3 (``tests/test_layering.py``).
"""

from __future__ import annotations

__version__ = "0.1.0"
