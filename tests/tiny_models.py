"""Tiny randomly initialised models, one per supported family, built from configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB = 96
ZOO = Path(__file__).resolve().parents[1] / "zoo"


def tiny_config(model_type: str, vocab: int = VOCAB) -> PretrainedConfig:
    common: dict[str, Any] = {"vocab_size": vocab, "max_position_embeddings": 64}
    llama_like: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **common,
    }
    if model_type == "llama":
        return LlamaConfig(**llama_like)
    if model_type == "mistral":
        return MistralConfig(**llama_like)
    if model_type == "qwen2":
        return Qwen2Config(**llama_like)
    if model_type == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128
        )
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            **common,
        )
    if model_type in GENERIC_TYPES:  # no declared adapter: lwq discovers their blocks
        from transformers import AutoConfig

        ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
        return AutoConfig.for_model(model_type, **llama_like, **ids)
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0, vocab: int = VOCAB) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab), dtype=torch.float32)
    model.eval()
    return model


DECLARED_TYPES = ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox")
# Families without a declared adapter that transformers builds offline from a config.
GENERIC_TYPES = (
    "phi3",
    "phi",
    "gemma",
    "gemma2",
    "gemma3_text",
    "stablelm",
    "falcon",
    "starcoder2",
    "olmo2",
    "granite",
    "cohere",
    "bloom",
    "gpt_bigcode",
    "mpt",
    "qwen3",
)
TINY_TYPES = DECLARED_TYPES + GENERIC_TYPES


def save_tiny_model_dir(model_type: str, path: Path, seed: int = 0) -> Path:
    """A tiny model paired with the zoo tokenizer (4096 tokens), saved in 16 bits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ZOO / "llama-6l-128d")
    model = tiny_model(model_type, seed, vocab=len(tok))
    model.to(torch.float16)  # type: ignore[arg-type]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
