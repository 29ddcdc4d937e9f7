"""The compress flow against loopback servers: S3 (moto), `mlflow server`, Prefect."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from conftest import ZOO

from lwq.config import LwqConfig, make_config
from lwq.eval.perplexity import text_perplexity
from lwq.models import context_window
from lwq.pack.checkpoint import load_quantized, read_manifest

pytestmark = pytest.mark.usefixtures("prefect_server")


def _config(model: Path, tmp: Path, s3: str, budget: float = 2.7, **pipeline: Any) -> LwqConfig:
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:20000]
    (tmp / "eval.txt").write_text(text, encoding="utf-8")
    return make_config(
        {
            "model": str(model),
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": 4,
                "seq_len": 32,
                "batch_size": 4,
            },
            "quant": {"method": "lwq"},
            "method": {
                "budget": budget,
                "group_size": 32,
                "profile_samples": 8,
                "profile_seq_len": 16,
            },
            "pipeline": {
                "work_dir": str(tmp / "work"),
                "storage": "s3://lwq-test/ckpts",
                "s3_endpoint_url": s3,
                "create_bucket": True,
                "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "registry_name": "tiny-llama-lwq",
                "eval_data": str(tmp / "eval.txt"),
                **pipeline,
            },
        }
    )


def task_states(flow_run_id: str) -> dict[str, set[str]]:
    return {k: set(v) for k, v in task_state_list(flow_run_id).items()}


STAGES = ("calibrate", "sensitivity", "solve", "quantize-layer", "pack", "evaluate")


def task_state_list(flow_run_id: str) -> dict[str, list[str]]:
    """Task name -> the final state names of its runs, for one flow run.

    Task runs reach the API through events, a moment after the flow returns:
    read until every stage has a run and every run a final state.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final = {"Completed", "Cached", "Failed", "Crashed"}
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        out: dict[str, list[str]] = {}
        for r in runs:
            base = r.name.rsplit("-", 1)[0]
            out.setdefault(base, []).append(str(r.state.name) if r.state else "?")
        settled = all(s in final for states in out.values() for s in states)
        if (settled and all(stage in out for stage in STAGES)) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def test_flow_stores_registers_and_reruns_from_cache(
    tiny_llama: Path, tmp_path: Path, s3_endpoint: str, mlflow_server: str
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.compress import run

    cfg = _config(tiny_llama, tmp_path, s3_endpoint, tracking_uri=mlflow_server)
    (first,) = run(cfg)
    reg = first.registered
    assert reg.new and reg.version == "1" and set(reg.aliases) == {"candidate", "champion"}
    assert abs(first.report.bits - 2.7) <= 0.02

    # The bucket holds every file with its SHA-256, and the manifest.
    manifest = read_manifest(Path(first.checkpoint))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = first.uri.removeprefix("s3://lwq-test/")
    for name, meta in manifest.files.items():
        head = s3.head_object(Bucket="lwq-test", Key=f"{prefix}/{name}")
        assert head["Metadata"]["sha256"] == meta.sha256
    assert s3.head_object(Bucket="lwq-test", Key=f"{prefix}/lwq_manifest.json")

    # MLflow: metrics, params, tags, artifacts, and a loadable registered model.
    assert cfg.pipeline.tracking_uri is not None
    mlflow.set_tracking_uri(cfg.pipeline.tracking_uri)
    client = MlflowClient()
    run_data = client.get_run(reg.run_id).data
    assert run_data.metrics["perplexity"] == pytest.approx(first.report.perplexity)
    assert run_data.metrics["bits"] == pytest.approx(first.report.bits)
    assert run_data.params["method.budget"] == "2.7"
    assert run_data.tags["lwq.checkpoint_uri"] == first.uri
    artifacts = {a.path for a in client.list_artifacts(reg.run_id)}
    assert {
        "allocation.csv",
        "allocation.png",
        "eval_report.json",
        "lwq_manifest.json",
    } <= artifacts
    # The server keeps its artifacts in its own bucket of the same endpoint.
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts")
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{reg.run_id}/artifacts/allocation.csv") for k in keys), keys[:20]
    assert any(k.endswith("pointer.json") for k in keys), keys[:20]
    nested = client.search_runs(
        [client.get_run(reg.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{reg.run_id}'",
    )
    assert {r.info.run_name for r in nested} >= {"calibrate", "sensitivity", "quantize"}
    model = mlflow.pyfunc.load_model("models:/tiny-llama-lwq@candidate")
    text = (tmp_path / "eval.txt").read_text(encoding="utf-8")
    # The served perplexity also scores the last, shorter window (the evaluation drops it).
    local, tok, _ = load_quantized(Path(first.checkpoint))
    expected = text_perplexity(local, tok, text, context_window(local.config)).perplexity
    assert model.predict([text])[0] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(first.report.perplexity, rel=0.05)

    # Rerun: every stage from the cache, no second version.
    (again,) = run(cfg)
    assert not again.registered.new and again.registered.version == "1"
    states = task_states(again.flow_run_id)
    for stage in ("calibrate", "sensitivity", "solve", "quantize-layer", "pack", "evaluate"):
        assert states[stage] == {"Cached"}, (stage, states)
    assert len(client.search_model_versions("name='tiny-llama-lwq'")) == 1

    # A new budget: calibration and sensitivity cached, the rest recomputed.
    (other,) = run(
        _config(tiny_llama, tmp_path, s3_endpoint, budget=2.9, tracking_uri=mlflow_server)
    )
    states = task_states(other.flow_run_id)
    assert states["calibrate"] == {"Cached"} and states["sensitivity"] == {"Cached"}
    assert states["solve"] == {"Completed"}
    assert other.registered.version == "2" and "candidate" in other.registered.aliases
    assert len(client.search_model_versions("name='tiny-llama-lwq'")) == 2


def test_killed_run_resumes_from_its_finished_layers(
    tiny_llama: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    """SIGKILL the flow process mid-quantization; the same command finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from mlflow.tracking import MlflowClient

    from flows.compress import run

    cfg = _config(tiny_llama, tmp_path, s3_endpoint)
    # Learned clipping with many steps makes each layer take long enough to be killed.
    method = cfg.method.model_copy(update={"hi_refine": "lwc", "lwc_steps": 3000})
    cfg = cfg.model_copy(update={"method": method})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cli", "run", "--config", str(tmp_path / "run.yaml"), "-q"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    layers = tmp_path / "work" / "layers"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if layers.is_dir() and len(list(layers.glob("*.safetensors"))) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the flow ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(list(layers.glob("*.safetensors")))
    assert 3 <= done_before < 14

    (res,) = run(cfg)
    states = task_state_list(res.flow_run_id)
    assert states["calibrate"] == ["Cached"] and states["sensitivity"] == ["Cached"]
    assert states["quantize-layer"].count("Cached") >= done_before - 1
    assert states["quantize-layer"].count("Completed") >= 1
    client = MlflowClient(tracking_uri=cfg.pipeline.tracking_uri)
    assert len(client.search_model_versions("name='tiny-llama-lwq'")) == 1
    assert res.registered.new and res.registered.version == "1"


def test_s3_down_during_upload_fails_clearly_and_registers_nothing(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint stops after the first object: retries, then a clear error."""
    from conftest import free_port
    from mlflow.tracking import MlflowClient
    from moto.server import ThreadedMotoServer

    import tasks.storage as storage
    from flows.compress import run

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-shown")
    real_put = storage.S3Store.put
    calls: list[str] = []

    def put_then_stop(self: storage.S3Store, local: Path, key: str, sha: str) -> Any:
        calls.append(key)
        if len(calls) == 2:
            server.stop()
        return real_put(self, local, key, sha)

    monkeypatch.setattr(storage.S3Store, "put", put_then_stop)
    cfg = _config(tiny_llama, tmp_path, endpoint)
    try:
        with pytest.raises(storage.StorageError, match=rf"127\.0\.0\.1:{port}") as err:
            run(cfg)
    finally:
        server.stop()
    assert "secret-never-shown" not in str(err.value)
    client = MlflowClient(tracking_uri=cfg.pipeline.tracking_uri)
    assert client.search_registered_models() == []
    # The local checkpoint is complete and verifies.
    (ckpt,) = (tmp_path / "work" / "checkpoints").iterdir()
    assert read_manifest(ckpt).bits.from_bytes > 0


def test_tracking_server_stopped_keeps_the_checkpoint_and_the_next_run_registers_it(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server` stops mid-run; restarted, the same command registers."""
    from conftest import MlflowServer
    from mlflow.tracking import MlflowClient

    import tasks.storage as storage
    from flows.compress import run
    from tasks.tracking import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path / "mlflow", str(tmp_path / "mlflow" / "artifacts"))
    server.start()
    try:
        real_put = storage.LocalStore.put

        def stop_then_put(self: storage.LocalStore, local: Path, key: str, sha: str) -> Any:
            server.stop()  # during the upload, after every stage has computed
            return real_put(self, local, key, sha)

        cfg = _config(tiny_llama, tmp_path, "unused", storage=None, tracking_uri=server.uri)
        with monkeypatch.context() as m:
            m.setattr(storage.LocalStore, "put", stop_then_put)
            with pytest.raises(TrackingError, match=rf"{server.uri}.*pipeline\.tracking_uri"):
                run(cfg)
        (ckpt,) = (tmp_path / "work" / "checkpoints").iterdir()
        read_manifest(ckpt)  # kept, and intact
        server.start()  # the same port and stores
        (res,) = run(cfg)
        states = task_states(res.flow_run_id)
        for stage in STAGES:
            assert states[stage] == {"Cached"}, (stage, states)
        assert res.registered.new and res.registered.version == "1"
        client = MlflowClient(tracking_uri=server.uri)
        assert len(client.search_model_versions("name='tiny-llama-lwq'")) == 1
        assert client.get_run(res.registered.run_id).data.metrics["perplexity"] == pytest.approx(
            res.report.perplexity
        )
    finally:
        server.stop()
    # A run leaves the user's MLFLOW_TRACKING_URI as it was (a later run must not
    # inherit this, now stopped, server).
    assert os.environ.get("MLFLOW_TRACKING_URI") != server.uri


def test_lwq_run_prints_where_what_and_how_well(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    calib = str(ZOO / "data" / "calibration.txt")
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    args = ["run", "--model", str(tiny_llama), "--calib", calib, "--n-samples", "4"]
    args += ["--profile-samples", "8", "--profile-seq-len", "16"]
    args += ["--seq-len", "32", "--group-size", "32", "--data", str(tmp_path / "eval.txt")]
    args += ["--work-dir", str(tmp_path / "work"), "-q"]
    assert main([*args, "--bits", "2.6,2.8"]) == 0
    out = capsys.readouterr().out
    store = tmp_path / "work" / "store" / "tiny-llama"
    assert out.count(f"checkpoint {store}") == 2
    assert "registered lwq-tiny-llama version 1 (candidate, champion)" in out
    assert "registered lwq-tiny-llama version 2" in out
    assert re.search(r"bits 2\.\d{4} \(from bytes\), perplexity \d+\.\d{3}", out), out
    # A bad setting fails before anything runs, naming the setting.
    assert main([*args, "--bits", "2.6", "--storage", "s3://"]) == 2
    assert "pipeline.storage" in capsys.readouterr().err


def test_dask_runner_gives_the_same_checkpoint_bytes(tiny_llama: Path, tmp_path: Path) -> None:
    """A real `prefect server` and a 2-worker LocalCluster on loopback."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import yaml
    from conftest import free_port

    from flows.compress import run

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not start"
                assert server.poll() is None, "prefect server exited"
                time.sleep(1)
        cfg = _config(tiny_llama, tmp_path, "unused", storage=None, task_runner="dask")
        cfg = cfg.model_copy(
            update={
                "pipeline": cfg.pipeline.model_copy(update={"work_dir": str(tmp_path / "dask")})
            }
        )
        (tmp_path / "dask.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        cmd = [
            sys.executable,
            "-m",
            "cli",
            "run",
            "--config",
            str(tmp_path / "dask.yaml"),
            "-q",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "registered tiny-llama-lwq version 1" in proc.stdout
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    local_cfg = _config(tiny_llama, tmp_path, "unused", storage=None)
    local_cfg = local_cfg.model_copy(
        update={
            "pipeline": local_cfg.pipeline.model_copy(
                update={
                    "work_dir": str(tmp_path / "local"),
                    "tracking_uri": f"sqlite:///{tmp_path}/l.db",
                }
            )
        }
    )
    (res,) = run(local_cfg)
    (dask_ckpt,) = (tmp_path / "dask" / "checkpoints").iterdir()
    a = json.loads((dask_ckpt / "lwq_manifest.json").read_text())["files"]
    b = json.loads((Path(res.checkpoint) / "lwq_manifest.json").read_text())["files"]
    assert a == b  # every file, byte for byte (SHA-256)


SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def _tree(root: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        out.update(str(Path(dirpath, f).relative_to(root)) for f in filenames)
    return out


def test_a_run_from_the_repository_leaves_no_file_in_it(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's default artifact root is ./mlruns of the working directory: a run
    with the default (local) tracking store keeps its artifacts in the work folder."""
    from conftest import REPO

    from flows.compress import run

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _tree(REPO)
    cfg = _config(tiny_llama, tmp_path, "unused", storage=None, tracking_uri=None)
    (res,) = run(cfg)
    assert res.registered.new
    assert _tree(REPO) == before
    artifacts = tmp_path / "work" / "mlartifacts"
    assert any(p.name == "MLmodel" for p in artifacts.rglob("*")), artifacts


def test_uniform_methods_run_through_the_same_stages(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lwq run --method gptq|rtn`: one flow run per width, Hessians shared, each registered;
    the checkpoint equals `lwq quantize --mode parallel`'s on the same calibration."""
    from cli.main import main

    calib = str(ZOO / "data" / "calibration.txt")
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    common = ["--model", str(tiny_llama), "--calib", calib, "--n-samples", "4"]
    common += ["--seq-len", "32", "--group-size", "32", "-q"]
    args = ["run", *common, "--data", str(tmp_path / "eval.txt")]
    args += ["--work-dir", str(tmp_path / "work")]
    assert main([*args, "--method", "gptq", "--bits", "4,3"]) == 0
    out = capsys.readouterr().out
    assert "gptq W4 g32: checkpoint" in out and "gptq W3 g32: checkpoint" in out
    assert "registered lwq-tiny-llama version 1 (candidate, champion)" in out
    assert "registered lwq-tiny-llama version 2 (candidate" in out
    assert "predicted KL" not in out
    # The second width reused the calibration and the Hessians.
    assert re.search(r"cache: calibrate cached, hessians cached, quantize-uniform-layer 0/", out)
    rtn = ["run", "--model", str(tiny_llama), "--group-size", "32", "-q"]
    rtn += ["--data", str(tmp_path / "eval.txt"), "--work-dir", str(tmp_path / "work")]
    assert main([*rtn, "--method", "rtn", "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "rtn W4 g32: checkpoint" in out and "version 3" in out
    assert "calibrate" not in out.split("cache:")[1]  # RTN reads no calibration
    # A rerun registers nothing.
    assert main([*args, "--method", "gptq", "--bits", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"version 2 \([a-z, ]*already registered\)", out), out

    assert (
        main(
            [
                "quantize",
                *common,
                "--method",
                "gptq",
                "--bits",
                "3",
                "--mode",
                "parallel",
                "--out",
                str(tmp_path / "lib"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    stored = sorted((tmp_path / "work" / "checkpoints").iterdir())
    lib, _, _ = load_quantized(tmp_path / "lib")
    matches = 0
    for ckpt in stored:
        flow_model, _, manifest = load_quantized(ckpt)
        if manifest.quantization.settings["quant"]["bits"] != 3:
            continue
        if manifest.quantization.method != "gptq":
            continue
        for (name, a), (_, b) in zip(
            flow_model.state_dict().items(), lib.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
        matches += 1
    assert matches == 1

    # A fractional width is refused before anything runs, naming the method.
    assert main([*args, "--method", "gptq", "--bits", "3.5"]) == 2
    assert "--method lwq" in capsys.readouterr().err


def test_each_layer_on_its_own_base_through_the_workflow(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lwq run --bases 2,3`: the layer tasks take each layer's base, and the checkpoint
    has the bytes of `lwq quantize --mode parallel --bases 2,3` on the same calibration."""
    from cli.main import main

    calib = str(ZOO / "data" / "calibration.txt")
    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    common = ["--model", str(tiny_llama), "--calib", calib, "--n-samples", "4"]
    common += ["--profile-samples", "8", "--profile-seq-len", "16", "--bases", "2,3"]
    common += ["--seq-len", "32", "--group-size", "32", "--bits", "3.0", "-q"]
    run = ["run", *common, "--data", str(tmp_path / "eval.txt")]
    assert main([*run, "--work-dir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "registered lwq-tiny-llama version 1" in out
    lib = ["quantize", *common, "--method", "lwq", "--mode", "parallel"]
    assert main([*lib, "--out", str(tmp_path / "lib")]) == 0
    capsys.readouterr()
    (ckpt,) = sorted((tmp_path / "work" / "store" / "tiny-llama").iterdir())
    flow, lib_m = read_manifest(ckpt), read_manifest(tmp_path / "lib")
    assert {x.lo.bits for x in flow.layers.values()} == {2, 3}
    assert flow.files == lib_m.files  # same bytes, file by file
