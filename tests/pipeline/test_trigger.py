"""The registry trigger and the schedule: signed deliveries, what starts a run, and the whole
chain on real servers (mlflow server with webhooks -> receiver -> prefect server ->
lwq deploy, which also serves the zoo manifest on a short interval)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import MlflowServer, Process, free_port, rtn_manifest

from tasks.trigger import Receiver, check_delivery, decide, signature

SECRET = "a-test-secret-of-some-length"


def _delivery(event: dict[str, Any], secret: str = SECRET, age: float = 0) -> tuple[bytes, dict]:
    body = json.dumps(event).encode()
    stamp = str(int(time.time() - age))
    headers = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(secret, "d-1", stamp, body),
    }
    return body, headers


BASE = {
    "entity": "model_version",
    "action": "created",
    "data": {"name": "base", "version": "3", "tags": {"lwq.role": "base"}},
}


def test_signature_and_age_are_checked() -> None:
    body, headers = _delivery(BASE)
    assert check_delivery(SECRET, headers, body) is None
    assert check_delivery("another-secret-value", headers, body) == "wrong signature"
    assert check_delivery(SECRET, headers, body + b" ") == "wrong signature"
    stale_body, stale = _delivery(BASE, age=3600)
    assert "stale delivery" in str(check_delivery(SECRET, stale, stale_body))
    assert "missing" in str(check_delivery(SECRET, {}, body))


def test_what_starts_a_run() -> None:
    watched = frozenset({"base"})
    assert decide(BASE, watched).model == "models:/base/3"
    own_tags = {"lwq.run_fingerprint": "x"}
    own = {**BASE, "data": {"name": "lwq-base", "version": "1", "tags": own_tags}}
    assert decide(own, watched).model is None
    plain = {**BASE, "data": {"name": "other", "version": "1", "tags": {}}}
    assert decide(plain, watched).model is None
    alias = {"entity": "model_version_alias", "action": "created"}
    champion = {**alias, "data": {"name": "base", "alias": "champion", "version": "4"}}
    assert decide(champion, watched).model == "models:/base/4"
    assert decide(champion, frozenset()).model is None  # not watched
    candidate = {**alias, "data": {"name": "base", "alias": "candidate", "version": "4"}}
    assert decide(candidate, watched).model is None


def test_the_receiver_answers() -> None:
    started: list[tuple[str, str]] = []

    def start(model: str, key: str) -> str:
        started.append((model, key))
        return "run-1"

    receiver = Receiver(SECRET, frozenset(), start)
    body, headers = _delivery(BASE)
    assert receiver.handle("POST", "/hook", body, headers) == (
        200,
        {"started": "run-1", "model": "models:/base/3", "reason": "base model base v3 registered"},
    )
    assert started == [("models:/base/3", "lwq:base/3")]
    bad = {**headers, "X-MLflow-Signature": "v1,AAAA"}
    assert receiver.handle("POST", "/hook", body, bad)[0] == 401
    assert receiver.handle("GET", "/hook", b"", headers)[0] == 404
    assert len(started) == 1


# The whole chain on real servers.


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _runs(api: str, flow: str) -> list[dict[str, Any]]:
    """The flow runs of ``flow``, oldest first."""
    query = {
        "flows": {"name": {"any_": [flow]}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    body = json.dumps(query).encode()
    status, runs = _post(f"{api}/flow_runs/filter", body, {"Content-Type": "application/json"})
    assert status == 200
    return list(runs)


@pytest.fixture
def webhook_mlflow(tmp_path: Path) -> Any:
    from cryptography.fernet import Fernet

    env = {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    server = MlflowServer(tmp_path / "mlflow", str(tmp_path / "mlflow" / "artifacts"), env=env)
    server.start()
    yield server
    server.stop()


def test_scheduled_and_triggered_runs_register_once(
    tiny_llama: Path,
    tmp_path: Path,
    prefect_api: str,
    webhook_mlflow: MlflowServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    from cli.main import main

    uri = webhook_mlflow.uri
    manifest = rtn_manifest(tmp_path, tiny_llama, uri)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": uri,
        "LWQ_WEBHOOK_SECRET": SECRET,
    }
    port = free_port()
    deploy, receiver = Process(tmp_path, "deploy"), Process(tmp_path, "receiver")
    # One process serves the zoo every 20 s and the trigger's deployment, a run at a time.
    cmd = [sys.executable, "-m", "cli", "deploy", str(manifest), "--interval", "20"]
    deploy.launch([*cmd, "--name", "t"], env, health=None)
    cmd = [sys.executable, "-m", "cli", "trigger", "serve", "--port", str(port)]
    receiver.launch(
        [*cmd, "--deployment", "t", "--watch", "tiny-base"],
        env,
        health=f"http://127.0.0.1:{port}/health",
    )
    client = MlflowClient(tracking_uri=uri)
    try:
        os.environ["LWQ_WEBHOOK_SECRET"] = SECRET
        hook = f"http://127.0.0.1:{port}/hook"
        for _ in range(2):  # idempotent: one webhook after two setups
            assert main(["trigger", "setup", "--url", hook, "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert "created on" in out and "updated on" in out
        assert [w.name for w in client.list_webhooks()] == ["lwq-trigger"]
        # Deployments exist before the event (lwq deploy has registered them).
        deadline = time.monotonic() + 120
        while "serving on" not in deploy.tail() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)  # the server's webhook cache (1 s here)

        t0 = time.monotonic()
        args = ["register-base", str(tiny_llama), "--name", "tiny-base", "--tracking-uri", uri]
        assert main([*args, "--work-dir", str(tmp_path / "w")]) == 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert deploy.proc is not None and deploy.proc.poll() is None, deploy.tail()
            try:
                mv = client.get_model_version_by_alias("lwq-tiny-base", "candidate")
                break
            except Exception:
                time.sleep(2)
        else:
            pytest.fail(f"nothing registered:\n{receiver.tail()}\n{deploy.tail()}")
        elapsed = time.monotonic() - t0
        print(f"trigger to registered: {elapsed:.1f} s")
        assert mv.version == "1" and mv.tags["lwq.base_model_sha256"]
        runs = _runs(prefect_api, "lwq-registered")
        assert len(runs) == 1 and runs[0]["parameters"]["model"] == "models:/tiny-base/1"

        # The same delivery again, and the champion alias on the same version: one run.
        event = {
            "entity": "model_version",
            "action": "created",
            "data": {"name": "tiny-base", "version": "1", "tags": {"lwq.role": "base"}},
        }
        body, headers = _delivery(event)
        status, answer = _post(hook, body, {**headers, "Content-Type": "application/json"})
        assert status == 200 and answer["started"] == runs[0]["id"]
        client.set_registered_model_alias("tiny-base", "champion", "1")
        # A wrong signature: 401 and no run.
        bad = {**headers, "X-MLflow-Signature": signature("not-the-secret-at-all", "d", "1", body)}
        assert _post(hook, body, bad)[0] == 401
        # The schedule: the first tick registered the manifest's entry, the next ones nothing.
        deadline = time.monotonic() + 300
        while True:
            zoo = _runs(prefect_api, "lwq-zoo")
            done = [r for r in zoo if r["state_type"] == "COMPLETED"]
            assert not [r for r in zoo if r["state_type"] in ("FAILED", "CRASHED")], deploy.tail()
            if len(done) >= 2:
                break
            assert time.monotonic() < deadline, deploy.tail()
            time.sleep(2)
        assert all(r["auto_scheduled"] for r in done)
        assert done[0]["parameters"] == {"manifest": str(manifest)}
        versions = client.search_model_versions("name='lwq-tiny-llama'")
        assert [str(v.version) for v in versions] == ["1"]
        for r in done:
            due = datetime.fromisoformat(r["expected_start_time"])
            began = datetime.fromisoformat(r["start_time"])
            print(f"scheduled run {r['name']}: started {(began - due).total_seconds():.1f} s late")
        assert len(_runs(prefect_api, "lwq-registered")) == 1
        log = receiver.tail(100000)
        # lwq's own registrations reached the receiver and were ignored.
        assert "lwq-tiny-base v1 is lwq's own result" in log, log
        assert "lwq-tiny-llama v1 is lwq's own result" in log, log
        assert "champion of tiny-base moved to v1" in log, log
    finally:
        os.environ.pop("LWQ_WEBHOOK_SECRET", None)
        receiver.stop()
        deploy.stop()
