"""Operations' bad input: refused before anything runs, naming the setting to change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ZOO, free_port

from cli.main import main


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "zoo.yaml"
    path.write_text(f"zoo: {ZOO}\nentries: [{{model: llama-6l-128d}}]\n", encoding="utf-8")
    return path


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_deploy_refuses_a_bad_cron_and_an_unreachable_server(
    manifest: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(capsys, ["deploy", str(manifest), "--cron", "61 * * * *"])
    assert "--cron '61 * * * *'" in err and "minute hour day-of-month" in err
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    err = _error(capsys, ["deploy", str(manifest), "--cron", "0 3 * * *"])
    assert f"the Prefect server at {url} does not answer" in err and "PREFECT_API_URL" in err
    err = _error(capsys, ["deploy", str(manifest), "--interval", "-5"])
    assert "--interval -5: give a positive number of seconds" in err


def test_deploy_checks_the_manifest_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [{model: nowhere, bitz: 3}]\n", encoding="utf-8")
    err = _error(capsys, ["deploy", str(bad), "--cron", "0 3 * * *"])
    assert "entry 1 (nowhere): bitz: unknown key" in err


def test_the_registry_unreachable_or_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    # A fresh process: other tests set this process's MLflow tracking URI.
    cmd = [sys.executable, "-m", "cli", "serve", "models:/lwq-x@champion"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"the MLflow registry at {url} did not answer" in out.stderr
    assert "MLFLOW_TRACKING_URI" in out.stderr
    err = _error(capsys, ["serve", "models:/lwq-x"])
    assert "give models:/NAME/VERSION or models:/NAME@ALIAS" in err
    err = _error(capsys, ["serve", "models:/x/1", "--host", "0.0.0.0"])
    assert "--host 0.0.0.0" in err and "--public" in err


def test_the_trigger_needs_its_secret_and_a_tracking_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LWQ_WEBHOOK_SECRET", raising=False)
    err = _error(capsys, ["trigger", "serve", "--port", str(free_port())])
    assert "set LWQ_WEBHOOK_SECRET" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    err = _error(capsys, ["trigger", "setup", "--url", "http://127.0.0.1:1/hook"])
    assert "needs an MLflow tracking server" in err


def test_a_reader_that_stops_early_ends_the_command_quietly(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lwq info CKPT | head -1``: the closed pipe ends the command with 141, no traceback."""
    out = tmp_path / "rtn"
    argv = ["quantize", "--model", str(tiny_llama), "--method", "rtn", "--bits", "4"]
    assert main([*argv, "--group-size", "32", "--out", str(out), "-q"]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    with open(write, "w", encoding="utf-8") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["info", str(out)]) == 141
