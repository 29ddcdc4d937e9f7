"""The checkpoint manifest as a typed, validated model (``lwq_manifest.json``).

Everything that reads a checkpoint (the loader, ``lwq info``, the workflow's
evaluation, storage and registry) reads it through ``Manifest``, never by
string keys. Unknown keys are errors, and ``Manifest.parse`` checks that the
numbers hold together (every layer's bytes inside its file, every file listed
with its hash) before anything trusts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lwq.errors import ChecksumError, ModelLoadError

FORMAT_NAME = "lwq-packed"
FORMAT_VERSION = 1
MANIFEST = "lwq_manifest.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridMeta(_Frozen):
    bits: int
    group_size: int
    symmetric: bool


class LayerEntry(_Frozen):
    """One quantized layer: its grids, its sections, where its bytes are."""

    shape: tuple[int, int]  # (d_out, d_in)
    lo: GridMeta
    hi: GridMeta | None
    n_hi: int = Field(ge=0)
    n_hi_groups: int = Field(ge=0)
    mask_encoding: Literal["bitmap", "elias_fano", "columns"] | None
    sections: dict[str, tuple[int, int]]  # name -> (offset, length) inside the layer
    nbytes: int = Field(ge=0)
    file: str
    offset: int = Field(ge=0)

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @model_validator(mode="after")
    def _sections_fit(self) -> LayerEntry:
        for key, (off, length) in self.sections.items():
            if off < 0 or length < 0 or off + length > self.nbytes:
                raise ValueError(f"section {key} ({off}+{length}) exceeds {self.nbytes} bytes")
        if (self.hi is None) != (self.mask_encoding is None):
            raise ValueError("a high grid and a mask encoding go together")
        return self


class FileEntry(_Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BaseModelInfo(_Frozen):
    path: str
    weights_sha256: str


class CalibrationInfo(_Frozen):
    source: str
    n_samples: int
    seq_len: int
    seed: int
    sha256: str


class QuantizationInfo(_Frozen):
    method: Literal["rtn", "gptq", "lwq"]
    mode: Literal["parallel", "sequential"] | None  # None: RTN, no statistics
    settings: dict[str, Any]  # the LwqConfig that produced it (without the pipeline)
    calibration: CalibrationInfo | None
    code_version: str  # lwq.provenance.code_version of the quantizer


class BitsReport(_Frozen):
    n_quantized_weights: int
    from_bytes: float  # bits per quantized weight measured from the layer files
    from_model: float  # the same from the format's cost model
    quantized_file_bytes: int
    payload_bytes: int
    unquantized_bytes: int
    total_bytes: int


class LayerAllocation(_Frozen):
    name: str
    ratio: float
    n_hi: int
    bits_per_weight: float
    predicted_loss: float
    output_error: float | None
    lo_bits: int | None = None  # the layer's base (method.bases: chosen per layer)


class ProfileInfo(_Frozen):
    r_max: float
    n_tokens: int
    sketch_dim: int
    r_mid: float | None
    seed: int
    calib_sha256: str
    seconds: float
    estimator: str = "forward"  # how the profile was measured: forward or reverse
    samples: int = 0  # reverse: profile sequences
    shrinkage: float = 0.0  # reverse: cross-layer terms pulled towards zero by this factor


class AllocationReport(_Frozen):
    """The method's per-layer ratios and what the profile predicted of them."""

    objective: str
    budget: float | None  # None: a fixed ratio, whatever it costs
    bits_cost_model: float
    predicted_kl: float
    solver: str
    solve_seconds: float
    layers: list[LayerAllocation]
    profile: ProfileInfo


class Manifest(_Frozen):
    format: Literal["lwq-packed"]
    format_version: int
    base_model: BaseModelInfo
    config: dict[str, Any]  # the base model's Hugging Face config
    quantization: QuantizationInfo
    bits: BitsReport
    layers: dict[str, LayerEntry]
    files: dict[str, FileEntry]
    allocation: AllocationReport | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for name, layer in self.layers.items():
            f = self.files.get(layer.file)
            if f is None:
                raise ValueError(f"layer {name}: its file {layer.file} is not listed in files")
            if layer.offset + layer.nbytes > f.bytes:
                raise ValueError(
                    f"layer {name}: bytes {layer.offset}..{layer.offset + layer.nbytes} "
                    f"lie outside {layer.file} ({f.bytes} bytes)"
                )
        return self

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @classmethod
    def parse(cls, text: str, where: Path | str) -> Manifest:
        """Validate a manifest's JSON text; errors name the file and the field."""
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ChecksumError(f"{where} is corrupted (not valid JSON): {err}") from err
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where}: not an lwq manifest")
        fmt, version = data.get("format"), data.get("format_version")
        if fmt != FORMAT_NAME or version != FORMAT_VERSION:
            raise ModelLoadError(
                f"{where}: format {fmt} v{version}; this lwq reads {FORMAT_NAME} "
                f"v{FORMAT_VERSION} (re-quantize with this version, or install the lwq "
                "that wrote it)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}"
                for e in err.errors()[:5]
            )
            raise ModelLoadError(f"{where}: invalid manifest: {problems}") from err

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
