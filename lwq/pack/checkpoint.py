"""Packed checkpoint format v1: files, manifest, checksums, loading.

A checkpoint directory holds:

- ``layers-NNNNN.safetensors``: one file per decoder block with one uint8
  tensor, the block's packed layers back to back (see ``lwq.pack.layer``).
  One tensor per block keeps safetensors' per-tensor header small next to the
  payload, so the bits measured from the files are the bits of the format;
- ``rest.safetensors``: everything that is not quantized (embeddings, norms,
  biases, the head) in the base model's dtype;
- ``config.json`` and the tokenizer files of the base model;
- ``lwq_manifest.json``, written last: format version, the base model's
  config and weight hash, the quantization settings, each layer's sections,
  the SHA-256 of every file, and the average bits per quantized weight
  measured from the files and predicted by the cost model.

Everything is written into a staging directory beside the target and moved
into place only when complete, so an interrupted write never leaves a
half-checkpoint under the target name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwq.adapters import ModelAdapter, adapter_for
from lwq.errors import ChecksumError, ConfigError, ModelLoadError
from lwq.fileio import save_tensors, write_json
from lwq.hashing import file_sha256
from lwq.pack.layer import PackedLayer, grid_from_meta, payload_nbytes, unpack_layer
from lwq.pack.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    AllocationReport,
    BaseModelInfo,
    BitsReport,
    FileEntry,
    LayerEntry,
    Manifest,
    QuantizationInfo,
)
from lwq.runtime.module import (
    HALF_DTYPES,
    HalfEmbedding,
    HalfLinear,
    QuantLinear,
    fuse_mlps,
    share_inputs,
)
from lwq.runtime.native import release_freed_memory

__all__ = [
    "MANIFEST",
    "CheckpointWriter",
    "ChecksumError",
    "Manifest",
    "QuantLinear",
    "load_quantized",
]

log = logging.getLogger(__name__)

REST_FILE = "rest.safetensors"
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def weights_sha256(model_dir: Path) -> str:
    """Content identity of a model: hash of its weight files' hashes, by name."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def block_file(index: int) -> str:
    return f"layers-{index:05d}.safetensors"


def check_output_dir(out: Path, overwrite: bool, setting: str = "--out") -> None:
    """Refuse to replace an existing checkpoint or non-empty folder unless asked."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{setting} {out} exists and is not a directory")
    if overwrite or not any(out.iterdir()):
        return
    what = "a packed checkpoint" if (out / MANIFEST).is_file() else "other files"
    raise ConfigError(
        f"{setting} {out} already holds {what}; choose another {setting} or pass --overwrite"
    )


class CheckpointWriter(AbstractContextManager["CheckpointWriter"]):
    """Writes a checkpoint block by block; ``finish`` commits it atomically.

    Files and folders get the modes the process umask gives every other file,
    so a serving process of another user can read them.
    """

    def __init__(self, out: Path, base_model: Path, overwrite: bool = False) -> None:
        self.out = Path(out).resolve()
        self.base_model = Path(base_model)
        self.overwrite = overwrite
        check_output_dir(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = self.out.with_name(f".{self.out.name}.partial-{uuid.uuid4().hex[:12]}")
        self.stage.mkdir(mode=0o777)  # minus the umask
        self.layers: dict[str, LayerEntry] = {}
        self.files: list[str] = []
        self._done = False

    def add_block(self, index: int, layers: list[PackedLayer]) -> None:
        name = block_file(index)
        offset = 0
        for p in layers:
            self.layers[p.name] = p.entry(name, offset)
            offset += p.nbytes
        blob = torch.cat([p.data for p in layers]) if layers else torch.zeros(0, dtype=torch.uint8)
        # One key: safetensors writes metadata from a hash map, so with two
        # keys their order (and the file's bytes) would change run to run.
        save_tensors(
            {"packed": blob}, self.stage / name, {"format": f"{FORMAT_NAME} v{FORMAT_VERSION}"}
        )
        self.files.append(name)

    def add_rest(self, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(tensors, self.stage / REST_FILE, {"format": FORMAT_NAME})
        self.files.append(REST_FILE)

    def finish(
        self,
        config: dict[str, Any],
        quantization: QuantizationInfo,
        allocation: AllocationReport | None = None,
    ) -> Manifest:
        for fname in BASE_FILES:
            src = self.base_model / fname
            if src.is_file():
                shutil.copyfile(src, self.stage / fname)
                self.files.append(fname)
        files = {
            f: FileEntry(sha256=file_sha256(self.stage / f), bytes=(self.stage / f).stat().st_size)
            for f in sorted(set(self.files))
        }
        manifest = Manifest(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            base_model=BaseModelInfo(
                path=str(self.base_model), weights_sha256=weights_sha256(self.base_model)
            ),
            config=config,
            quantization=quantization,
            bits=bits_report(self.layers, files),
            layers=self.layers,
            files=files,
            allocation=allocation,
        )
        write_json(manifest.to_json(), self.stage / MANIFEST)
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return manifest

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            shutil.rmtree(self.stage, ignore_errors=True)


def bits_report(layers: dict[str, LayerEntry], files: dict[str, FileEntry]) -> BitsReport:
    """Average bits per quantized weight, from the files and from the cost model."""
    n = sum(m.n_weights for m in layers.values())
    model_bytes = 0
    for m in layers.values():
        model_bytes += payload_nbytes(
            m.shape[0],
            m.shape[1],
            grid_from_meta(m.lo),
            None if m.hi is None else grid_from_meta(m.hi),
            m.n_hi,
            m.n_hi_groups,
            m.mask_encoding or "bitmap",
        )
    layer_files = {m.file for m in layers.values()}
    file_bytes = sum(files[f].bytes for f in layer_files)
    return BitsReport(
        n_quantized_weights=n,
        from_bytes=file_bytes * 8 / n if n else 0.0,
        from_model=model_bytes * 8 / n if n else 0.0,
        quantized_file_bytes=file_bytes,
        payload_bytes=model_bytes,
        unquantized_bytes=files[REST_FILE].bytes if REST_FILE in files else 0,
        total_bytes=sum(f.bytes for f in files.values()),
    )


def read_manifest(ckpt: Path, verify: bool = True) -> Manifest:
    """The manifest of a checkpoint; with ``verify``, every file's SHA-256 is checked."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{ckpt}: no {MANIFEST}; not an lwq checkpoint (or an unfinished one)")
    manifest = Manifest.parse(path.read_text(encoding="utf-8"), path)
    if verify:
        verify_files(ckpt, manifest)
    return manifest


def verify_files(ckpt: Path, manifest: Manifest) -> None:
    for fname, info in manifest.files.items():
        f = Path(ckpt) / fname
        if not f.is_file():
            raise ChecksumError(f"{ckpt}: {fname} is missing; copy the checkpoint again")
        if f.stat().st_size != info.bytes or file_sha256(f) != info.sha256:
            raise ChecksumError(
                f"{ckpt}: {fname} is corrupted or truncated (SHA-256 does not match the "
                "manifest); copy the checkpoint again or re-run 'lwq quantize'"
            )


def iter_packed_layers(ckpt: Path, manifest: Manifest) -> Iterator[PackedLayer]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, m in manifest.layers.items():
        by_file.setdefault(m.file, []).append(name)
    for fname, names in by_file.items():
        with safe_open(str(Path(ckpt) / fname), framework="pt") as f:
            blob = f.get_tensor("packed")
        for name in names:
            m = manifest.layers[name]
            if m.offset + m.nbytes > blob.numel():
                raise ChecksumError(
                    f"{ckpt}: layer {name} needs bytes {m.offset}..{m.offset + m.nbytes} "
                    f"of {fname}, which holds {blob.numel()}"
                )
            yield PackedLayer.from_entry(name, m, blob[m.offset : m.offset + m.nbytes])


def load_quantized(
    ckpt: Path, device: str = "cpu", packed_modules: bool = False, verify: bool = True
) -> tuple[Any, Any, Manifest]:
    """Rebuild a working Hugging Face model from a packed checkpoint.

    By default every quantized layer gets its dequantised float32 weight.
    With ``packed_modules`` it is replaced by a ``QuantLinear`` that computes
    from its codes (``lwq.runtime``), and an input embedding or output head
    stored in 16 bits stays 16-bit (``HalfEmbedding``, ``HalfLinear``), so the
    loaded weights take about the checkpoint's bytes. Returns (model,
    tokenizer, manifest).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from lwq.loading import set_tensor, tied_sources
    from lwq.models import empty_model

    manifest = read_manifest(ckpt, verify=verify)
    config = AutoConfig.for_model(**manifest.config)
    model = empty_model(config, torch.float32)
    adapter = adapter_for(model)
    keep_half = _embedding_weights(model) if packed_modules else set()
    rest: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(ckpt) / REST_FILE), framework="pt") as f:
        for key in f.keys():
            value = f.get_tensor(key)
            rest[key] = value if key in keep_half and value.dtype in HALF_DTYPES else value.float()
    for name, value in rest.items():
        set_tensor(model, name, nn.Parameter(value, requires_grad=False))
    for name in manifest.layers:
        set_tensor(model, f"{name}.weight", nn.Parameter(torch.empty(0), requires_grad=False))
    for i, packed in enumerate(iter_packed_layers(ckpt, manifest)):
        _install_layer(model, adapter, packed, rest.get(f"{packed.name}.bias"), packed_modules)
        if packed_modules and i % 8 == 7:  # the rearranging's temporaries, back to the system
            release_freed_memory()
    for target, source in tied_sources(model).items():
        if target not in rest:
            set_tensor(model, target, model.get_parameter(source))
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ModelLoadError(f"{ckpt}: the checkpoint lacks tensors {leftover[:5]}")
    if packed_modules:
        _half_embeddings(model)
        share_inputs(model)
        fuse_mlps(model)
        release_freed_memory()
    model.to(device)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return model, tokenizer, manifest


def _embedding_weights(model: Any) -> set[str]:
    """Names of the input embedding's and the output head's weights."""
    names = set()
    modules = {id(m): n for n, m in model.named_modules()}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and id(module) in modules:
            names.add(f"{modules[id(module)]}.weight")
    return names


def _half_embeddings(model: Any) -> None:
    """Swap a 16-bit input embedding and output head for modules that compute in float32.

    Only a plain ``nn.Embedding`` and ``nn.Linear`` are swapped; a subclass (Gemma's
    scaled embedding) computes in its weight's dtype, so its weight becomes float32
    (and so does a head tied to it)."""
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight.dtype in HALF_DTYPES:
        if type(emb) is nn.Embedding and emb.max_norm is None:
            model.set_input_embeddings(HalfEmbedding(emb.weight, emb.padding_idx))
        else:
            half = emb.weight
            full = nn.Parameter(half.float(), requires_grad=False)
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if p is half:
                        setattr(module, name, full)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.dtype in HALF_DTYPES:
        model.set_output_embeddings(HalfLinear(head.weight, head.bias))


def _install_layer(
    model: nn.Module,
    adapter: ModelAdapter,
    packed: PackedLayer,
    bias: torch.Tensor | None,
    packed_modules: bool,
) -> None:
    from lwq.loading import set_tensor

    if packed_modules:
        owner_name, _, attr = packed.name.rpartition(".")
        setattr(
            model.get_submodule(owner_name), attr, QuantLinear(packed, bias, adapter.transposed)
        )
        return
    w = unpack_layer(packed).dequantize()  # (d_out, d_in)
    if adapter.transposed:
        w = w.t().contiguous()
    set_tensor(model, f"{packed.name}.weight", nn.Parameter(w, requires_grad=False))
