"""MLflow: one parent run per flow run, nested runs per stage, the registered model.

The checkpoint is logged as a pyfunc model whose only artifact is a pointer
(checkpoint URI, S3 endpoint, manifest SHA-256); ``load_context`` fetches the
packed files from wherever they are stored, verifies them, and rebuilds the
quantized model. Every new version gets the alias ``candidate``; ``champion``
moves only when the new version has a lower perplexity at no more bits than
the current champion. A run fingerprint (model, calibration text, config) is a
tag of the version: a rerun of a finished run registers nothing new.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from prefect import task

from lwq.config import LwqConfig
from lwq.errors import ConfigError, LwqError
from lwq.pack.manifest import MANIFEST, Manifest
from tasks.stages import EvalReport, Fingerprint

CANDIDATE, CHAMPION = "candidate", "champion"


def pip_requirements() -> list[str]:
    """What a fresh environment needs to load the logged model: lwq at this version
    (it brings torch, transformers, boto3, mlflow) and pandas for the payloads."""
    import lwq

    return [f"lwq=={lwq.__version__}", "pandas"]


class TrackingError(LwqError):
    """The MLflow tracking server cannot be reached or refused the request."""


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    new: bool  # False: this fingerprint was already registered


class LwqCheckpointModel(PythonModel):  # type: ignore[misc]
    """A packed lwq checkpoint as an MLflow pyfunc: perplexity or generation per text.

    ``predict`` takes texts (a list, or a DataFrame of one text column, so every
    MLflow payload form works) and ``params``: ``task`` perplexity (default) or
    generate, with ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``
    and ``seed``. Texts of any length are scored.
    """

    def load_context(self, context: Any) -> None:
        from lwq.pack.checkpoint import load_quantized
        from lwq.serving import Predictor
        from tasks.registry import checkpoint_from_pointer

        pointer = json.loads(Path(context.artifacts["pointer"]).read_text(encoding="utf-8"))
        ckpt = checkpoint_from_pointer(pointer)
        self.model, self.tokenizer, self.manifest = load_quantized(ckpt, packed_modules=True)
        self.predictor = Predictor(self.model, self.tokenizer)

    # No type hints on predict: a hinted input would restrict the served payloads to
    # {"inputs": ...}; MLflow's dataframe forms arrive as a DataFrame.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from lwq.serving import as_texts, generation_params

        data: Any = model_input
        if hasattr(data, "columns"):  # a DataFrame: its text column, or its only column
            column = "text" if "text" in data.columns else data.columns[0]
            data = list(data[column])
        texts = as_texts(data if isinstance(data, list) else list(data), "input")
        params = dict(params or {})
        task = params.pop("task", "perplexity")
        return self.predictor.predict(str(task), texts, generation_params(params))


# The params a served pyfunc accepts (MLflow passes only those of the signature).
PREDICT_PARAMS = {
    "task": "perplexity",
    "max_new_tokens": 32,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": 0,
}


def tracking_uri(config: LwqConfig) -> str:
    p = config.pipeline
    if p.tracking_uri:
        return p.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(p.work_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def registry_name(config: LwqConfig) -> str:
    return config.pipeline.registry_name or f"lwq-{Path(str(config.model)).name}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _client(config: LwqConfig) -> Any:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: keep the user's
    # variable as it was, or the next run in this process would inherit this URI.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    return MlflowClient(tracking_uri=uri)


def _wrap(err: Exception, config: LwqConfig) -> TrackingError:
    return TrackingError(
        f"MLflow at {tracking_uri(config)} failed ({type(err).__name__}: "
        f"{str(err)[:200]}); check pipeline.tracking_uri or MLFLOW_TRACKING_URI"
    )


def find_registered(config: LwqConfig, fp: Fingerprint) -> Registered | None:
    """The version this run fingerprint already registered, if any."""
    client = _client(config)
    name = registry_name(config)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err):
            return None
        raise _wrap(err, config) from err
    for v in versions:
        if v.tags.get("lwq.run_fingerprint") == fp.run:
            # search results may omit aliases: read the version itself
            full = client.get_model_version(name, v.version)
            aliases = tuple(getattr(full, "aliases", []) or [])
            return Registered(name, str(v.version), str(v.run_id), aliases, new=False)
    return None


def _check_base_model(client: Any, name: str, fp: Fingerprint, force: bool) -> None:
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return  # a new name
    base = model.tags.get("lwq.base_model_sha256")
    if base and base != fp.model_sha and not force:
        raise ConfigError(
            f"the registry name {name!r} holds versions of another base model "
            f"({base[:12]}...); choose another pipeline.registry_name or set "
            "pipeline.force_registry: true"
        )


def _experiment_id(client: Any, config: LwqConfig) -> str:
    """The experiment's id; a new one on a local store keeps its artifacts in the work folder.

    MLflow's default artifact root for a local backend is ``./mlruns`` of the
    working directory: a run would leave files wherever it was started.
    """
    name = config.pipeline.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if not tracking_uri(config).startswith(("http://", "https://", "databricks")):
        location = (Path(config.pipeline.work_dir).resolve() / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def _champion_moves(client: Any, name: str, report: EvalReport) -> bool:
    """A lower perplexity at no more bits than the champion (or no champion yet)."""
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return True
    run = client.get_run(champ.run_id)
    ppl, bits = run.data.metrics.get("perplexity"), run.data.metrics.get("bits")
    if report.perplexity is None or ppl is None or bits is None:
        return False
    return report.perplexity < ppl and report.bits <= bits + 1e-9


def _write_artifacts(
    tmp: Path, manifest: Manifest, report: EvalReport, ckpt: Path, method: str
) -> list[Path]:
    from lwq.plots import allocation_plot, pareto_plot

    (tmp / "eval_report.json").write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    files = [ckpt / MANIFEST, tmp / "eval_report.json"]
    alloc = manifest.allocation
    if alloc is not None:
        table = tmp / "allocation.csv"
        columns = ["name", "ratio", "n_hi", "bits_per_weight", "predicted_loss", "output_error"]
        with table.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for x in alloc.layers:
                w.writerow([getattr(x, c) for c in columns])
        names = [x.name for x in alloc.layers]
        ratios = [x.ratio for x in alloc.layers]
        label = f"{report.bits:.3f} bits"
        files += [table, allocation_plot(names, {label: ratios}, tmp / "allocation.png")]
    if report.perplexity is not None:
        files.append(
            pareto_plot(
                {method: [(report.bits, report.perplexity)]},
                tmp / "pareto.png",
                reference=report.perplexity_fp,
            )
        )
    return files


@task(name="register", retries=2, retry_delay_seconds=[2, 8])
def register(
    config: LwqConfig,
    fp: Fingerprint,
    ckpt: str,
    ckpt_uri: str,
    store_key: str,
    report: EvalReport,
    stage_seconds: dict[str, float],
    flow_run_id: str,
) -> Registered:
    """Track the run in MLflow and register its checkpoint (once per fingerprint)."""
    from lwq.pack.checkpoint import read_manifest

    done = find_registered(config, fp)
    if done is not None:
        if not done.aliases:  # killed before the alias was set
            _client(config).set_registered_model_alias(done.name, CANDIDATE, done.version)
        return done
    client = _client(config)
    name = registry_name(config)
    p = config.pipeline
    try:
        _check_base_model(client, name, fp, p.force_registry)
        mlflow.set_experiment(experiment_id=_experiment_id(client, config))
        manifest = read_manifest(Path(ckpt))
        tags = {
            "lwq.git_commit": git_commit(),
            "lwq.prefect_flow_run_id": flow_run_id,
            "lwq.checkpoint_uri": ckpt_uri,
            "lwq.base_model_sha256": fp.model_sha,
            "lwq.config_sha256": fp.config_sha,
            "lwq.code_version": fp.code_sha,
            "lwq.run_fingerprint": fp.run,
        }
        with mlflow.start_run(run_name=f"lwq-{fp.run}", tags=tags) as run:
            params = {k: str(v) for k, v in config.flat().items()}
            mlflow.log_params(params)
            for stage, secs in stage_seconds.items():
                with mlflow.start_run(run_name=stage, nested=True):
                    mlflow.log_metric("seconds", secs)
            metrics = {
                "bits": report.bits,
                "bits_cost_model": report.bits_model,
                **{f"seconds_{k}": v for k, v in stage_seconds.items()},
            }
            if report.predicted_kl == report.predicted_kl:  # NaN: no prediction (rtn, gptq)
                metrics["predicted_kl"] = report.predicted_kl
            if report.perplexity is not None:
                metrics["perplexity"] = report.perplexity
            if report.perplexity_fp is not None:
                metrics["perplexity_fp"] = report.perplexity_fp
            mlflow.log_metrics(metrics)
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir)
                for f in _write_artifacts(tmp, manifest, report, Path(ckpt), config.quant.method):
                    mlflow.log_artifact(str(f))
                pointer = tmp / "pointer.json"
                location = p.storage or str((Path(p.work_dir) / "store").resolve())
                pointer.write_text(
                    json.dumps(
                        {
                            "store": location,
                            "key": store_key,
                            "uri": ckpt_uri,
                            "s3_endpoint_url": p.s3_endpoint_url,
                            "manifest_sha256": _manifest_sha(Path(ckpt)),
                        }
                    ),
                    encoding="utf-8",
                )
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=LwqCheckpointModel(),
                    artifacts={"pointer": str(pointer)},
                    pip_requirements=pip_requirements(),
                    signature=infer_signature(["a text"], params=PREDICT_PARAMS),
                )
            # The version is created with its fingerprint tag in one call, so a
            # crash cannot leave a version that a rerun would not recognise.
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
            version = str(mv.version)
            client.set_registered_model_tag(name, "lwq.base_model_sha256", fp.model_sha)
            aliases = [CANDIDATE]
            client.set_registered_model_alias(name, CANDIDATE, version)
            if _champion_moves(client, name, report):
                client.set_registered_model_alias(name, CHAMPION, version)
                aliases.append(CHAMPION)
            return Registered(name, version, run.info.run_id, tuple(aliases), new=True)
    except (ConfigError, LwqError):
        raise
    except Exception as err:  # MLflow's own, requests', sqlalchemy's errors
        raise _wrap(err, config) from err


def _manifest_sha(ckpt: Path) -> str:
    from lwq.hashing import file_sha256

    return file_sha256(ckpt / MANIFEST)


def registered_metrics(config: LwqConfig, reg: Registered) -> dict[str, float]:
    """The metrics of the run that registered ``reg``."""
    try:
        return dict(_client(config).get_run(reg.run_id).data.metrics)
    except Exception as err:
        raise _wrap(err, config) from err


BASE_ROLE = "base"  # the lwq.role tag of a registered base model


def register_base(model_dir: Path, name: str, config: LwqConfig) -> Registered:
    """Log a Hugging Face model folder as a version of ``name`` (once per weights).

    The version's files are the folder itself (config, tokenizer, weights);
    ``fetch_base`` brings them back. Its tags say it is a base model and give
    the weights' SHA-256, so ``lwq`` never mistakes it for one of its own results.
    """
    from lwq.models import check_model_dir
    from lwq.pack.checkpoint import weights_sha256

    check_model_dir(model_dir, "DIR")
    sha = weights_sha256(model_dir)
    client = _client(config)
    tags = {"lwq.role": BASE_ROLE, "lwq.base_model_sha256": sha}
    try:
        try:
            model = client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            model = client.create_registered_model(name, tags={"lwq.role": BASE_ROLE})
        if model.tags.get("lwq.role") != BASE_ROLE:
            raise ConfigError(
                f"--name {name}: the registered model {name!r} is not a base model registered "
                "by lwq register-base (it has no lwq.role=base tag); choose another name"
            )
        for v in client.search_model_versions(f"name='{name}'"):
            if v.tags.get("lwq.base_model_sha256") == sha:
                return Registered(name, str(v.version), str(v.run_id), (), new=False)
        base = config.model_copy(
            update={"pipeline": config.pipeline.model_copy(update={"experiment": "lwq-bases"})}
        )
        mlflow.set_experiment(experiment_id=_experiment_id(client, base))
        with mlflow.start_run(run_name=f"base-{name}", tags=tags) as run:
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            source = f"{run.info.artifact_uri}/model"
        mv = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags)
        return Registered(name, str(mv.version), run.info.run_id, (), new=True)
    except (ConfigError, LwqError):
        raise
    except Exception as err:
        raise _wrap(err, config) from err


def fetch_base(spec: str, config: LwqConfig) -> Path:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` of a base model as a local
    folder under WORK_DIR/bases (downloaded once per version)."""
    from lwq.models import check_model_dir
    from tasks.registry import model_version

    mv = model_version(spec, tracking_uri(config))
    name = mv.name
    sha = mv.tags.get("lwq.base_model_sha256")
    if mv.tags.get("lwq.role") != BASE_ROLE or not sha:
        raise ConfigError(
            f"model {spec!r}: version {mv.version} is not a base model registered by "
            "lwq register-base (no lwq.role=base tag)"
        )
    out = Path(config.pipeline.work_dir).resolve() / "bases" / name / str(mv.version)
    done = out / ".lwq-base-sha256"
    if done.is_file() and done.read_text(encoding="utf-8") == sha:
        return out
    import shutil

    from lwq.pack.checkpoint import weights_sha256

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=tracking_uri(config)
        )
    except Exception as err:
        raise _wrap(err, config) from err
    got = tmp / Path(mv.source.rstrip("/")).name
    check_model_dir(got, "model")
    if weights_sha256(got) != sha:
        raise LwqError(f"model {spec!r}: the downloaded weights do not match their SHA-256 tag")
    shutil.rmtree(out, ignore_errors=True)
    got.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    done.write_text(sha, encoding="utf-8")
    return out
