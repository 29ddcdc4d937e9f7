"""A causal LM whose decoder blocks are loaded one at a time.

The model is built on the meta device (buffers such as rotary frequencies are
real), the non-block parameters (embeddings, final norm, head) are loaded, and
each block's parameters are read from the memory-mapped safetensors files only
while the block is being processed. A model larger than RAM can be quantized
this way: peak memory is the non-block parameters, one block in float32, and
the calibration activations of one block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lwq.adapters import ModelAdapter, adapter_for
from lwq.errors import ModelLoadError
from lwq.models import check_model_dir, empty_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SafetensorsIndex:
    """Maps tensor names to the (memory-mapped) safetensors file that holds them.

    Files are opened only inside ``reading()``: a mapping left open keeps every
    page it touched resident, which would count the whole model in the RSS.
    """

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(
                    f"--model {path}: lazy loading needs safetensors weights; convert "
                    "pytorch_model.bin with save_pretrained(safe_serialization=True)"
                )
            weight_map = {}
            for f in files:
                weight_map.update(dict.fromkeys(_keys(f), f.name))
        self.path = path
        self.weight_map = weight_map
        self._handles: dict[str, Any] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Keep the files open for a batch of ``get`` calls, then unmap them."""
        if self._handles is not None:  # nested: the outer call owns the handles
            yield
            return
        self._handles = {}
        try:
            with ExitStack() as stack:
                self._stack = stack
                yield
        finally:
            self._handles = None

    def get(self, key: str) -> torch.Tensor:
        """A copy of the tensor (never a view of the mapping)."""
        from safetensors import safe_open

        with self.reading():
            assert self._handles is not None
            fname = self.weight_map[key]
            if fname not in self._handles:
                self._handles[fname] = self._stack.enter_context(
                    safe_open(str(self.path / fname), framework="pt")
                )
            return self._handles[fname].get_tensor(key).clone()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with callers."""


def _keys(f: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        return list(h.keys())


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Parameters that share another's storage (lm_head -> embeddings when tied)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(model.config, "tie_word_embeddings", False):
        return {}
    return dict(tied)


class LazyCausalLM:
    """A Hugging Face causal LM with its decoder blocks loaded on demand."""

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        load_head: bool = False,
    ):
        from transformers import AutoConfig

        check_model_dir(path)
        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype
        config = AutoConfig.from_pretrained(path)
        model = empty_model(config, dtype)
        self.adapter: ModelAdapter = adapter_for(model)
        self.model: PreTrainedModel = model
        self.index = SafetensorsIndex(self.path)
        self._renamed = {
            self.adapter.model_key(k): k
            for k in self.index.weight_map
            if self.adapter.model_key(k) != k
        }
        self.blocks = self.adapter.get_blocks(model)
        self._block_prefix = self.adapter.blocks + "."
        # The LM head is not needed to collect statistics (inputs are captured
        # through the base model); unless asked for, it stays on the meta device.
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        skip = set() if load_head or head is None or tied else {id(head.weight)}
        self._load_params(
            [
                n
                for n, p in model.named_parameters()
                if not n.startswith(self._block_prefix) and id(p) not in skip
            ]
        )
        for name, buf in model.named_buffers():  # rotary frequencies etc.
            if not name.startswith(self._block_prefix):
                set_tensor(model, name, buf.to(self.device))

    def _ckpt_key(self, name: str) -> str | None:
        if name in self._renamed:
            return self._renamed[name]
        if name in self.index:
            return name
        # Checkpoints saved from the base model lack its prefix (old GPT-2 files).
        prefix = getattr(self.model, "base_model_prefix", "")
        stripped = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
        return stripped if stripped is not None and stripped in self.index else None

    def _load_params(self, names: list[str]) -> None:
        tied = tied_sources(self.model)
        deferred: list[str] = []
        with self.index.reading():
            self._load_named(names, tied, deferred)
        for name in deferred:  # tied weights share their source parameter
            set_tensor(self.model, name, self.model.get_parameter(tied[name]))

    def _load_named(self, names: list[str], tied: dict[str, str], deferred: list[str]) -> None:
        for name in names:
            key = self._ckpt_key(name)
            if key is None:
                if name in tied:
                    deferred.append(name)
                    continue
                raise ModelLoadError(f"--model {self.path}: the checkpoint has no tensor {name}")
            value = self.index.get(key).to(device=self.device, dtype=self.dtype)
            set_tensor(self.model, name, nn.Parameter(value, requires_grad=False))

    def load_block(self, i: int) -> nn.Module:
        """Read block ``i``'s parameters from disk (float32, on the device)."""
        prefix = f"{self._block_prefix}{i}."
        names = [prefix + n for n, _ in self.blocks[i].named_parameters()]
        self._load_params(names)
        for n, buf in self.blocks[i].named_buffers():
            set_tensor(self.model, prefix + n, buf.to(self.device))
        return self.blocks[i]

    def after_capture(self) -> None:
        """Block inputs are captured: the embeddings are no longer needed."""
        for name, p in self.model.named_parameters():
            if not name.startswith(self._block_prefix) and p.device.type != "meta":
                set_tensor(
                    self.model,
                    name,
                    nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False),
                )

    def unload_block(self, i: int) -> None:
        """Drop block ``i``'s parameters (back to the meta device)."""
        self.blocks[i].to("meta")

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        try:
            yield self.load_block(i)
        finally:
            self.unload_block(i)

    def close(self) -> None:
        self.index.close()


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at the parameter or buffer ``name`` (replacing a meta tensor)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(value, nn.Parameter) or attr in owner._parameters:
        owner._parameters[attr] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    else:
        owner._buffers[attr] = value


def read_layer_weights(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The (d_out, d_in) float32 weights of the named quantizable layers, from disk.

    Reads only those tensors (memory-mapped), so one layer of a large model can
    be quantized without building the model: what a per-layer task needs.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    adapter = adapter_for(config)
    index = SafetensorsIndex(Path(path))
    renamed = {adapter.model_key(k): k for k in index.weight_map}
    prefix = adapter.blocks.split(".", 1)[0] + "."
    out = {}
    try:
        with index.reading():
            for name in names:
                key = renamed.get(name + ".weight")
                if key is None and name.startswith(prefix):  # saved from the base model
                    key = renamed.get(name[len(prefix) :] + ".weight")
                if key is None:
                    raise ModelLoadError(f"--model {path}: the checkpoint has no weight of {name}")
                w = index.get(key).to(torch.float32)
                out[name] = (w.t() if adapter.transposed else w).contiguous()
    finally:
        index.close()
    return out
