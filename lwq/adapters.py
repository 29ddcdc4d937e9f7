"""Model adapters: which modules of a decoder block are the quantizable linears.

One declarative ``ModelAdapter`` per architecture family; the block driver
(``lwq.stats``, ``lwq.quantize``) and the packer consume it and never
special-case a family. Adding a family is adding one entry to ``ADAPTERS``.
The adapter also owns the layer names: ``<blocks>.<index>.<linear>``.

Weights are always handed out as (d_out, d_in) matrices, the layout of
``nn.Linear``. GPT-2's ``Conv1D`` stores (d_in, d_out), so its adapter is
``transposed``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lwq.errors import ConfigError


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]  # values of config.model_type this adapter serves
    blocks: str  # dotted path from the *ForCausalLM model to the decoder ModuleList
    # Quantizable linears of one block, in forward order, grouped by shared
    # input: layers in one group see the same X, hence the same Hessian.
    input_groups: tuple[tuple[str, ...], ...]
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
        return tuple(name for group in self.input_groups for name in group)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        mod: nn.Module = model
        for part in self.blocks.split("."):
            mod = getattr(mod, part)
        assert isinstance(mod, nn.ModuleList), f"{self.blocks} is not a ModuleList"
        return mod

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: final norm, then the LM head."""
        out = model.get_submodule(self.final_norm)(hidden)
        project_out = getattr(
            model.get_submodule(self.blocks.rsplit(".", 1)[0]), "project_out", None
        )
        if project_out is not None:  # OPT-350m style projection
            out = project_out(out)
        head = model.get_output_embeddings()  # type: ignore[operator]
        return head(out)  # type: ignore[no-any-return]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's quantizable modules by name, in forward order."""
        return {name: block.get_submodule(name) for name in self.linears}

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

    def input_group(self, name: str) -> int:
        """Index in ``input_groups`` of the group that holds layer ``name``."""
        linear = self.split_name(name)[1]
        return next(k for k, group in enumerate(self.input_groups) if linear in group)

    def layer_names(self, model: nn.Module) -> list[str]:
        """Full module names of every quantizable layer, block by block."""
        n_blocks = len(self.get_blocks(model))
        return [self.layer_name(i, name) for i in range(n_blocks) for name in self.linears]

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


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter serving ``config.model_type``; a clear error otherwise."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ConfigError(
        f"model_type {model_type!r} is not supported; lwq has adapters for "
        f"{', '.join(supported_model_types())} (add one in lwq/adapters.py)"
    )
