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
