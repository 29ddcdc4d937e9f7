"""``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` as an ``lwq.sources`` source.

Declared under the entry-point group ``lwq.sources`` (pyproject.toml), so
``lwq.load("models:/NAME@champion")`` and ``lwq serve`` read registered
checkpoints without the library importing MLflow. The tracking server is
MLFLOW_TRACKING_URI's. A version's pyfunc holds only a pointer (store, key,
manifest SHA-256); the packed files come from the store, verified, into a
cache folder keyed by the manifest's hash.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lwq.errors import ConfigError, LwqError

PREFIX = "models:/"


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    ref = uri.removeprefix(PREFIX)
    name, _, version = ref.partition("/")
    name, _, alias = name.partition("@")
    if not uri.startswith(PREFIX) or not name or bool(version) == bool(alias):
        raise ConfigError(f"{uri!r}: give models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version or None, alias or None


def _tracking() -> str:
    """MLflow's tracking URI: ``mlflow.set_tracking_uri``'s, else MLFLOW_TRACKING_URI's."""
    import mlflow

    return str(mlflow.get_tracking_uri())


def model_version(uri: str, tracking_uri: str | None = None) -> Any:
    """The registry's ModelVersion that ``uri`` names now (``latest``: the newest version)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, version, alias = parse(uri)
    where = tracking_uri or _tracking()
    client = MlflowClient(tracking_uri=where)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":  # what a missed delivery registered
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ConfigError(f"{uri}: {name} has no versions in the registry at {where}")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, str(version))
    except ConfigError:
        raise
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError(
                f"{uri}: not in the registry at {where} ({str(err)[:160]}); check the "
                "name, version or alias, or MLFLOW_TRACKING_URI"
            ) from err
        raise LwqError(
            f"the MLflow registry at {where} did not answer ({str(err)[:160]}); "
            "start it or correct MLFLOW_TRACKING_URI"
        ) from err
    except Exception as err:  # requests' connection errors, after MLflow's retries
        raise LwqError(
            f"the MLflow registry at {where} did not answer ({type(err).__name__}); "
            "start it or correct MLFLOW_TRACKING_URI"
        ) from err


def checkpoint_from_pointer(pointer: dict[str, Any]) -> Path:
    """The packed checkpoint a registered version points at, in the local cache."""
    from tasks.storage import download_checkpoint, open_store

    store = open_store(pointer["store"], pointer.get("s3_endpoint_url"))
    cache = Path(tempfile.gettempdir()) / "lwq-models" / pointer["manifest_sha256"][:24]
    return download_checkpoint(store, pointer["key"], cache)


class RegistrySource:
    """The ``models`` scheme of ``lwq.sources``."""

    def pin(self, source: str) -> str:
        mv = model_version(source)
        return f"{PREFIX}{mv.name}/{mv.version}"

    def fetch(self, pinned: str) -> Path:
        import mlflow

        mv = model_version(pinned)
        if mv.tags.get("lwq.role") == "base":
            raise ConfigError(
                f"{pinned} is a base model (lwq register-base), not a packed checkpoint: "
                "compress it first (a manifest entry with model: " + pinned + ")"
            )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp)
            except Exception as err:
                raise LwqError(
                    f"{pinned}: its files could not be read from {_tracking()} ({err})"
                ) from err
            found = list(Path(local).rglob("pointer.json"))
            if not found:
                raise ConfigError(f"{pinned} was not registered by lwq run (no pointer.json)")
            pointer = json.loads(found[0].read_text(encoding="utf-8"))
        return checkpoint_from_pointer(pointer)


SOURCE = RegistrySource()
