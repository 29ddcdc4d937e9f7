"""Consuming the registry: `lwq serve models:/NAME@champion`, `mlflow models serve` of the
pyfunc, and `lwq.load` in a fresh interpreter, against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ZOO, Process, free_port

from lwq.config import make_config

pytestmark = pytest.mark.usefixtures("prefect_server")

LONG = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:3000]


def _call(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _register_two(model: Path, tmp: Path, tracking: str, s3: str) -> None:
    """lwq-tiny-llama v1 (rtn W4, champion) and v2 (rtn W3, candidate)."""
    from flows.compress import run

    (tmp / "eval.txt").write_text(LONG, encoding="utf-8")
    for bits in (4, 3):
        cfg = make_config(
            {
                "model": str(model),
                "quant": {"method": "rtn", "bits": bits, "group_size": 32},
                "pipeline": {
                    "work_dir": str(tmp / "work"),
                    "storage": "s3://lwq-serve/ckpts",
                    "s3_endpoint_url": s3,
                    "create_bucket": True,
                    "tracking_uri": tracking,
                    "eval_data": str(tmp / "eval.txt"),
                },
            }
        )
        run(cfg)


def test_serving_a_registered_version_follows_the_champion(
    tiny_llama: Path, tmp_path: Path, mlflow_server: str, s3_endpoint: str
) -> None:
    from mlflow.tracking import MlflowClient

    _register_two(tiny_llama, tmp_path, mlflow_server, s3_endpoint)
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_model_version_by_alias("lwq-tiny-llama", "champion").version == "1"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serving = Process(tmp_path, "serve")
    cmd = [sys.executable, "-m", "cli", "serve", "models:/lwq-tiny-llama@champion"]
    t = time.monotonic()
    serving.launch([*cmd, "--port", str(port), "--reload-seconds", "1"], env, f"{url}/health")
    print(f"lwq serve answered after {time.monotonic() - t:.1f} s")
    try:
        assert _call(f"{url}/health")[1]["model"] == "models:/lwq-tiny-llama/1"
        status, gen = _call(f"{url}/generate", {"prompt": "The", "max_new_tokens": 5})
        assert status == 200 and gen["generations"][0]["new_tokens"] <= 5
        status, ppl = _call(f"{url}/perplexity", {"texts": ["a short one", LONG]})
        assert status == 200 and len(ppl["perplexities"]) == 2
        inv = {"dataframe_records": [{"text": "a short one"}, {"text": LONG}]}
        status, pred = _call(f"{url}/invocations", inv)
        assert status == 200
        assert pred["predictions"] == [p["perplexity"] for p in ppl["perplexities"]]
        assert _call(f"{url}/generate", {"prompt": "x", "max_new_tokens": -1})[0] == 400
        assert _call(f"{url}/perplexity", {"txt": "x"})[0] == 400

        # Moving the alias changes what is served, without a restart.
        client.set_registered_model_alias("lwq-tiny-llama", "champion", "2")
        deadline = time.monotonic() + 120
        while _call(f"{url}/health")[1]["model"] != "models:/lwq-tiny-llama/2":
            assert time.monotonic() < deadline, serving.tail()
            time.sleep(0.5)
        status, moved = _call(f"{url}/perplexity", {"texts": ["a short one", LONG]})
        assert status == 200 and moved["model"] == "models:/lwq-tiny-llama/2"
        assert moved["perplexities"] != ppl["perplexities"]
    finally:
        serving.stop()

    # lwq.load in a fresh interpreter, outside the repository: the entry point finds the
    # registry source.
    code = (
        "import lwq; m, t, man = lwq.load('models:/lwq-tiny-llama@champion'); "
        "print(man.quantization.method, man.layers[next(iter(man.layers))].lo.bits)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["rtn", "3"]


def test_the_pyfunc_through_mlflow_models_serve(
    tiny_llama: Path, tmp_path: Path, mlflow_server: str, s3_endpoint: str
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    try:
        client.get_registered_model("lwq-tiny-llama")
    except Exception:
        _register_two(tiny_llama, tmp_path, mlflow_server, s3_endpoint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",  # uvicorn
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve"]
    cmd += ["-m", "models:/lwq-tiny-llama/1", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    serving = Process(tmp_path, "mlflow-models-serve")
    serving.launch(cmd, env, f"{url}/ping", timeout=300)
    try:
        forms = [
            {"inputs": ["a short one", LONG]},
            {"instances": ["a short one", LONG]},
            {"dataframe_split": {"columns": ["text"], "data": [["a short one"], [LONG]]}},
            {"dataframe_records": [{"text": "a short one"}, {"text": LONG}]},
        ]
        answers = [_call(f"{url}/invocations", f) for f in forms]
        assert all(status == 200 for status, _ in answers), (answers, serving.tail())
        first = answers[0][1]["predictions"]
        assert len(first) == 2 and all(a["predictions"] == first for _, a in answers)
        gen = {"inputs": ["The"], "params": {"task": "generate", "max_new_tokens": 4}}
        status, answer = _call(f"{url}/invocations", gen)
        assert status == 200 and isinstance(answer["predictions"][0], str), answer
    finally:
        serving.stop()
