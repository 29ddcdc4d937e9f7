"""`lwq deploy`: the zoo manifest served on a schedule against a real Prefect server."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Process, rtn_manifest


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _zoo_runs(api: str) -> list[dict[str, Any]]:
    """The flow runs of the lwq-zoo flow, oldest first."""
    flows = _post(api, "/flows/filter", {"flows": {"name": {"any_": ["lwq-zoo"]}}})
    if not flows:
        return []
    body = {"flows": {"id": {"any_": [flows[0]["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs: list[dict[str, Any]] = _post(api, "/flow_runs/filter", body)
    return runs


def _versions(db: Path, name: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_a_served_schedule_registers_once(
    tiny_llama: Path, tmp_path: Path, prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "mlflow.db"
    manifest = rtn_manifest(tmp_path, tiny_llama, f"sqlite:///{db}")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "ph")}
    serving = Process(tmp_path, "deploy")
    cmd = [sys.executable, "-m", "cli", "deploy", str(manifest), "--interval", "15"]
    serving.launch(cmd, env, health=None)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert serving.proc is not None and serving.proc.poll() is None, serving.tail()
            runs = _zoo_runs(prefect_api)
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            if len(done) >= 2:
                break
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, serving.tail()
            time.sleep(2)
        else:
            pytest.fail(f"no two completed scheduled runs in 600 s:\n{serving.tail()}")
    finally:
        serving.stop()
    first = done[0]
    assert first["deployment_id"] and first["parameters"] == {"manifest": str(manifest)}
    # Fired by the schedule.
    assert all(r["auto_scheduled"] for r in done)
    from datetime import datetime

    for r in done:
        due, started = (datetime.fromisoformat(r[k]) for k in ("expected_start_time", "start_time"))
        print(
            f"scheduled run {r['name']}: started {(started - due).total_seconds():.1f} s after due"
        )
    # The first tick registered the entry; the second found it registered.
    assert _versions(db, "lwq-tiny-llama") == ["1"]
    assert "lwq-zoo/lwq (1 entries of" in serving.tail(100000)
