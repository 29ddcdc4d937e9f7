"""Shared fixtures. Tests never reach a model hub: everything is local."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
ZOO_MODELS = ("llama-6l-128d", "gpt2-6l-128d")
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    if not (ZOO / "data" / "split.json").is_file():
        pytest.fail(f"the committed zoo is missing from {ZOO}: run 'lwq zoo build'")
    return ZOO


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"WikiText-2 test split not found at {path} (../shared is absent)")
    return path


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same random state: results never depend on order."""
    import torch

    torch.manual_seed(1234)


# Servers on loopback for the pipeline tests: moto's S3, MLflow, Prefect's test harness.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1, with dummy credentials."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing-key", AWS_SECRET_ACCESS_KEY="testing-secret-value")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Process:
    """A server or service process started by a test and ended by PID (its whole group).

    ``start`` waits until ``health`` answers (when given); ``stop`` sends
    SIGINT, then SIGKILL (a Prefect worker ignores SIGTERM). The log is
    ``root/NAME.log``, quoted when the process does not come up.
    """

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.name = root, name
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(
        self, cmd: list[str], env: dict[str, str], health: str | None, timeout: float = 180
    ) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=log, start_new_session=True, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while health is not None:
            try:
                with urllib.request.urlopen(health, timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.tail()
                    self.stop()
                    pytest.fail(f"{self.name} did not answer {health}:\n{tail}")
                time.sleep(0.5)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 30)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader (flow runs, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


class MlflowServer(Process):
    """An `mlflow server` process on 127.0.0.1: sqlite backend store, proxied artifacts.

    The artifacts go to ``artifacts`` (a local folder or an ``s3://`` bucket of
    ``s3_endpoint``), served through the tracking server as a team's server does,
    so clients need no store credentials. ``stop`` and ``start`` again keep the
    port and the stores: the same server, restarted. ``env`` adds settings (the
    webhook ones).
    """

    def __init__(
        self,
        root: Path,
        artifacts: str,
        s3_endpoint: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root, "mlflow-server")
        self.artifacts, self.s3_endpoint, self.env = artifacts, s3_endpoint, env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        env = {**os.environ, **self.env}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        cmd = [sys.executable, "-m", "mlflow", "server"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", self.artifacts]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.launch(cmd, env, f"{self.uri}/health", timeout)


class PrefectServer(Process):
    """`prefect server start` on 127.0.0.1 with its own sqlite database (schedules run)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "prefect-server")
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 180) -> None:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.root / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "prefect", "server", "start"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.launch(cmd, env, f"{self.api}/health", timeout)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[str]:
    """A tracking server whose artifacts live in a bucket of the loopback S3 endpoint."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mlflow-artifacts")
    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow"), "s3://mlflow-artifacts/runs", s3_endpoint
    )
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server for the session (it takes 15-25 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (its scheduler runs, unlike the test harness's): its API URL."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect"))
    server.start()
    try:
        yield server.api
    finally:
        server.stop()


def rtn_manifest(folder: Path, model: Path, tracking_uri: str) -> Path:
    """A one-entry zoo manifest (RTN W4 of ``model``) with its evaluation text, in ``folder``."""
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:5000]
    (folder / "eval.txt").write_text(text, encoding="utf-8")
    manifest = folder / "zoo.yaml"
    pipeline = f'{{work_dir: work, tracking_uri: "{tracking_uri}", eval_data: eval.txt}}'
    manifest.write_text(
        "defaults:\n  method: rtn\n  bits: 4\n  config:\n    quant: {group_size: 32}\n"
        f"    pipeline: {pipeline}\nentries:\n  - model: {model}\n",
        encoding="utf-8",
    )
    return manifest


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    from tiny_models import save_tiny_model_dir

    return save_tiny_model_dir("llama", tmp_path / "tiny-llama")
