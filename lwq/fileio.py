"""Writing files: atomically, in safetensors (never pickles), with the process umask.

safetensors creates its files with mode 0600; a checkpoint read by a serving
process of another user needs the mode every other file gets (0666 minus the
umask), so every safetensors file lwq writes goes through ``save_tensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    os.chmod(path, 0o666 & ~current_umask())


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) through a temporary name."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    own: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():  # safetensors refuses tensors that share storage
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        own[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(own, str(tmp), metadata=metadata)
    honour_umask(tmp)
    os.replace(tmp, path)
    return path


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, dict(meta)


def write_json(obj: Any, path: Path) -> Path:
    """``obj`` as indented JSON, through a temporary name, flushed to disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
