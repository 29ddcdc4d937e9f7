"""The one configuration model, shared by the CLI, the Python API and the flows.

Unknown keys are errors everywhere (``extra="forbid"``), so a typo never
silently falls back to a default, and so is a setting that the chosen method
or command would ignore (``--symmetric`` with ``--method lwq``, ``--mode``
with ``lwq run``): a changed setting either changes the result or is refused.
Load it from YAML with ``load_config``; command-line flags override single
fields with ``with_overrides``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lwq.calibration import SELF
from lwq.errors import ConfigError
from lwq.models import MAX_WINDOW, context_window
from lwq.quant.gptq import GPTQSettings
from lwq.quant.grid import FLOAT_BITS, SUPPORTED_BITS, GridSpec
from lwq.quant.lwc import LWCSettings

Command = Literal["quantize", "sweep", "run"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def changed(self) -> list[str]:
        """Names of the fields whose value differs from their default."""
        return [
            name
            for name, info in type(self).model_fields.items()
            if not info.is_required() and getattr(self, name) != info.get_default()
        ]


class CalibConfig(_Strict):
    source: str | None = Field(
        None,
        description="text file, folder of .txt files, hf://NAME[/CONFIG[/SPLIT]], a set saved "
        "by lwq calibrate (.safetensors), or self: text the model generates itself",
    )
    n_samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int | None = Field(
        None, ge=2, description="tokens per sequence (default: min(2048, model context))"
    )
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    temperature: float = Field(
        1.0, gt=0, description="calib.source=self: sampling temperature of the generated text"
    )
    generate_batch: int = Field(
        32,
        ge=1,
        description="calib.source=self: sequences generated at once (memory grows "
        "as generate_batch x seq_len)",
    )
    mode: Literal["parallel", "sequential"] | None = Field(
        None,
        description="sequential (the default of lwq quantize): each block sees the quantized "
        "blocks before it (GPTQ); parallel (what lwq run does): every layer sees "
        "full-precision inputs, so layers are independent",
    )

    @property
    def block_mode(self) -> Literal["parallel", "sequential"]:
        """The mode a single-process quantization uses (sequential unless set)."""
        return self.mode or "sequential"


class QuantConfig(_Strict):
    method: Literal["rtn", "gptq", "lwq"] = Field(
        "gptq", description="rtn, gptq, or lwq (the method: settings under method.*)"
    )
    bits: int = Field(4, description=f"bits per weight, one of {SUPPORTED_BITS}")
    group_size: int = Field(128, description="input columns per scale (-1: one per row)")
    symmetric: bool = False

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {SUPPORTED_BITS}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be a positive number of columns or -1")
        return v


class GPTQConfig(_Strict):
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="dampening, fraction of mean diag(H)")
    act_order: bool = Field(
        True, description="GPTQ columns by decreasing Hessian diagonal, grids fitted up front"
    )
    static_groups: bool = False
    clip: Literal["minmax", "mse"] = Field(
        "mse",
        description="each group's grid range: mse (the min-max range shrunk to minimise the "
        "rounding error weighted by the Hessian diagonal; on SmolLM2-135M GPTQ W3 g128 38.3 "
        "instead of 63.1 WikiText-2 perplexity) or minmax",
    )

    true_sequential: bool = Field(
        False,
        description="in sequential mode, each group of layers that read one input (q/k/v, "
        "o, gate/up, down) takes its Hessian after the groups before it in its block are "
        "quantized (one more partial block pass per group)",
    )

    def settings(self) -> GPTQSettings:
        return GPTQSettings(
            self.block_size, self.damp, self.act_order, self.static_groups, self.clip
        )


# The base widths every layer chooses from by default (method.bases unset), and,
# where one base serves all layers (method.lo_bits unset but a setting that needs
# one base), the bases it is chosen from and the bits per weight a wider base must
# leave under the budget for high-impact weights.
BASES = (2, 3)
BASE_ROOM = 0.1


def grid_bits(bits: int, group_size: int) -> float:
    """Bits per weight of a uniform asymmetric grid: codes, a float16 scale and a
    ``bits``-bit zero per group (group_size -1: one group per row, taken as none)."""
    return bits + ((16 + bits) / group_size if group_size > 0 else 0.0)


class MethodConfig(_Strict):
    """Settings of --method lwq (arXiv:2511.17801 as implemented: docs/method.md)."""

    budget: float = Field(2.5, gt=0, description="average bits per quantized weight, from bytes")
    lo_bits: int | None = Field(
        None,
        description="one base width for the bulk of every layer's weights; unset: each layer "
        "chooses its own (method.bases), or, with a setting that needs one base "
        "(objective=fixed, profile=forward, ties), the widest base whose uniform grid costs "
        f"{BASE_ROOM} bits less than the budget (3 from 3.25 bits at group 128, else 2)",
    )
    bases: tuple[int, ...] | None = Field(
        None,
        description="base widths each layer chooses from: the allocation picks every layer's "
        f"base and its ratio together; unset: {list(BASES)} unless method.lo_bits is set or "
        "a setting needs one base (objective=fixed, profile=forward, ties)",
    )
    base_floor: Literal["budget", "none"] = Field(
        "budget",
        description="with several bases: budget (a base narrower than the widest one whose "
        f"uniform grid costs {BASE_ROOM} bits less than the budget is not offered: 3 bits "
        "only from 3.25 bits at group 128) or none (every base at every budget)",
    )
    hi_bits: int = Field(
        4, description="bits of the high-impact weights (16: float16 values, dense-and-sparse)"
    )
    group_size: int = Field(128, description="input columns per scale, both grids")
    scoring: Literal["obs", "act", "fisher"] = Field(
        "obs",
        description="high-impact weights by obs (w^2/[H^-1]_kk), act (|w| ||x||) "
        "or fisher (squared gradients, one backward pass per calibration sequence)",
    )
    structure: Literal["weights", "columns"] = Field(
        "weights",
        description="the high-impact set: single weights (located by an Elias-Fano code, "
        "about log2(1/r)+2 bits each) or whole input columns (one bit per column)",
    )
    r_max: float = Field(0.3, gt=0, le=1, description="largest ratio; the probe's chord end")
    curve: Literal["power", "chord"] = Field(
        "power",
        description="output change against ratio per layer: power (a third probe at r_mid "
        "fits r_max (r/r_max)^gamma; the gain of the first weights protected) or chord "
        "(linear between the probes at 0 and r_max)",
    )
    r_mid: float = Field(0.03, gt=0, description="ratio of the third probe (curve=power)")
    objective: Literal["full", "diagonal", "fixed"] = Field(
        "full",
        description="full (cross-layer QP), diagonal (no cross terms), fixed (one ratio)",
    )
    ties: Literal["none", "inputs", "block"] = Field(
        "none",
        description="equal ratios for layers sharing an input (q/k/v, gate/up) or a block",
    )
    hi_refine: Literal["none", "lwc"] = Field(
        "none",
        description="lwc: learn each high-impact group's clipping range on the layer's "
        "calibration inputs (OmniQuant-style), for the high-impact weights only",
    )
    lwc_steps: int = Field(200, ge=1, description="optimiser steps of hi_refine=lwc per layer")
    solver: Literal["CLARABEL", "OSQP"] = "CLARABEL"
    solver_tol: float = Field(1e-8, gt=0)
    profile: Literal["reverse", "forward"] = Field(
        "reverse",
        description="how the sensitivity profile is measured: reverse (one backward pass "
        "per profile sequence, labels sampled from the model; cost linear in depth) or "
        "forward (each layer's probes re-run the later blocks and the head; cost layers x "
        "depth x vocabulary, for small models)",
    )
    profile_samples: int = Field(
        128, ge=8, description="profile sequences (reverse), cut from the calibration windows"
    )
    profile_seq_len: int = Field(128, ge=8, description="tokens per profile sequence (reverse)")
    sketch_dim: int = Field(
        128, ge=1, description="dimensions of the sketched Fisher output (profile=forward)"
    )
    probe_quantizer: Literal["gptq", "rtn"] = "gptq"

    @field_validator("lo_bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {SUPPORTED_BITS}")
        return v

    @field_validator("bases")
    @classmethod
    def _bases(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if len(set(v)) < 2 or any(b not in SUPPORTED_BITS for b in v):
            raise ValueError(f"give two or more distinct widths of {SUPPORTED_BITS}, e.g. [2, 3]")
        return tuple(sorted(set(v)))

    @field_validator("hi_bits")
    @classmethod
    def _hi_bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS and v != FLOAT_BITS:
            raise ValueError(f"must be one of {SUPPORTED_BITS} or {FLOAT_BITS} (float16)")
        return v

    def model_post_init(self, _context: Any) -> None:
        if self.curve == "power" and not self.r_mid < self.r_max:
            raise ValueError(f"method.r_mid={self.r_mid} must be below method.r_max={self.r_max}")
        if self.lo_bits is None and self.bases is None and self.hi_bits <= BASES[0]:
            raise ValueError(
                f"method.hi_bits={self.hi_bits} must exceed the {BASES[0]} bits of the "
                "narrowest base (method.lo_bits unset)"
            )
        if self.lo_bits is not None and self.hi_bits <= self.lo_bits:
            raise ValueError(
                f"method.hi_bits={self.hi_bits} must exceed method.lo_bits={self.lo_bits}"
            )
        if self.bases is not None:
            if self.lo_bits is not None:
                raise ValueError(
                    "method.bases and method.lo_bits exclude each other: give the widths to "
                    "choose from (--bases) or one base (--lo-bits)"
                )
            if self.hi_bits <= max(self.bases):
                raise ValueError(
                    f"method.hi_bits={self.hi_bits} must exceed every width of "
                    f"method.bases={list(self.bases)}"
                )
            for setting, value, allowed in self._one_base_settings():
                if value not in allowed.split(" or "):
                    raise ValueError(
                        f"method.{setting}={value} does not apply with method.bases (each "
                        f"layer's own base): use method.{setting}={allowed}, or one base "
                        "(method.lo_bits)"
                    )
        changed = set(self.changed())
        if "base_floor" in changed and self.chosen_bases() is None:
            raise ValueError(
                "method.base_floor applies to several bases only (method.bases, unset "
                "method.lo_bits)"
            )
        if self.profile == "forward":
            off = sorted(changed & {"profile_samples", "profile_seq_len"})
            if off:
                raise ValueError(
                    f"method.{', method.'.join(off)} apply to method.profile=reverse only "
                    "(the forward profile uses the calibration set)"
                )
        elif "sketch_dim" in changed:
            raise ValueError("method.sketch_dim applies to method.profile=forward only")
        if self.curve == "chord" and "r_mid" in changed:
            raise ValueError("method.r_mid applies to method.curve=power only (chord: no probe)")
        if self.hi_refine == "none" and "lwc_steps" in changed:
            raise ValueError("method.lwc_steps applies to method.hi_refine=lwc only")
        if self.hi_refine == "lwc" and self.hi_bits == FLOAT_BITS:
            raise ValueError(
                "method.hi_refine=lwc learns an integer grid's clipping; it does not apply to "
                f"method.hi_bits={FLOAT_BITS} (float16 values)"
            )

    def _one_base_settings(self) -> tuple[tuple[str, str, str], ...]:
        """(setting, value, what several bases allow) of the settings that need one base."""
        return (
            ("profile", self.profile, "reverse"),
            ("objective", self.objective, "full or diagonal"),
            ("ties", self.ties, "none"),
        )

    def chosen_bases(self) -> tuple[int, ...] | None:
        """The widths each layer chooses its base from, or None for one base for all.

        ``method.bases``; unset, ``BASES`` (those below ``hi_bits``), unless
        ``method.lo_bits`` is set or a setting needs one base. Measured on
        SmolLM2-135M (docs/method.md): each layer's own base of 2 or 3 bits
        cut the perplexity of one base by 25-29 % at 2.5 and 3.0 bits.
        """
        if self.bases is not None or self.lo_bits is not None:
            return self.bases
        if any(v not in ok.split(" or ") for _, v, ok in self._one_base_settings()):
            return None
        widths = tuple(b for b in BASES if b < self.hi_bits)
        return widths if len(widths) > 1 else None

    def offered_bases(self, budget: float | None = None) -> tuple[int, ...] | None:
        """The bases offered at ``budget``: ``chosen_bases()`` from the widest one whose
        uniform grid leaves ``BASE_ROOM`` bits under the budget up (``base_floor=budget``),
        or all of them (``none``); None for one base.

        Measured on SmolLM2-135M (docs/method.md): at 3.5 bits, 2-bit layers paying
        for more 4-bit weights elsewhere gave 29.49 where every layer on 3 bits gave 28.81,
        although the profile predicted the mixed allocation lower.
        """
        widths = self.chosen_bases()
        if widths is None or self.base_floor == "none":
            return widths
        floor = self._widest_fitting(widths, budget)
        return tuple(w for w in widths if w >= floor)

    def _widest_fitting(self, widths: Sequence[int], budget: float | None) -> int:
        """The widest of ``widths`` whose uniform grid costs ``BASE_ROOM`` bits less than
        ``budget`` (default ``self.budget``), else the narrowest."""
        b = self.budget if budget is None else budget
        fits = [w for w in widths if b >= grid_bits(w, self.group_size) + BASE_ROOM]
        return max(fits, default=min(widths))

    def base_bits(self, budget: float | None = None) -> int:
        """``lo_bits``, or when unset the widest base that leaves room at ``budget``.

        A base of b bits costs b + (16 + b) / group_size bits per weight (a
        float16 scale and a b-bit zero per group); the widest base below
        ``hi_bits`` whose cost is at least ``BASE_ROOM`` under the budget is
        chosen (measured on SmolLM2-135M: at 3.5 bits a 3-bit base with 4-bit
        high-impact weights has half the perplexity of a 2-bit one).
        """
        if self.lo_bits is not None:
            return self.lo_bits
        return self._widest_fitting([lo for lo in BASES if lo < self.hi_bits], budget)

    def for_budgets(self, budgets: Sequence[float]) -> MethodConfig:
        """This configuration with ``lo_bits`` fixed for every one of ``budgets``.

        Budgets that share a sensitivity profile (``lwq sweep``, ``lwq run``
        with several budgets) must share the base; an unset ``lo_bits`` whose
        budgets fall on both sides of a base's threshold is an error.
        """
        if self.lo_bits is not None or self.chosen_bases() is not None:
            return self
        bases = {b: self.base_bits(b) for b in budgets}
        if len(set(bases.values())) > 1:
            split = ", ".join(f"{b:g} -> {lo} bits" for b, lo in bases.items())
            raise ConfigError(
                f"method.lo_bits is unset and these budgets need different bases ({split}); "
                "they share one sensitivity profile: set method.lo_bits (--lo-bits) or run "
                "the budgets of each base separately"
            )
        return self.model_copy(update={"lo_bits": next(iter(bases.values()))})

    def grids(self) -> tuple[GridSpec, GridSpec]:
        """The low grid of most weights (the narrowest base) and the high grid of the
        high-impact ones."""
        return self.base_grids()[0], GridSpec(self.hi_bits, self.group_size)

    def base_grids(self) -> tuple[GridSpec, ...]:
        """The low grids a layer may take: each of ``bases``, or the one base."""
        widths = self.chosen_bases() or (self.base_bits(),)
        return tuple(GridSpec(b, self.group_size) for b in widths)

    def lwc(self) -> LWCSettings | None:
        return LWCSettings(steps=self.lwc_steps) if self.hi_refine == "lwc" else None


class PipelineConfig(_Strict):
    """Where the workflow (``lwq run``, flows/) keeps its work, tracks and registers.

    Nothing here is read by the library; the defaults run everything locally
    (Prefect's ephemeral server, MLflow on a sqlite file, checkpoints on disk).
    """

    work_dir: str = Field(
        ".lwq", description="local folder for intermediate artifacts, task results, MLflow"
    )
    storage: str | None = Field(
        None,
        description="where checkpoints go: a local folder (default WORK_DIR/checkpoints) "
        "or s3://BUCKET/PREFIX on any S3-compatible endpoint",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS itself)"
    )
    create_bucket: bool = Field(False, description="create the bucket when it does not exist")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite file)"
    )
    experiment: str = "lwq"
    registry_name: str | None = Field(
        None, description="registered model name (default: lwq-<model folder name>)"
    )
    force_registry: bool = Field(
        False, description="register even if the name belongs to another base model"
    )
    eval_data: str | None = Field(None, description="text file for the perplexity metrics")
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = Field(
        None, description="address of an existing Dask scheduler (dask runner)"
    )
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes (dask runner)")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        # Checked here, before anything runs, not at upload time after the work.
        if v is not None and v.startswith("s3://") and not v[len("s3://") :].split("/")[0]:
            raise ValueError("give s3://BUCKET[/PREFIX] or a local folder")
        return v


class LwqConfig(_Strict):
    model: str | None = Field(None, description="local Hugging Face model directory")
    out: str | None = Field(None, description="output checkpoint directory")
    overwrite: bool = False
    device: str = "cpu"
    calib: CalibConfig = CalibConfig()
    quant: QuantConfig = QuantConfig()
    gptq: GPTQConfig = GPTQConfig()
    method: MethodConfig = MethodConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _applies(self) -> LwqConfig:
        """A changed setting that the chosen method ignores is an error."""
        method = self.quant.method
        if method == "lwq":
            off = [f"quant.{k}" for k in self.quant.changed() if k != "method"]
            why = "the method's grids are method.lo_bits, method.hi_bits and method.group_size"
        else:
            off = [f"method.{k}" for k in self.method.changed()]
            why = "the method.* settings apply to quant.method=lwq only"
            if method == "rtn":
                off += [f"gptq.{k}" for k in self.gptq.changed()]
                off += [f"calib.{k}" for k in self.calib.changed()]
                why = "method.* is for lwq; RTN uses no calibration data (calib.*) or GPTQ (gptq.*)"
        if off:
            raise ValueError(
                f"{_do_not_apply(off)} to quant.method={method} ({why}); "
                "remove the setting or choose another quant.method"
            )
        # Windows are at most MAX_WINDOW tokens: what even those cannot hold is refused
        # here; resolve_inputs checks again with the model's own context.
        self.check_profile_fits(
            self.calib.seq_len or MAX_WINDOW, ValueError, at_most=self.calib.seq_len is None
        )
        return self

    def check_profile_fits(
        self, window: int, error: type[Exception] = ConfigError, at_most: bool = False
    ) -> None:
        """The reverse profile's sequences are cut from the calibration windows (of
        ``window`` tokens, or ``at_most`` that many when calib.seq_len is unset):
        a set too small for them is refused before it is built."""
        from lwq.method.reverse import profile_capacity

        c, m = self.calib, self.method
        if self.quant.method != "lwq" or m.profile != "reverse":
            return
        holds = profile_capacity(c.n_samples, window, m.profile_seq_len)
        if holds < m.profile_samples:
            size = f"at most {window} tokens" if at_most else f"{window} tokens"
            raise error(
                f"calibration too small for the sensitivity profile: "
                f"method.profile_samples={m.profile_samples} sequences of "
                f"method.profile_seq_len={m.profile_seq_len} tokens, but calib.n_samples="
                f"{c.n_samples} windows of {size} (calib.seq_len) hold {holds}: raise "
                "calib.n_samples (--n-samples) or calib.seq_len (--seq-len), or lower "
                "method.profile_samples or method.profile_seq_len"
            )

    def check_for(self, command: Command) -> None:
        """Refuse settings the command would ignore, before anything runs."""
        if command == "run":
            off: list[str] = [k for k in ("out", "overwrite") if k in self.changed()]
            if off:
                raise ConfigError(
                    f"{_do_not_apply(off)} to lwq run: its checkpoints go to "
                    "pipeline.storage (default WORK_DIR/store); use lwq quantize for --out"
                )
            if self.calib.mode == "sequential":
                raise ConfigError(
                    "calib.mode=sequential does not apply to lwq run: the workflow quantizes "
                    "layers independently from full-precision Hessians (parallel); remove "
                    "calib.mode (--mode) or use lwq quantize"
                )
        else:
            off = [f"pipeline.{k}" for k in self.pipeline.changed()]
            if off:
                raise ConfigError(
                    f"{_do_not_apply(off)} to lwq {command} (pipeline.* is for lwq run); remove it"
                )
        if command == "sweep" and self.quant.method != "lwq":
            raise ConfigError("lwq sweep runs the method: set quant.method=lwq (or leave it out)")

    def require(self, *names: str) -> None:
        """Fail early when a setting the job needs is not given."""
        for name in names:
            obj: Any = self
            for part in name.split("."):
                obj = getattr(obj, part)
            if obj is None:
                flag = {"model": "--model", "out": "--out", "calib.source": "--calib"}.get(name)
                hint = f" (or {flag})" if flag else ""
                raise ConfigError(f"the setting {name} is required{hint}")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for tracking systems."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[prefix + k] = v

        walk("", self.model_dump())
        return out


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = "unknown setting" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "invalid configuration: " + "; ".join(lines)


def _do_not_apply(names: Sequence[str]) -> str:
    return f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not apply"


def make_config(data: dict[str, Any]) -> LwqConfig:
    try:
        return LwqConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from err


def read_yaml_mapping(path: Path, flag: str, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name ``flag`` and the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{flag} {path}: no such file") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag} {path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: the top level must be {what}")
    return data


def load_config(path: Path | None) -> LwqConfig:
    """Read a YAML file (or the defaults when ``path`` is None)."""
    if path is None:
        return make_config({})
    return make_config(read_yaml_mapping(path, "--config", "a mapping of settings"))


def with_overrides(config: LwqConfig, overrides: dict[str, Any]) -> LwqConfig:
    """Apply dotted-key overrides (``{"quant.bits": 3}``); None values are skipped."""
    data = config.model_dump(exclude_unset=True)
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return make_config(data)


def resolve_inputs(config: LwqConfig, evaluation: bool = False) -> LwqConfig:
    """The model as a local directory, and the zoo's data slices as defaults.

    ``model`` may be a Hugging Face directory, a ``.gguf`` file (converted once
    into the cache) or the name of a real model (``lwq zoo fetch``; fetched
    once). For ``zoo/<model>``, ``zoo/data/calibration.txt`` is the calibration
    text (when the method uses one and none is given; for any other model the
    model's own generated text, ``calib.source=self``) and, with ``evaluation``
    (the workflow), ``zoo/data/validation.txt`` its evaluation text. The CLI,
    the Python API and the flows all apply it, so they behave alike.
    """
    if config.model is None:
        return config
    from lwq.realmodels import resolve_model

    overrides: dict[str, Any] = {}
    model = resolve_model(config.model)
    if str(model) != config.model:
        overrides["model"] = str(model)
    data = model.parent / "data"
    calib, validation = data / "calibration.txt", data / "validation.txt"
    if config.quant.method != "rtn" and config.calib.source is None:
        # No text given: the zoo's calibration slice, else the model's own text.
        overrides["calib.source"] = str(calib) if calib.is_file() else SELF
    if evaluation and config.pipeline.eval_data is None and validation.is_file():
        overrides["pipeline.eval_data"] = str(validation)
    if config.calib.seq_len is None and (model / "config.json").is_file():
        from transformers import AutoConfig

        config.check_profile_fits(context_window(AutoConfig.from_pretrained(model)))
    return with_overrides(config, overrides) if overrides else config
