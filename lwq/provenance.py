"""Which code produced a result: content hashes of lwq's own sources.

A cached stage result, a method state on disk or a registered checkpoint is
valid only for the code that computed it. ``code_version(module, ...)`` hashes
the source files of the given lwq modules and of every lwq module they import,
directly or not, including imports inside functions (read from the syntax
tree, never executed), together with the versions of the libraries that do the
arithmetic. A fix in ``lwq/quant/gptq.py`` changes the version of every stage
that quantizes and leaves the calibration stage's version alone.

``import_graph`` is the same analysis for the whole package; a test holds it
acyclic.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = "lwq"
PACKAGE_DIR = Path(__file__).resolve().parent
# Libraries whose arithmetic is part of a result: a new release may change it.
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "cvxpy", "clarabel", "osqp")


def module_path(name: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The source file of the dotted module ``name`` under ``root`` (a package dir)."""
    top, *rest = name.split(".")
    if top != root.name:
        return None
    base = root.joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE_DIR) -> set[str]:
    """Modules of the package that ``path`` imports anywhere in its body.

    ``from a.b import c`` names ``a.b`` and, when ``a.b.c`` is a module of its
    own, that module too. Relative imports are resolved against ``path``.
    """
    name = _module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if module_path(m, root) is not None}


def all_modules(root: Path = PACKAGE_DIR) -> list[str]:
    return sorted(_module_name(p, root) for p in root.rglob("*.py"))


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (explicitly, at any depth of its body)."""
    graph = {}
    for name in all_modules(root):
        path = module_path(name, root)
        assert path is not None
        graph[name] = imported_modules(path, root) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def closure(modules: Iterable[str], root: Path = PACKAGE_DIR) -> set[str]:
    """``modules``, what they import transitively, and the packages that hold them."""
    graph = import_graph(root)
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        if module_path(m, root) is None:
            raise ValueError(f"{m} is not a module of {root.name}")
        seen.add(m)
        parts = m.split(".")
        parents = (".".join(parts[:k]) for k in range(1, len(parts)))
        todo.extend(p for p in parents if module_path(p, root) is not None)  # their __init__ runs
        todo.extend(graph.get(m, ()))
    return seen


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


@cache
def code_version(*modules: str) -> str:
    """SHA-256 of the sources ``modules`` run (transitively) and of the library versions.

    Computed once per process: it describes the code this process loaded.
    """
    h = hashlib.sha256()
    for m in sorted(closure(modules)):
        path = module_path(m)
        assert path is not None
        h.update(f"{m}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for lib, version in library_versions().items():
        h.update(f"{lib}=={version}\0".encode())
    return h.hexdigest()
