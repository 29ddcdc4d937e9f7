"""Registry events to compression runs: MLflow's webhook -> this receiver -> Prefect.

``setup_webhook`` creates (or updates) one MLflow webhook for the events
``model_version.created`` and ``model_version_alias.created``. The receiver
(``lwq trigger serve``) checks each delivery's HMAC signature and age, then
starts the deployment ``lwq-registered/NAME`` (served by ``lwq deploy``) for:

- a new version of a base model, i.e. tagged ``lwq.role=base`` (``lwq register-base``);
- the ``champion`` alias moved on a watched name (``--watch``).

It ignores everything else, including the versions and aliases that ``lwq``
registers itself (compressed versions carry ``lwq.run_fingerprint``; their
names are not watched). The run's idempotency key is the base's name and
version: a repeated delivery, or a version both created and made champion,
starts one run. A delivery sent while the receiver is down is lost; the
scheduled manifest run catches up when the manifest lists the base as
``models:/NAME/latest`` or ``models:/NAME@champion``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lwq.errors import ConfigError, LwqError

log = logging.getLogger(__name__)

EVENTS: list[Any] = ["model_version.created", "model_version_alias.created"]
SECRET_ENV = "LWQ_WEBHOOK_SECRET"
MAX_AGE_SECONDS = 300  # older deliveries are refused: a replayed request is stale
CHAMPION = "champion"
REGISTERED_FLOW = "lwq-registered"


def secret_from_env() -> str:
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise ConfigError(
            f"set {SECRET_ENV} to the webhook's shared secret (at least 16 characters), "
            "the same for lwq trigger setup and lwq trigger serve"
        )
    return secret


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's ``X-MLflow-Signature``: v1,base64(HMAC-SHA256(id.timestamp.body))."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_delivery(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> str | None:
    """Why the delivery is refused (None: it is authentic and fresh)."""
    h = {k.lower(): v for k, v in headers.items()}
    delivery, stamp, sig = (
        h.get("x-mlflow-delivery-id"),
        h.get("x-mlflow-timestamp"),
        h.get("x-mlflow-signature"),
    )
    if not (delivery and stamp and sig):
        return "missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature"
    try:
        age = (time.time() if now is None else now) - int(stamp)
    except ValueError:
        return "X-MLflow-Timestamp is not a Unix time"
    if abs(age) > MAX_AGE_SECONDS:
        return f"stale delivery: sent {age:.0f} s ago (at most {MAX_AGE_SECONDS} s)"
    if not hmac.compare_digest(signature(secret, delivery, stamp, body), sig):
        return "wrong signature"
    return None


@dataclass(frozen=True)
class Decision:
    model: str | None  # models:/NAME/VERSION to compress, or None
    reason: str


def decide(event: Any, watched: frozenset[str]) -> Decision:
    """What a (verified) delivery asks for."""
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return Decision(None, "not an MLflow webhook event")
    kind, data = f"{event.get('entity')}.{event.get('action')}", event["data"]
    name, version = data.get("name"), data.get("version")
    if kind == "model_version.created":
        tags = data.get("tags") or {}
        if "lwq.run_fingerprint" in tags:
            return Decision(None, f"{name} v{version} is lwq's own result")
        if tags.get("lwq.role") != "base":
            return Decision(None, f"{name} v{version} is not a base model (no lwq.role=base)")
        return Decision(f"models:/{name}/{version}", f"base model {name} v{version} registered")
    if kind == "model_version_alias.created":
        if data.get("alias") != CHAMPION or name not in watched:
            return Decision(None, f"alias {data.get('alias')} on {name}: not a watched champion")
        return Decision(f"models:/{name}/{version}", f"{CHAMPION} of {name} moved to v{version}")
    return Decision(None, f"event {kind} is not one lwq acts on")


Starter = Callable[[str, str], str]  # (models:/NAME/VERSION, idempotency key) -> flow run id


def prefect_starter(deployment: str) -> Starter:
    """Start ``deployment`` with the model as its parameter, once per key."""

    def start(model: str, key: str) -> str:
        from prefect.deployments import run_deployment

        run: Any = run_deployment(
            deployment, parameters={"model": model}, idempotency_key=key, timeout=0
        )
        return str(run.id)

    return start


class Receiver:
    """The webhook endpoint: POST /hook; GET /health."""

    def __init__(self, secret: str, watched: frozenset[str], start: Starter) -> None:
        self.secret, self.watched, self.start = secret, watched, start

    def handle(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        path = path.split("?")[0].rstrip("/")
        if path == "/health" and method == "GET":
            return 200, {"status": "ok", "watched": sorted(self.watched)}
        if path != "/hook" or method != "POST":
            return 404, {"error": "POST /hook (MLflow webhook deliveries), GET /health"}
        refused = check_delivery(self.secret, headers or {}, body)
        if refused is not None:
            log.warning("refused a delivery: %s", refused)
            return 401, {"error": refused}
        try:
            event = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return 400, {"error": f"the body is not JSON: {err}"}
        decision = decide(event, self.watched)
        if decision.model is None:
            log.info("ignored: %s", decision.reason)
            return 200, {"started": None, "reason": decision.reason}
        key = "lwq:" + decision.model.removeprefix("models:/")
        try:
            run_id = self.start(decision.model, key)
        except Exception as err:  # Prefect down: MLflow may retry the delivery
            log.exception("could not start a run for %s", decision.model)
            return 503, {"error": f"could not start the run ({type(err).__name__}: {err})"}
        log.info("%s: flow run %s (key %s)", decision.reason, run_id, key)
        return 200, {"started": run_id, "model": decision.model, "reason": decision.reason}


def setup_webhook(tracking_uri: str, url: str, secret: str, name: str) -> tuple[Any, bool]:
    """The webhook ``name`` delivering EVENTS to ``url``: created, or updated in place.

    Webhook names are not unique in MLflow: the first one with this name is
    updated and any other with the same name is deleted, so running setup
    twice leaves one webhook.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        mine, token = [], None
        while True:
            page = client.list_webhooks(page_token=token)
            mine += [w for w in page if w.name == name]
            token = page.token
            if not token:
                break
        if mine:
            for extra in mine[1:]:
                client.delete_webhook(extra.webhook_id)
            hook = client.update_webhook(
                mine[0].webhook_id, url=url, events=EVENTS, secret=secret, status="ACTIVE"
            )
            return hook, False
        hook = client.create_webhook(
            name, url, EVENTS, description="lwq: registry events to compression runs", secret=secret
        )
        return hook, True
    except Exception as err:
        raise LwqError(
            f"MLflow at {tracking_uri} refused the webhook ({type(err).__name__}: "
            f"{str(err)[:200]}); webhooks need an MLflow tracking server with a SQL backend "
            "(MLFLOW_TRACKING_URI=http://...), started with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY "
            "set (see infra/compose.yaml)"
        ) from err
