"""Caches and the registry know the code: a fix in the quantizer is never served stale.

The workflow runs as a user runs it (``lwq run`` in a fresh process) from a
copy of the sources; the copy's quantizer is then changed, as a fix would
change it, and the same command run again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, ZOO

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

PACKAGES = ("lwq", "tasks", "flows", "cli")


def _copy_sources(dest: Path) -> Path:
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _run(src: Path, config: Path, home: Path) -> str:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(src),  # the copy, not the installed checkout
        PREFECT_API_URL=str(PREFECT_API_URL.value()),  # the session's test server
        PREFECT_HOME=str(home),
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    entry = "cli" if (src / "cli").is_dir() else "lwq.cli"
    proc = subprocess.run(
        [sys.executable, "-m", entry, "run", "--config", str(config), "-q"],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cache(out: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if x.strip().startswith("cache:"))
    parts = [p.strip() for p in line.split(":", 1)[1].split(",")]
    return {p.split(" ", 1)[0]: p.split(" ", 1)[1] for p in parts}


def test_a_quantizer_fix_recomputes_what_it_affects_and_registers_a_new_version(
    tiny_llama: Path, tmp_path: Path
) -> None:
    src = _copy_sources(tmp_path / "src")
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:8000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    config = {
        "model": str(tiny_llama),
        "calib": {
            "source": str(ZOO / "data" / "calibration.txt"),
            "n_samples": 4,
            "seq_len": 32,
            "batch_size": 4,
        },
        "quant": {"method": "lwq"},
        "method": {"budget": 2.7, "group_size": 32, "profile_samples": 8, "profile_seq_len": 16},
        "pipeline": {
            "work_dir": str(tmp_path / "work"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "registry_name": "tiny-code",
            "eval_data": str(tmp_path / "eval.txt"),
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    home = tmp_path / "prefect-home"

    first = _run(src, tmp_path / "run.yaml", home)
    assert "registered tiny-code version 1 (candidate, champion)" in first

    again = _run(src, tmp_path / "run.yaml", home)
    assert "version 1" in again and "already registered" in again

    # A change in the quantizer, as a fix would make: GPTQ's lazy batch updates
    # run in half-size blocks (the same numbers up to rounding, other code).
    gptq = src / "lwq" / "quant" / "gptq.py"
    source = gptq.read_text(encoding="utf-8")
    changed = source.replace("B = settings.block_size\n", "B = settings.block_size // 2\n", 1)
    assert changed != source
    gptq.write_text(changed, encoding="utf-8")

    fixed = _run(src, tmp_path / "run.yaml", home)
    assert re.search(r"registered tiny-code version 2 \(candidate", fixed), fixed
    cache = _cache(fixed)
    assert cache["calibrate"] == "cached"  # calibration does not run the quantizer
    assert cache["sensitivity"] == "computed"  # its probes do
    assert cache["quantize-layer"] == "0/14 cached"
    assert cache["pack"] == "computed" and cache["evaluate"] == "computed"

    # Unchanged code again: everything from the cache, nothing registered.
    last = _cache(_run(src, tmp_path / "run.yaml", home))
    assert last["quantize-layer"] == "14/14 cached"
    assert {k: v for k, v in last.items() if k != "quantize-layer"} == {
        "calibrate": "cached",
        "sensitivity": "cached",
        "solve": "cached",
        "pack": "cached",
        "evaluate": "cached",
    }
