"""Packed layers at inference: the compute layout, the native kernels and the
pure-torch path give the dequantised layer's outputs."""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from lwq.errors import ChecksumError, ConfigError, ModelLoadError
from lwq.pack.layer import PackedLayer, pack_layer
from lwq.quant.grid import GridSpec
from lwq.quant.rtn import rtn_quantize
from lwq.runtime import native
from lwq.runtime.module import HalfLinear, QuantLinear

PATHS = ["native", "torch"]


@pytest.fixture(params=PATHS)
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LWQ_KERNELS", request.param)
    if request.param == "native" and native.kernels() is None:
        pytest.fail("the native kernels did not build on this machine")
    return str(request.param)


def _mask(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "dense":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "columns":
        cols = torch.rand(shape[1], generator=g) < 0.2
        return cols[None, :].expand(shape).contiguous()
    ratio = {"sparse": 0.01, "tenth": 0.1, "mid": 0.3}[kind]
    return torch.rand(shape, generator=g) < ratio


def _layer(
    shape: tuple[int, int], bits: int, group: int, mask_kind: str, hi_bits: int, sym: bool = False
) -> tuple[PackedLayer, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, bits, group, mask_kind)).encode()))
    w = torch.randn(shape, generator=g)
    mask = _mask(mask_kind, shape, g)
    lo = GridSpec(bits, group, sym)
    hi = None if mask is None else GridSpec(hi_bits, group, sym)
    qw = rtn_quantize(w, lo, mask, hi)
    return pack_layer("blocks.0.mlp.up_proj", qw), qw.dequantize()


SHAPES = [(96, 256), (33, 100), (64, 576)]  # whole groups; ragged; SmolLM2's short last group
CASES = [
    (bits, group, mask, hi)
    for bits in (2, 3, 4, 8)
    for group, mask, hi in [
        (128, "none", 4),
        (64, "sparse", 4),
        (128, "tenth", 4),
        (32, "mid", 8),
        (-1, "dense", 4),
        (48, "columns", 16),
        (128, "empty", 4),
    ]
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-g{c[1]}-{c[2]}-hi{c[3]}")
def test_packed_layer_computes_the_dequantised_layer(case: tuple, kernel_path: str) -> None:
    bits, group, mask, hi = case
    for shape in SHAPES:
        packed, ref = _layer(shape, bits, group, mask, hi)
        layer = QuantLinear(packed, torch.randn(shape[0]), transposed=False)
        assert torch.equal(layer.weight_fp(), ref)  # the same floats, not just close
        for rows in (1, 3, 8, 9, 40):  # matrix-vector kernel up to 8 rows, then dequantise
            x = torch.randn(rows, shape[1])
            want = torch.nn.functional.linear(x, ref, layer.bias)
            got = layer(x)
            scale = want.abs().max().item() + 1.0
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * scale)


def test_symmetric_grids_and_leading_dims(kernel_path: str) -> None:
    packed, ref = _layer((40, 160), 3, 32, "sparse", 4, sym=True)
    layer = QuantLinear(packed, None, transposed=True)
    x = torch.randn(2, 1, 160)
    got = layer(x)
    assert got.shape == (2, 1, 40)
    torch.testing.assert_close(got, x @ ref.T, rtol=0, atol=1e-4)


def test_the_layout_keeps_about_the_bytes_on_disk() -> None:
    for bits, group, mask in [(4, 128, "none"), (2, 64, "none"), (2, 128, "sparse")]:
        packed, _ = _layer((256, 1024), bits, group, mask, 4)
        layer = QuantLinear(packed, None, transposed=False)
        assert layer.nbytes <= 1.2 * packed.nbytes, (bits, group, mask, layer.nbytes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_in", [64, 100, 7])
def test_half_head_computes_in_float32(dtype: torch.dtype, n_in: int, kernel_path: str) -> None:
    w = torch.randn(50, n_in).to(dtype)
    bias = torch.randn(50)
    head = HalfLinear(w, bias)
    for rows in (1, 5, 12):
        x = torch.randn(rows, n_in)
        want = torch.nn.functional.linear(x, w.float(), bias)
        torch.testing.assert_close(head(x), want, rtol=0, atol=1e-4)


def test_a_damaged_layer_is_refused_by_name() -> None:
    packed, _ = _layer((32, 64), 2, 32, "sparse", 4)
    off, length = packed.sections["codes_lo"]
    cut = dict(packed.sections, codes_lo=(off, length - 1))
    with pytest.raises(ChecksumError, match=r"layer blocks\.0\.mlp\.up_proj: .*codes_lo"):
        QuantLinear(dataclasses.replace(packed, sections=cut), None, transposed=False)
    newer = dataclasses.replace(packed, version=2)
    with pytest.raises(ModelLoadError, match=r"layer blocks\.0\.mlp\.up_proj: packed format v2"):
        QuantLinear(newer, None, transposed=False)


def test_without_a_compiler_one_warning_and_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("LWQ_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("LWQ_KERNELS", "auto")
    packed, ref = _layer((24, 64), 4, 32, "sparse", 8)
    layer = QuantLinear(packed, None, transposed=False)
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(layer(x), x @ ref.T, rtol=0, atol=1e-4)
    said = [w for w in caught if "pure-torch path" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "no C compiler" in str(said[0].message)
    assert not any((tmp_path / "kernels").glob("*.so"))
    monkeypatch.setenv("LWQ_KERNELS", "native")
    monkeypatch.setattr(native, "_failed", None)
    with pytest.raises(ConfigError, match="LWQ_KERNELS=native"):
        native.kernels()
    monkeypatch.setenv("LWQ_KERNELS", "fast")
    with pytest.raises(ConfigError, match="LWQ_KERNELS='fast': choose one of auto, native, torch"):
        native.kernels()


def test_a_failed_build_leaves_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    target = tmp_path / "out" / "lib.so"
    with pytest.raises(OSError, match="failed"):
        native.build(target)
    assert not target.exists() and not any(target.parent.iterdir())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_packed_model_decodes_like_the_dequantised_one(
    model_type: str, tmp_path: Path, kernel_path: str
) -> None:
    from tiny_models import save_tiny_model_dir

    import lwq
    from lwq.config import make_config
    from lwq.pack.checkpoint import load_quantized
    from lwq.quantize import quantize
    from lwq.runtime.module import GatedMLP, HalfEmbedding

    model_dir = save_tiny_model_dir(model_type, tmp_path / "m")  # stored in float16
    cfg = make_config(
        {
            "model": str(model_dir),
            "out": str(tmp_path / "q"),
            "quant": {"method": "rtn", "bits": 3, "group_size": 32},
        }
    )
    report = quantize(cfg, progress=False)
    dense, _, manifest = load_quantized(report.out)
    packed, _, _ = lwq.load(str(report.out))  # packed by default
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(manifest.layers)
    assert isinstance(packed.get_input_embeddings(), HalfEmbedding)
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        want = dense.generate(ids, max_new_tokens=12, do_sample=False)
        got = packed.generate(ids, max_new_tokens=12, do_sample=False)  # one row per step
    assert torch.equal(got, want)
    grouped = {
        name.rsplit(".", 1)[1]
        for name, m in packed.named_modules()
        if isinstance(m, QuantLinear) and m.siblings is not None
    }  # layers that read one input, computed together when decoding
    assert grouped == (
        {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} if model_type == "llama" else set()
    )
    mlps = [m.forward for m in packed.modules() if isinstance(m.forward, GatedMLP)]
    assert len(mlps) == (len(layers) // 7 if model_type == "llama" else 0)  # one call per MLP
    assert all(mlp.checked == (kernel_path == "native") for mlp in mlps)
    files = manifest.bits.quantized_file_bytes + manifest.bits.unquantized_bytes
    seen, held = set(), 0
    for t in [*packed.parameters(), *packed.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    assert held <= 1.2 * files, (held, files)


def test_entries_too_wide_for_16_bits(kernel_path: str) -> None:
    packed, ref = _layer((6, 4100), 2, -1, "sparse", 4)  # 13 column bits + 5 code bits
    layer = QuantLinear(packed, None, transposed=False)
    assert layer.layout.hi_entries is not None and layer.layout.hi_entries.dtype == torch.int32
    assert torch.equal(layer.weight_fp(), ref)
    for rows in (1, 2, 30):
        x = torch.randn(rows, 4100)
        torch.testing.assert_close(layer(x), x @ ref.T, rtol=0, atol=1e-3)


def test_each_density_of_high_impact_weights_gets_its_layout() -> None:
    sparse, _ = _layer((64, 256), 2, 64, "sparse", 4)  # under one entry per group
    tenth, _ = _layer((64, 256), 2, 128, "tenth", 4)  # about thirteen per group
    many, _ = _layer((64, 256), 2, 32, "mid", 4)  # 30 % of the weights
    ragged, _ = _layer((64, 100), 2, 32, "mid", 4)  # groups not of whole blocks
    assert QuantLinear(sparse, None, False).layout.hi_cols is not None
    assert QuantLinear(tenth, None, False).layout.hi_counts is not None
    dense = QuantLinear(many, None, False).layout
    assert dense.hi_grid_codes is not None and dense.rowptr is None
    assert QuantLinear(ragged, None, False).layout.hi_grid_codes is None


class _Attention(torch.nn.Module):
    """Three layers reading one input, and a fourth reading another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (
            QuantLinear(_layer((n, 64), 2, 32, "tenth", 4)[0], None, False)
            for n in (64, 32, 32, 64)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(q * torch.cat([k, v], dim=-1))


def test_layers_reading_one_input_compute_together(kernel_path: str) -> None:
    from lwq.runtime.module import share_inputs

    model = _Attention()
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        want = model(x)  # no groups yet: the first pass records
        share_inputs(model)
        assert torch.equal(model(x), want)  # the recording pass
        assert model.q.siblings is None
        assert torch.equal(model(x), want)  # groups are made when the next pass begins
        group = model.q.siblings
        assert group is not None and group.members == [model.q, model.k, model.v]
        assert model.o.siblings is None
        with torch.inference_mode():
            assert torch.equal(model(x.clone()), want)
        # an input changed in place is computed again, never served stale
        y = x.clone()
        model.q(y)  # k and v computed ahead for y
        y.mul_(2.0)
        torch.testing.assert_close(model.k(y), y @ model.k.weight_fp().T, rtol=0, atol=1e-4)
        if kernel_path == "native":  # (the torch path computes each layer alone)
            for _ in range(group.MAX_WASTED):
                model.q(torch.randn(1, 1, 64))  # k and v computed ahead, never used
            assert model.q.siblings is None and model.k.siblings is None
        assert torch.equal(model(x), want)


class _MLP(torch.nn.Module):
    """A gated MLP of packed layers; ``swap`` makes it compute act(up) * gate."""

    def __init__(self, act: torch.nn.Module, bias: bool = False, swap: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)

        def layer(shape: tuple[int, int], mask: str) -> QuantLinear:
            b = torch.randn(shape[0], generator=g) if bias else None
            return QuantLinear(_layer(shape, 2, 32, mask, 4)[0], b, False)

        self.gate_proj = layer((64, 96), "tenth")
        self.up_proj = layer((64, 96), "sparse")
        self.down_proj = layer((96, 64), "tenth")
        self.act_fn, self.swap = act, swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.swap:
            g, u = u, g
        return self.down_proj(self.act_fn(g) * u)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_gated_mlp_computes_in_one_call(act: str, bias: bool, kernel_path: str) -> None:
    from lwq.runtime.module import GatedMLP, fuse_mlps

    fn = torch.nn.SiLU() if act == "silu" else torch.nn.GELU(approximate="tanh")
    mlp = _MLP(fn, bias)
    inputs = [torch.randn(shape) for shape in [(1, 96), (1, 1, 96), (3, 96), (2, 4, 96), (12, 96)]]
    with torch.no_grad():
        wants = [mlp(x) for x in inputs]
        assert fuse_mlps(mlp) == 1 and isinstance(mlp.forward, GatedMLP)
        assert mlp.forward.act == act and fuse_mlps(mlp) == 0  # once
        for x, want in zip(inputs, wants, strict=True):
            got = mlp(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * (want.abs().max().item() + 1))
        assert mlp.forward.checked == (kernel_path == "native")
        torch.testing.assert_close(mlp(x=inputs[0]), wants[0])  # by keyword: its own forward
        mlp.float()  # buffers may move: the native call is bound again
        assert mlp.forward._bound is None
        want = wants[0]
        torch.testing.assert_close(
            mlp(inputs[0]), want, rtol=0, atol=1e-5 * want.abs().max().item()
        )


def test_an_mlp_that_computes_otherwise_keeps_its_forward(kernel_path: str) -> None:
    from lwq.runtime.module import GatedMLP, fuse_mlps

    assert fuse_mlps(_MLP(torch.nn.GELU())) == 0  # exact GELU: not a native activation
    mlp = _MLP(torch.nn.SiLU(), swap=True)  # act(up) * gate, by its own forward
    x = torch.randn(1, 96)
    with torch.no_grad():
        want = mlp(x)
        assert fuse_mlps(mlp) == 1
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)  # checked against its forward
        if kernel_path == "native":
            assert not isinstance(mlp.forward, GatedMLP) and mlp.down_proj.mlp is None
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-5)
