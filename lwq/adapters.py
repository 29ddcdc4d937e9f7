"""Model adapters: where a causal LM's decoder blocks are and which of their modules to quantize.

Any decoder-only Hugging Face causal LM is served by ``discover``: the decoder
blocks are the longest ``nn.ModuleList`` of one module class, the quantizable
layers are the ``nn.Linear`` and ``Conv1D`` modules inside each block (found
per block, so blocks may differ), and the final norm is the base model's norm
module. Which layers read the same input (and so share one Hessian) is found
from the block's own forward pass (``lwq.stats``). The families declared in
``ADAPTERS`` add what discovery cannot know (their layers' order and groups,
checkpoint names that transformers renames on load); everything else uses the
same code. The block driver (``lwq.stats``, ``lwq.quantize``) and the packer
consume an adapter and never special-case a family.

The adapter also owns the layer names: ``<blocks>.<index>.<linear>``. Weights
are always handed out as (d_out, d_in) matrices, the layout of ``nn.Linear``;
GPT-2-style ``Conv1D`` stores (d_in, d_out), so such an adapter is ``transposed``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lwq.errors import ConfigError

# Where the norm after the last block lives, relative to the blocks' parent.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D  # type: ignore[no-any-return]


def is_linear(module: nn.Module) -> bool:
    """A quantizable layer: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    conv = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]  # values of config.model_type this adapter serves
    blocks: str  # dotted path from the *ForCausalLM model to the decoder ModuleList
    # Quantizable linears of one block, in forward order, grouped by shared
    # input: layers in one group see the same X, hence the same Hessian.
    # Empty for a discovered adapter: each block's linears are enumerated.
    input_groups: tuple[tuple[str, ...], ...] = ()
    transposed: bool = False  # weight stored as (d_in, d_out)
    # Module applied to the last block's output before the LM head.
    final_norm: str = "model.norm"
    # (regex on checkpoint key, replacement) for tensors whose file name differs
    # from the module name (transformers renames them on load).
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def model_key(self, checkpoint_key: str) -> str:
        for pattern, repl in self.checkpoint_renames:
            checkpoint_key = re.sub(pattern, repl, checkpoint_key)
        return checkpoint_key

    @property
    def linears(self) -> tuple[str, ...]:
        """The declared linears of a block (empty for a discovered adapter)."""
        return tuple(name for group in self.input_groups for name in group)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        mod: nn.Module = model
        for part in self.blocks.split("."):
            mod = getattr(mod, part)
        assert isinstance(mod, nn.ModuleList), f"{self.blocks} is not a ModuleList"
        return mod

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: final norm, the LM head, and the
        logit scaling some families apply (Gemma's soft-capping, Cohere, Granite)."""
        out = model.get_submodule(self.final_norm)(hidden)
        project_out = getattr(
            model.get_submodule(self.blocks.rsplit(".", 1)[0]), "project_out", None
        )
        if project_out is not None:  # OPT-350m style projection
            out = project_out(out)
        head = model.get_output_embeddings()  # type: ignore[operator]
        return self.scale_logits(model, head(out))

    def scale_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to the LM head's output (most families: nothing)."""
        config = getattr(model, "config", None)
        scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        if isinstance(scale, int | float) and not isinstance(scale, bool):
            logits = logits * scale
        divide = getattr(config, "logits_scaling", None)  # Granite divides
        if isinstance(divide, int | float) and not isinstance(divide, bool):
            logits = logits / divide
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's quantizable modules by name, in forward (registration) order."""
        if self.input_groups:
            return {name: block.get_submodule(name) for name in self.linears}
        return {name: mod for name, mod in block.named_modules() if name and is_linear(mod)}

    def layer_name(self, block: int, linear: str) -> str:
        """The full module name of ``linear`` (e.g. ``mlp.up_proj``) in block ``block``."""
        return f"{self.blocks}.{block}.{linear}"

    def split_name(self, name: str) -> tuple[int, str]:
        """(block index, linear) of a full layer name; the inverse of ``layer_name``."""
        prefix = self.blocks + "."
        if not name.startswith(prefix):
            raise ValueError(f"{name} is not a layer of {self.blocks}")
        block, _, linear = name[len(prefix) :].partition(".")
        return int(block), linear

    def block_index(self, name: str) -> int:
        return self.split_name(name)[0]

    def layer_names(self, model: nn.Module) -> list[str]:
        """Full module names of every quantizable layer, block by block."""
        return [name for name, _ in self.iter_layers(model)]

    def iter_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for i, block in enumerate(self.get_blocks(model)):
            for name, mod in self.block_linears(block).items():
                yield self.layer_name(i, name), mod

    def read_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as a (d_out, d_in) float32 matrix (a copy)."""
        w = module.weight
        assert isinstance(w, torch.Tensor)
        w = w.detach()
        return (w.t() if self.transposed else w).to(torch.float32).clone()

    def write_weight(self, module: nn.Module, w: torch.Tensor) -> None:
        """Set the weight from a (d_out, d_in) matrix, keeping the module's dtype."""
        param = module.weight
        assert isinstance(param, torch.Tensor)
        new = w.t() if self.transposed else w
        assert new.shape == param.shape, (tuple(new.shape), tuple(param.shape))
        with torch.no_grad():
            param.copy_(new.to(param.dtype))

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) without copying the weight."""
        w = module.weight
        assert isinstance(w, torch.Tensor)
        d0, d1 = w.shape
        return (int(d1), int(d0)) if self.transposed else (int(d0), int(d1))


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        "model.layers",
        _LLAMA_LIKE,
    ),
    ModelAdapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    ModelAdapter(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        transposed=True,
        final_norm="transformer.ln_f",
    ),
    ModelAdapter(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        input_groups=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        checkpoint_renames=((r"^embed_out\.", "lm_head."),),
    ),
)


def declared_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def _n_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


def discover(model: nn.Module) -> ModelAdapter:
    """An adapter for any decoder-only causal LM, read from the model's structure.

    Works on a model whose parameters are on the meta device (nothing is run).
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        if not any(is_linear(m) for m in mod[0].modules()):
            continue
        candidates.append((len(mod), _n_params(mod), name))
    if not candidates:
        raise ConfigError(
            f"model_type {model_type!r}: no decoder blocks found (searched every nn.ModuleList "
            "for one of repeated modules of one class holding nn.Linear or Conv1D layers); "
            "lwq quantizes decoder-only causal LMs"
        )
    _, _, blocks = max(candidates)
    parent = model.get_submodule(blocks.rsplit(".", 1)[0]) if "." in blocks else model
    parent_path = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    norm = next(
        (n for n in FINAL_NORM_NAMES if isinstance(getattr(parent, n, None), nn.Module)), None
    )
    if norm is None:
        raise ConfigError(
            f"model_type {model_type!r}: found the blocks at {blocks} but no final norm beside "
            f"them (searched {', '.join(FINAL_NORM_NAMES)} in {parent_path or 'the model'})"
        )
    block_list = model.get_submodule(blocks)
    assert isinstance(block_list, nn.ModuleList)
    block0 = block_list[0]
    conv = _conv1d_type()
    kinds = {conv is not None and isinstance(m, conv) for m in block0.modules() if is_linear(m)}
    if len(kinds) != 1:
        raise ConfigError(
            f"model_type {model_type!r}: its blocks mix nn.Linear and Conv1D layers; "
            "declare an adapter in lwq/adapters.py"
        )
    return ModelAdapter(
        family=f"discovered:{model_type}",
        model_types=(model_type,),
        blocks=blocks,
        transposed=kinds == {True},
        final_norm=f"{parent_path}.{norm}" if parent_path else norm,
    )


def adapter_for(target: Any) -> ModelAdapter:
    """The adapter of a model, a model's config, or (declared families only) a model_type.

    A declared family (``ADAPTERS``) is used as declared; any other decoder-only
    model is ``discover``-ed from its structure (a config gets an empty skeleton
    built on the meta device for that).
    """
    if isinstance(target, str):
        for adapter in ADAPTERS:
            if target in adapter.model_types:
                return adapter
        raise ConfigError(
            f"model_type {target!r} has no declared adapter (declared: "
            f"{', '.join(declared_model_types())}); pass the model or its config to "
            "discover its blocks"
        )
    model_type = getattr(target, "model_type", None) or getattr(
        getattr(target, "config", None), "model_type", None
    )
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if isinstance(target, nn.Module):
        return discover(target)
    from lwq.models import empty_model

    return discover(empty_model(target))
