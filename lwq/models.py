"""Loading Hugging Face causal LMs from local directories, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lwq.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Windows longer than this are not used by default (GPTQ/AWQ perplexity protocol).
MAX_WINDOW = 2048


def context_window(model_config: Any, requested: int | None = None) -> int:
    """The one rule for token windows, for calibration and for every perplexity.

    ``requested`` (calib.seq_len, ``--seq-len``) when given; otherwise the
    model's context (``max_position_embeddings``) capped at 2048 tokens.
    """
    if requested is not None:
        if requested < 2:
            raise ConfigError(f"a window needs at least 2 tokens (got --seq-len {requested})")
        return int(requested)
    context = getattr(model_config, "max_position_embeddings", None) or MAX_WINDOW
    return int(min(MAX_WINDOW, context))


def max_positions(model_config: Any) -> int:
    """The longest sequence the model takes (prompt and generated tokens), uncapped."""
    return int(getattr(model_config, "max_position_embeddings", 0) or context_window(model_config))


def check_model_dir(path: Path, setting: str = "--model") -> None:
    """Fail early, naming the setting, when ``path`` is not a loadable model."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"{setting} {path}: no such directory (models load from local "
            "directories; download one first with the tools of your hub)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{setting} {path}: no config.json, not a Hugging Face model directory"
        )
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{setting} {path}: no weights (*.safetensors or pytorch_model*.bin) in the directory"
        )


def check_tokenizer(tokenizer: Any, n_embed: int, path: Path, setting: str = "--model") -> None:
    """A tokenizer with more tokens than the embedding has rows is another model's."""
    if len(tokenizer) > n_embed:
        raise ModelLoadError(
            f"{setting} {path}: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"embedding only {n_embed}: the tokenizer does not belong to this model"
        )


def load_model_dir(
    path: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    setting: str = "--model",
) -> tuple[PreTrainedModel, Any]:
    """Load model and tokenizer from ``path``; compute dtype float32 by default.

    On CPU, bfloat16/float16 matmuls are hundreds of times slower than float32,
    so the checkpoint's own dtype is only used for storage.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path, setting)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{setting} {path}: cannot load its tokenizer: {err}") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{setting} {path}: cannot load the model: {err}") from err
    embedding: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
    check_tokenizer(tokenizer, int(embedding.shape[0]), path, setting)
    model.eval()
    model.to(device)  # type: ignore[arg-type]
    return model, tokenizer


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model's skeleton: parameters on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()  # type: ignore[no-any-return]
