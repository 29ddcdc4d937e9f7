"""Calibration sets: n token windows of a given length, sampled with a seed.

The set's identity is the SHA-256 of its token ids, so two sets that feed the
model the same tokens are the same set, wherever the text came from.
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


def build_calibration_set(
    tokenizer: Any,
    source: str | Path,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
) -> CalibrationSet:
    """Tokenise the source once and sample the windows."""
    text = load_calibration_text(source)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    windows = sample_windows(ids, n_samples, seq_len, seed)
    return CalibrationSet(windows, str(source), seed, tokens_sha256(windows))
