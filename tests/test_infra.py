"""What can be checked of infra/ without a container engine: the compose file's shape."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_compose_services_ports_and_variables() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect", "buckets"} <= set(services)
    # Published ports are on loopback only.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    mlflow = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in mlflow and "s3://" in mlflow
    assert (
        "postgresql+asyncpg://"
        in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    # Every ${VAR} the file uses has an example value; no secret is written inline.
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))
    example = dict(
        line.split("=", 1)
        for line in (INFRA / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    assert "change-me" not in text
    # The init script creates the databases the services connect to.
    init = (INFRA / "postgres-init.sql").read_text()
    for var in ("MLFLOW_DB", "PREFECT_DB"):
        assert f"CREATE DATABASE {example[var]};" in init


def test_operations_services_and_deployments() -> None:
    """The worker, the receiver and the deployments they run exist and fit together."""
    import importlib

    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"deployments", "worker", "receiver"} <= set(services)
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == "${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY}"
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert "--limit 1" in services["worker"]["command"]
    assert services["worker"]["stop_signal"] == "SIGINT"  # a worker ignores SIGTERM
    assert "lwq trigger serve" in services["receiver"]["command"]
    deploy = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    names = {d["name"] for d in deploy["deployments"]}
    assert "--deployment team" in services["receiver"]["command"] and names == {"team"}
    for d in deploy["deployments"]:
        path, _, fn = d["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, fn)
        assert d["work_pool"]["name"] == "lwq" and set(d["parameters"]) <= set(
            flow.parameters.properties
        )
    scheduled = [d for d in deploy["deployments"] if d.get("schedules")]
    assert scheduled[0]["concurrency_limit"]["limit"] == 1
    assert "torch==2.13.0" in (INFRA / "Dockerfile").read_text()


def test_the_example_manifest_is_valid() -> None:
    from lwq.zoofile import load_manifest

    jobs = load_manifest(INFRA / "zoo.example.yaml")
    assert [j.label for j in jobs] == [
        "llama-6l-128d lwq",
        "llama-6l-128d gptq",
        "gpt2-6l-128d rtn",
    ]
    assert all(Path(j.config.pipeline.work_dir) == INFRA.parent / ".lwq" for j in jobs)
