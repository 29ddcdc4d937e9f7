"""Calibration sets: n token windows of a given length, sampled with a seed.

The set's identity is the SHA-256 of its token ids, so two sets that feed the
model the same tokens are the same set, wherever the text came from.

Three kinds of source:
- a text file or folder (or ``hf://`` dataset), tokenised once, windows at
  seeded random offsets;
- ``self``: text the model generates itself, sampled from its own next-token
  distribution from the start token (self-calibration; the data-free
  calibration of LLM-QAT). No corpus is needed, and the inputs are the ones the
  model's own distribution weights most, which is what the KL objective of
  quantization measures;
- a set saved by ``CalibrationSet.save`` (``lwq calibrate``), a
  ``.safetensors`` file: its windows as they are, so several tools or runs can
  share exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lwq.errors import ConfigError
from lwq.textio import read_text

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
SELF = "self"  # calib.source: the model's own generated text
SET_SUFFIX = ".safetensors"  # calib.source: a saved calibration set
GENERATE_VERSION = 1  # bump when generation changes the tokens it draws


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows ``input_ids`` of shape (n_samples, seq_len)."""

    input_ids: torch.Tensor
    source: str
    seed: int
    sha256: str
    version: int = 1

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.n_samples * self.seq_len

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))

    def save(self, path: Path) -> Path:
        """The windows as safetensors, the rest in its metadata."""
        from lwq.fileio import save_tensors

        meta = {"source": self.source, "seed": str(self.seed), "sha256": self.sha256}
        meta["version"] = str(self.version)
        return save_tensors({"input_ids": self.input_ids}, path, meta)

    @classmethod
    def load(cls, path: Path) -> CalibrationSet:
        """A set written by ``save``; its tokens are checked against their hash."""
        from lwq.fileio import load_tensors

        tensors, meta = load_tensors(path)
        ids = tensors["input_ids"]
        if meta.get("version") != str(cls.version) or tokens_sha256(ids) != meta.get("sha256"):
            raise ConfigError(f"{path} is not a calibration set of this lwq version; remove it")
        return cls(ids, meta["source"], int(meta["seed"]), meta["sha256"])


def tokens_sha256(ids: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_calibration_text(source: str | Path, setting: str = "--calib") -> str:
    """Text from a local file or folder, or ``hf://NAME[/CONFIG[/SPLIT]]``.

    The hub form needs network access to the Hugging Face hub; offline it fails
    with an error that says to pass a local file instead.
    """
    src = str(source)
    if not src.startswith(HF_PREFIX):
        return read_text(Path(src), setting)
    parts = src[len(HF_PREFIX) :].split("/")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), "train"
    if len(parts) > 2:
        split = parts[2]
    try:
        import datasets

        ds: Any = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; all mean "not reachable here"
        raise ConfigError(
            f"{setting} {src}: cannot load the dataset from the Hugging Face hub ({err}); "
            "offline, pass a local text file or folder instead"
        ) from err
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    text = "\n\n".join(t for t in ds[column] if t and t.strip())
    if not text:
        raise ConfigError(f"{setting} {src}: the dataset's {column!r} column is empty")
    return text


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets."""
    if n_samples < 1 or seq_len < 2:
        raise ConfigError(
            f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})"
        )
    if ids.numel() < seq_len:
        raise ConfigError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}: give a longer --calib text or lower calib.seq_len"
        )
    if ids.numel() < n_samples * seq_len:
        log.warning(
            "calibration text has %d tokens < %d samples x %d: windows will overlap",
            ids.numel(),
            n_samples,
            seq_len,
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (n, T)


def needs_model(source: str | Path | None) -> bool:
    """Whether building the set from ``source`` runs the model (``self``)."""
    return str(source) == SELF


def start_token(tokenizer: Any) -> int:
    """The token a generated sequence starts from: BOS, else EOS (GPT-2's one marker)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ConfigError(
        "calib.source=self needs a start token, and the tokenizer has neither a BOS nor an "
        "EOS token: pass a calibration text with --calib instead"
    )


@torch.no_grad()
def generate_calibration_set(
    model: Any,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> CalibrationSet:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model`` itself.

    Each sequence starts with the start token and continues by sampling from
    the model's next-token distribution at ``temperature`` (no top-k or top-p:
    the distribution itself), the end token suppressed so that every window is
    full. Sampling is seeded and leaves the global random state untouched;
    ``batch_size`` sequences are drawn at once (their key-value cache grows as
    batch_size x seq_len).
    """
    if n_samples < 1 or seq_len < 2:
        raise ConfigError(
            f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})"
        )
    if not temperature > 0:
        raise ConfigError(f"calib.temperature={temperature:g}: use a temperature above 0")
    from transformers import GenerationConfig

    bos = start_token(tokenizer)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    n_new = seq_len - 1
    gen = GenerationConfig(  # the distribution itself: no top-k, top-p or penalties
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=n_new,
        min_new_tokens=n_new,  # the end token suppressed: every window full
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else bos,
    )
    windows = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - start)
            ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            windows.append(out[:, :seq_len].cpu())
    ids = torch.cat(windows)
    source = f"{SELF} (temperature {temperature:g}, generation v{GENERATE_VERSION})"
    return CalibrationSet(ids, source, seed, tokens_sha256(ids))


def load_saved_set(path: Path, n_samples: int, seq_len: int) -> CalibrationSet:
    """The first ``n_samples`` windows, first ``seq_len`` tokens each, of a saved set."""
    cs = CalibrationSet.load(path)
    if cs.n_samples < n_samples or cs.seq_len < seq_len:
        raise ConfigError(
            f"--calib {path}: the saved set has {cs.n_samples} windows of {cs.seq_len} tokens, "
            f"fewer than calib.n_samples={n_samples} x calib.seq_len={seq_len}: lower "
            "--n-samples/--seq-len or save a larger set with 'lwq calibrate'"
        )
    if (cs.n_samples, cs.seq_len) == (n_samples, seq_len):
        return cs
    ids = cs.input_ids[:n_samples, :seq_len].contiguous()
    return CalibrationSet(ids, f"{cs.source}, part of {path.name}", cs.seed, tokens_sha256(ids))


def build_calibration_set(
    tokenizer: Any,
    source: str | Path,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    model: Any = None,
    temperature: float = 1.0,
    generate_batch: int = 32,
    model_dir: Path | None = None,
    device: str = "cpu",
) -> CalibrationSet:
    """The windows of ``source``: a text tokenised once and sampled, a saved set,
    or (``self``) sequences the model generates: ``model``, or loaded from
    ``model_dir`` onto ``device`` for the generation only."""
    if needs_model(source):
        if model is None:
            if model_dir is None:
                raise ConfigError("calib.source=self generates text with the model: pass the model")
            from lwq.models import load_model_dir

            model = load_model_dir(Path(model_dir), device=device)[0]
        return generate_calibration_set(
            model, tokenizer, n_samples, seq_len, seed, temperature, generate_batch
        )
    if str(source).endswith(SET_SUFFIX) and Path(source).is_file():
        return load_saved_set(Path(source), n_samples, seq_len)
    text = load_calibration_text(source)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    windows = sample_windows(ids, n_samples, seq_len, seed)
    return CalibrationSet(windows, str(source), seed, tokens_sha256(windows))
