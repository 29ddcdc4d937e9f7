"""lwq/ is the pure library: no orchestration, tracking or storage imports."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

FORBIDDEN = ("prefect", "mlflow", "boto3", "botocore")


def test_no_orchestration_imports_in_source() -> None:
    offenders = []
    for path in sorted((REPO / "lwq").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []


def test_importing_lwq_loads_no_orchestration_module() -> None:
    code = (
        "import sys, lwq, lwq.cli, lwq.zoo, lwq.eval, lwq.models;"
        f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
