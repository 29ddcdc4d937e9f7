"""Stage helpers that need no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_method_state_is_read_once_per_process_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lwq.method.state as state
    from tasks.stages import method_state

    reads: list[Path] = []

    def fake_load(directory: Path, expect_code: str | None = None) -> object:
        assert expect_code == state.method_code_version()
        reads.append(directory)
        return object()

    monkeypatch.setattr(state, "load_state", fake_load)
    state_file = tmp_path / state.STATE_JSON
    state_file.write_bytes(b"one")
    first = method_state(str(tmp_path))
    assert method_state(str(tmp_path)) is first and len(reads) == 1
    # A folder rewritten in place (another size and time stamp) is read again.
    state_file.write_bytes(b"second")
    os.utime(state_file, ns=(1, 1))
    assert method_state(str(tmp_path)) is not first and len(reads) == 2


def test_dask_worker_setup_imports_what_a_layer_task_needs() -> None:
    import sys

    import torch

    from tasks.worker import MODULES, dask_setup

    threads = torch.get_num_threads()
    try:
        dask_setup(worker=None)
        assert torch.get_num_threads() == 1
        assert all(name in sys.modules for name in MODULES)
    finally:
        torch.set_num_threads(threads)
