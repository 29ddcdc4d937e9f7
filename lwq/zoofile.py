"""A zoo manifest: which models to compress, with which method, at which widths.

A YAML file with ``defaults`` and ``entries``::

    zoo: zoo                      # folder of zoo models named by bare name (default ./zoo)
    defaults:                     # any entry key but name and model
      method: lwq
      bits: [2.5, 3.0]
      config: {calib: {n_samples: 32}, pipeline: {work_dir: .lwq}}
    entries:
      - model: llama-6l-128d      # a zoo name, a folder, a .gguf, a real model name,
                                  # or models:/NAME/VERSION of a registered base model
      - model: llama-6l-128d
        method: gptq
        bits: 3
        registry_name: lwq-llama-6l-128d

``config`` holds any setting of the configuration file (``LwqConfig``); an
entry's ``config`` is merged into the defaults' key by key, and a key set to
null there drops the defaults' value (``method: null`` for a gptq entry). Relative paths are
relative to the manifest's folder. Everything is checked before any work
starts, and every problem of every entry is reported at once, naming the entry
and the key: unknown keys, bad values, a missing model, and a budget the
method's grids cannot reach.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lwq.config import LwqConfig, read_yaml_mapping, resolve_inputs, with_overrides
from lwq.errors import ConfigError, LwqError

REGISTERED_PREFIX = "models:/"
Resolver = Callable[[str, LwqConfig], Path]  # models:/... -> a local model folder
Method = Literal["rtn", "gptq", "lwq"]


class _Keys(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method | None = None
    bits: float | list[float] | None = None
    registry_name: str | None = None
    config: dict[str, Any] = {}


class Defaults(_Keys):
    """Keys every entry inherits."""


class Entry(_Keys):
    name: str | None = None  # a label for the summary (default: model and method)
    model: str


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zoo: str = "zoo"
    defaults: Defaults = Defaults()
    entries: list[Any]


@dataclass(frozen=True)
class Job:
    """One entry, checked: its configuration (model resolved) and its widths."""

    label: str
    config: LwqConfig
    budgets: list[float]
    source: str  # the model as the manifest names it


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` into ``base`` key by key; a None in ``over`` removes the key (its default)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


PATH_SETTINGS = (
    ("calib", "source"),
    ("pipeline", "work_dir"),
    ("pipeline", "eval_data"),
    ("pipeline", "storage"),
)


def _anchored(data: dict[str, Any], here: Path) -> dict[str, Any]:
    """Relative paths of the settings taken relative to the manifest's folder."""
    out = dict(data)
    for section, key in PATH_SETTINGS:
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            out[section] = {**node, key: os.path.normpath(here / Path(value).expanduser())}  # type: ignore[dict-item]
    return out


def _pydantic_problems(err: ValidationError, prefix: str = "") -> str:
    out = []
    for e in err.errors():
        where = prefix + ".".join(str(x) for x in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        out.append(f"{where}: {msg}" if e["loc"] else msg)
    return "; ".join(out)


def check_run(config: LwqConfig, budgets: list[float] | None) -> LwqConfig:
    """``config`` ready for the workflow, or a ConfigError before any work.

    Settings the workflow would ignore are refused, the model is resolved to a
    local folder (a zoo model gets its calibration and validation texts), rtn
    and gptq take whole widths, and a budget the method's grids cannot reach is
    refused (the method's base width is fixed for the budgets).
    """
    from lwq.quantize import check_budgets

    config.check_for("run")
    config = resolve_inputs(config, evaluation=True)
    config.require("model", *(["calib.source"] if config.quant.method != "rtn" else []))
    if config.quant.method != "lwq":
        for b in budgets or []:
            uniform_width(config, b)
    elif config.model is not None:
        config = check_budgets(Path(config.model), config, budgets or [config.method.budget])
    return config


def uniform_width(config: LwqConfig, bits: float) -> LwqConfig:
    """``config`` at quant.bits = ``bits``, validated (rtn and gptq take whole widths)."""
    if not float(bits).is_integer():
        raise ConfigError(
            f"--bits {bits:g}: rtn and gptq take whole bits (2, 3, 4, 8); "
            "a fractional budget needs --method lwq"
        )
    return with_overrides(config, {"quant.bits": int(bits)})


def _model_path(spec: str, here: Path, zoo: Path) -> str:
    """A manifest's model as ``lwq.config`` takes it: zoo names and relative paths resolved."""
    from lwq.realmodels import REAL_MODELS

    if spec.startswith(REGISTERED_PREFIX) or spec in REAL_MODELS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(os.path.normpath(here / path))
    if not path.exists() and "/" not in spec and (zoo / spec).is_dir():
        return str(zoo / spec)
    if not path.exists():
        raise ConfigError(
            f"no such model folder or file {str(path)!r} (nor a zoo model in {zoo}, "
            f"nor a real model: {', '.join(sorted(REAL_MODELS))})"
        )
    return str(path)


def _job(
    raw: Any,
    defaults: Defaults,
    here: Path,
    zoo: Path,
    resolve: Resolver | None,
) -> Job:
    """Entry ``i`` checked, or a ConfigError listing its problems (without the entry's name)."""
    if not isinstance(raw, dict):
        raise ConfigError("an entry is a mapping of keys (model, method, bits, ...)")
    try:
        entry = Entry.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_pydantic_problems(err)) from err
    method = entry.method or defaults.method or "lwq"
    bits = entry.bits if entry.bits is not None else defaults.bits
    budgets = None if bits is None else (bits if isinstance(bits, list) else [bits])
    if budgets is not None and (not budgets or any(b <= 0 for b in budgets)):
        raise ConfigError(f"bits: give positive widths, not {bits!r}")
    if method != "lwq" and any(not float(b).is_integer() for b in budgets or []):
        raise ConfigError(
            f"bits {bits!r}: {method} takes whole widths (2, 3, 4, 8); "
            "a fractional budget needs method: lwq"
        )
    model = _model_path(entry.model, here, zoo)
    data = _anchored(_merge(defaults.config, entry.config), here)
    for key in ("model", "out"):
        if key in data:
            raise ConfigError(f"config.{key}: set the entry's model key instead")
    registry = entry.registry_name or defaults.registry_name
    registered = model.startswith(REGISTERED_PREFIX)
    if registered and registry is None:  # the base's name, not its download folder's
        registry = "lwq-" + model[len(REGISTERED_PREFIX) :].split("/")[0].split("@")[0]
    pipeline: dict[str, Any] = {"registry_name": registry}
    given = data.get("pipeline")
    if registered and not (isinstance(given, dict) and "force_registry" in given):
        # lwq-NAME holds the results of every version of the base NAME, whose weights differ
        # from version to version: the guard against mixing base models would refuse them.
        pipeline["force_registry"] = True
    data = _merge(data, {"quant": {"method": method}, "pipeline": pipeline})
    try:
        config = LwqConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_pydantic_problems(err, "config.")) from err
    if registered:
        if resolve is None:
            raise ConfigError(f"model: {model} needs the registry (lwq run --manifest)")
        model = str(resolve(model, config))
    config = with_overrides(config, {"model": model})
    config = check_run(config, budgets)
    if budgets is None:
        budgets = [config.method.budget if method == "lwq" else float(config.quant.bits)]
    label = entry.name or f"{entry.model if registered else Path(entry.model).name} {method}"
    return Job(label, config, [float(b) for b in budgets], entry.model)


def _read(path: Path) -> tuple[_File, Path, Path]:
    """The manifest file checked for its top-level keys; its folder; the zoo folder."""
    raw = read_yaml_mapping(path, "--manifest", "a mapping with the keys entries, defaults")
    try:
        top = _File.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"--manifest {path}: {_pydantic_problems(err)}") from err
    here = Path(path).resolve().parent
    zoo = Path(top.zoo).expanduser()
    return top, here, zoo if zoo.is_absolute() else Path(os.path.normpath(here / zoo))


def load_manifest(path: Path, resolve: Resolver | None = None) -> list[Job]:
    """The manifest's entries as checked jobs; a ConfigError lists every problem.

    ``resolve`` turns ``models:/NAME/VERSION`` (or ``@ALIAS``) into a local
    folder, given the entry's configuration (the workflow passes one that
    downloads registered base models from ``pipeline.tracking_uri``).
    """
    top, here, zoo = _read(path)
    jobs: list[Job] = []
    problems = []
    for i, raw_entry in enumerate(top.entries, start=1):
        name = ""
        if isinstance(raw_entry, dict):
            name = raw_entry.get("name") or raw_entry.get("model") or ""
        try:
            jobs.append(_job(raw_entry, top.defaults, here, zoo, resolve))
        except LwqError as err:
            problems.append(f"entry {i} ({name or '?'}): {err}")
    labels = [j.label for j in jobs]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"entries named {label!r} twice: give each a distinct name key")
    if not top.entries:
        problems.append("entries: the list is empty")
    if problems:
        raise ConfigError(f"--manifest {path}:\n  " + "\n  ".join(problems))
    return jobs


def job_for(path: Path, model: str, resolve: Resolver | None = None) -> Job:
    """The manifest's defaults applied to ``model`` (a run the registry triggered)."""
    top, here, zoo = _read(path)
    try:
        return _job({"model": model}, top.defaults, here, zoo, resolve)
    except LwqError as err:
        raise ConfigError(f"--manifest {path}, model {model}: {err}") from err
