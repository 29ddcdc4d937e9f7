"""The quantization driver: one pass over the blocks, one packed checkpoint.

The model's blocks are loaded one at a time (``lwq.loading``), their layers'
Hessians collected (``lwq.stats``), each layer quantized (``lwq.quant``),
written back so that later blocks see it in sequential mode, packed
(``lwq.pack``), and the block's file written before the next block is read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet, build_calibration_set
from lwq.config import LwqConfig
from lwq.loading import LazyCausalLM, SafetensorsIndex
from lwq.method.driver import MethodState
from lwq.models import check_model_dir, check_tokenizer
from lwq.pack.checkpoint import CheckpointWriter, check_output_dir
from lwq.pack.layer import PackedLayer, pack_layer
from lwq.quant.gptq import GPTQSettings, gptq_quantize
from lwq.quant.grid import GridSpec
from lwq.quant.rtn import rtn_quantize
from lwq.quant.types import QuantizedWeight
from lwq.stats import iter_block_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    gptq_loss: float | None  # GPTQ's proxy loss; None for RTN
    seconds: float


@dataclass(frozen=True)
class QuantizeReport:
    out: Path
    manifest: dict[str, Any]
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)

    @property
    def bits(self) -> float:
        return float(self.manifest["bits"]["from_bytes"])


def default_seq_len(model_config: Any, requested: int | None) -> int:
    if requested is not None:
        return requested
    return int(min(2048, getattr(model_config, "max_position_embeddings", 2048)))


def quantize_layer(
    name: str, W: torch.Tensor, H: torch.Tensor | None, config: LwqConfig
) -> tuple[QuantizedWeight, float | None]:
    """Quantize one (d_out, d_in) weight with the configured method."""
    q = config.quant
    spec = GridSpec(q.bits, q.group_size, q.symmetric)
    if q.method == "rtn":
        return rtn_quantize(W, spec), None
    assert H is not None, "GPTQ needs the layer's Hessian"
    g = config.gptq
    settings = GPTQSettings(g.block_size, g.damp, g.act_order, g.static_groups)
    res = gptq_quantize(W, H, spec, settings, name=name)
    return res.weight, res.loss


def unquantized_tensors(
    index: SafetensorsIndex, adapter: ModelAdapter, quantized: set[str]
) -> dict[str, torch.Tensor]:
    """Every tensor of the base checkpoint that is not a quantized weight, model-named."""
    out = {}
    with index.reading():
        for key in index.weight_map:
            name = adapter.model_key(key)
            if name.endswith(".weight") and name[: -len(".weight")] in quantized:
                continue
            out[name] = index.get(key)
    return out


def prepare_lwq(
    config: LwqConfig, progress: bool = True
) -> tuple[Any, Any, CalibrationSet, MethodState, int]:
    """Load the model, build the calibration set, compute the method's state.

    Returns (full-precision model, tokenizer, calibration set, state, seq_len).
    """
    from lwq.adapters import adapter_for
    from lwq.method.driver import prepare
    from lwq.models import load_model_dir

    model_dir = Path(str(config.model))
    model, tokenizer = load_model_dir(model_dir, device=config.device)
    check_tokenizer(tokenizer, int(model.config.vocab_size), model_dir)
    c = config.calib
    seq_len = default_seq_len(model.config, c.seq_len)
    calib = build_calibration_set(tokenizer, str(c.source), c.n_samples, seq_len, c.seed)
    state = prepare(model, adapter_for(model.config.model_type), calib, config, progress)
    return model, tokenizer, calib, state, seq_len


def quantize_lwq(config: LwqConfig, progress: bool = True) -> QuantizeReport:
    """``--method lwq``: sensitivity profile, QP allocation, mixed 4/2-bit layers."""
    from lwq.method.driver import allocate, quantize_allocation

    t0 = time.perf_counter()
    model_dir, out = Path(str(config.model)), Path(str(config.out))
    model, _, calib, state, _ = prepare_lwq(config, progress)
    del model
    alloc = allocate(state, config)
    manifest = quantize_allocation(model_dir, out, state, alloc, calib, config, progress)
    return QuantizeReport(out.resolve(), manifest, time.perf_counter() - t0)


def quantize(config: LwqConfig, progress: bool = True) -> QuantizeReport:
    """Quantize ``config.model`` into ``config.out``; returns what was measured."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    config.require("model", "out")
    if config.quant.method != "rtn":
        config.require("calib.source")
    model_dir, out = Path(str(config.model)), Path(str(config.out))
    check_model_dir(model_dir)
    check_output_dir(out, config.overwrite)  # before any expensive work
    if config.quant.method == "lwq":
        return quantize_lwq(config, progress)
    source = LazyCausalLM(model_dir, device=config.device)
    adapter = source.adapter
    calib: CalibrationSet | None = None
    if config.quant.method != "rtn":
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_tokenizer(tokenizer, int(source.model.config.vocab_size), model_dir)
        c = config.calib
        seq_len = default_seq_len(source.model.config, c.seq_len)
        calib = build_calibration_set(tokenizer, str(c.source), c.n_samples, seq_len, c.seed)
    layer_reports: list[LayerReport] = []
    block_seconds: list[float] = []

    def quantize_block(
        index: int, layers: dict[str, Any], hessians: dict[str, torch.Tensor]
    ) -> list[PackedLayer]:
        packed = []
        for name, mod in layers.items():
            t = time.perf_counter()
            W = adapter.read_weight(mod)
            qw, loss = quantize_layer(name, W, hessians.get(name), config)
            adapter.write_weight(mod, qw.dequantize())  # later blocks see it (sequential)
            packed.append(pack_layer(name, qw))
            layer_reports.append(LayerReport(name, qw.shape, loss, time.perf_counter() - t))
        return packed

    try:
        with CheckpointWriter(out, model_dir, config.overwrite) as writer:
            tb = time.perf_counter()
            if calib is None:  # RTN needs no statistics: just walk the blocks
                source.after_capture()  # RTN needs no embeddings at all
                n_blocks = len(source.blocks)
                for i in tqdm(range(n_blocks), desc="blocks (rtn)", disable=not progress):
                    with source.block(i) as block:
                        layers = {
                            f"{adapter.blocks}.{i}.{n}": m
                            for n, m in adapter.block_linears(block).items()
                        }
                        writer.add_block(i, quantize_block(i, layers, {}))
                    block_seconds.append(time.perf_counter() - tb)
                    tb = time.perf_counter()
            else:
                for step in iter_block_stats(
                    source, calib, config.calib.mode, config.calib.batch_size, progress
                ):
                    writer.add_block(
                        step.index, quantize_block(step.index, step.layers, step.hessians)
                    )
                    block_seconds.append(time.perf_counter() - tb)
                    tb = time.perf_counter()
            quantized = {r.name for r in layer_reports}
            writer.add_rest(unquantized_tensors(source.index, adapter, quantized))
            quantization = {
                "method": config.quant.method,
                "settings": config.model_dump(mode="json"),
                "calibration": None
                if calib is None
                else {
                    "source": calib.source,
                    "n_samples": calib.n_samples,
                    "seq_len": calib.seq_len,
                    "seed": calib.seed,
                    "sha256": calib.sha256,
                },
            }
            manifest = writer.finish(source.model.config.to_dict(), quantization)
    finally:
        source.close()
    return QuantizeReport(
        out.resolve(), manifest, time.perf_counter() - t0, layer_reports, block_seconds
    )
