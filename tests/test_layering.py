"""lwq/ is the pure library: no orchestration, tracking, storage or CLI imports, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from lwq.provenance import closure, code_version, find_cycle, import_graph, imported_modules

# Orchestration, tracking and storage libraries, and the project's own outer layers.
FORBIDDEN = ("prefect", "mlflow", "boto3", "botocore", "tasks", "flows", "cli")


def test_no_outer_layer_imports_anywhere_in_lwq() -> None:
    """Imports inside functions count: a hidden import is still a dependency."""
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


def test_the_import_graph_of_lwq_is_acyclic() -> None:
    graph = import_graph()
    assert "lwq.quantize" in graph and "lwq.method.state" in graph["lwq.quantize"]
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_hidden_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # inside a function
    (pkg / "sub" / "b.py").write_text("from pkg import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert imported_modules(pkg / "a.py", pkg) == {"pkg.sub.b"}  # pkg.sub: no __init__
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_code_versions_follow_what_a_stage_runs() -> None:
    """The calibration stage does not run the quantizer; the driver does."""
    assert "lwq.quant.gptq" not in closure(["lwq.calibration", "lwq.models"])
    assert "lwq.quant.gptq" in closure(["lwq.quantize"])
    assert code_version("lwq.calibration") != code_version("lwq.quantize")
    assert code_version("lwq.calibration") == code_version("lwq.calibration")


def test_importing_lwq_loads_no_outer_module() -> None:
    code = (
        "import sys, lwq, lwq.quantize, lwq.sweep, lwq.zoo, lwq.eval, lwq.models;"
        f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_function_decides_every_window() -> None:
    """The evaluation window rule lives in lwq.models.context_window only."""
    users = []
    for folder in ("lwq", "tasks", "flows", "cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if '"max_position_embeddings"' in path.read_text():  # read from a config
                users.append(str(path.relative_to(REPO)))
    assert users == ["lwq/models.py"]


def test_nothing_cites_files_outside_the_repository() -> None:
    offenders = []
    for folder in ("lwq", "tasks", "flows", "cli", "benchmarks", "infra", "docs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".sh", ".yaml") and "METHOD.md" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
