"""The quantization driver end to end on tiny models, and its bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ZOO
from tiny_models import GENERIC_TYPES, save_tiny_model_dir

from lwq.adapters import adapter_for
from lwq.config import make_config
from lwq.errors import ConfigError, ModelLoadError
from lwq.models import load_model_dir
from lwq.pack.checkpoint import ChecksumError, load_quantized, read_manifest
from lwq.quant.grid import GridSpec
from lwq.quant.rtn import rtn_quantize
from lwq.quantize import quantize

CALIB = ZOO / "data" / "calibration.txt"


def _cfg(model: Path, out: Path, **quant: Any) -> Any:
    data: dict[str, Any] = {
        "model": str(model),
        "out": str(out),
        "quant": {"method": "gptq", "bits": 4, "group_size": 32, **quant},
    }
    if data["quant"]["method"] != "rtn":  # RTN takes no calibration settings
        data["calib"] = {"source": str(CALIB), "n_samples": 8, "seq_len": 64, "batch_size": 4}
    return make_config(data)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox"])
def test_rtn_checkpoint_equals_in_memory_rtn(model_type: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(model_type, tmp_path / "m")
    report = quantize(_cfg(model_dir, tmp_path / "q", method="rtn", bits=3), progress=False)
    ref, tok = load_model_dir(model_dir)
    adapter = adapter_for(ref.config.model_type)
    for _, mod in adapter.iter_layers(ref):
        adapter.write_weight(
            mod, rtn_quantize(adapter.read_weight(mod), GridSpec(3, 32)).dequantize()
        )
    loaded, _, manifest = load_quantized(report.out)
    packed, _, _ = load_quantized(report.out, packed_modules=True)
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    bits = manifest.bits
    assert bits.from_bytes == pytest.approx(bits.from_model, rel=0.01)
    assert len(manifest.layers) == 2 * len(adapter.linears)
    assert manifest.quantization.mode is None and manifest.quantization.calibration is None


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_gptq_checkpoint_loads_and_predicts(mode: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q")
    cfg = make_config({**cfg.model_dump(), "calib": {**cfg.calib.model_dump(), "mode": mode}})
    report = quantize(cfg, progress=False)
    assert all(r.gptq_loss is not None and r.gptq_loss >= 0 for r in report.layers)
    model, _, manifest = load_quantized(report.out)
    q = manifest.quantization
    assert q.calibration is not None and q.calibration.n_samples == 8 and q.mode == mode
    ref, _ = load_model_dir(model_dir)
    ids = torch.randint(0, 4096, (1, 32))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().mean()
    assert 0 < float(diff) < 0.5  # quantized, but still the same model


def test_true_sequential_takes_each_group_hessian_after_the_groups_before_it(
    tmp_path: Path,
) -> None:
    """gptq.true_sequential: the first group of each block (q/k/v) is quantized as
    without it, the later ones from Hessians of the partly quantized block; the
    layers stay in the checkpoint's order and the setting is recorded."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    plain = quantize(_cfg(model_dir, tmp_path / "a", bits=3), progress=False)
    cfg = _cfg(model_dir, tmp_path / "b", bits=3)
    cfg = make_config({**cfg.model_dump(), "gptq": {"true_sequential": True}})
    true_seq = quantize(cfg, progress=False)
    assert [r.name for r in true_seq.layers] == [r.name for r in plain.layers]
    first = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    block0 = [r for r in true_seq.layers if r.name.startswith("model.layers.0.")]
    for r, p in zip(true_seq.layers, plain.layers, strict=True):
        if r in block0 and r.name.split(".", 3)[3] in first:
            assert r.gptq_loss == pytest.approx(p.gptq_loss, rel=1e-6), r.name
    assert any(
        r.gptq_loss != pytest.approx(p.gptq_loss, rel=1e-3)
        for r, p in zip(block0, plain.layers, strict=False)
    )
    manifest = read_manifest(true_seq.out)
    assert manifest.quantization.settings["gptq"]["true_sequential"] is True
    assert list(manifest.layers) == list(read_manifest(plain.out).layers)


def test_existing_checkpoint_is_kept_unless_overwrite(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("gpt2", tmp_path / "m")
    first = quantize(_cfg(model_dir, tmp_path / "q", method="rtn"), progress=False)
    before = (first.out / "lwq_manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a packed checkpoint.*--overwrite"):
        quantize(_cfg(model_dir, tmp_path / "q", method="rtn", bits=2), progress=False)
    assert (first.out / "lwq_manifest.json").read_bytes() == before
    cfg = make_config(
        {**_cfg(model_dir, tmp_path / "q", method="rtn", bits=2).model_dump(), "overwrite": True}
    )
    quantize(cfg, progress=False)
    assert read_manifest(first.out).quantization.settings["quant"]["bits"] == 2


def test_failure_midway_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    calls = {"n": 0}
    import lwq.quantize as qmod

    real = qmod.pack_layer

    def flaky(name: str, qw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError("disk went away")
        return real(name, qw)

    monkeypatch.setattr(qmod, "pack_layer", flaky)
    with pytest.raises(OSError, match="disk went away"):
        quantize(_cfg(model_dir, tmp_path / "q", method="rtn"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupted_or_truncated_files_are_detected(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("opt", tmp_path / "m")
    out = quantize(_cfg(model_dir, tmp_path / "q", method="rtn"), progress=False).out
    f = out / "layers-00001.safetensors"
    original = f.read_bytes()
    data = bytearray(original)
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"layers-00001\.safetensors is corrupted or truncated"):
        load_quantized(out)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(ChecksumError, match="truncated"):
        read_manifest(out)
    f.write_bytes(original)
    read_manifest(out)
    (out / "rest.safetensors").unlink()
    with pytest.raises(ChecksumError, match="missing"):
        read_manifest(out)


def test_bad_inputs_name_the_setting(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    with pytest.raises(ConfigError, match=r"quant\.bits"):
        _cfg(model_dir, tmp_path / "q", bits=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        quantize(_cfg(empty, tmp_path / "q"), progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\u00efve caf\u00e9 ".encode("latin-1") * 500)
    cfg = make_config(
        {
            **_cfg(model_dir, tmp_path / "q").model_dump(),
            "calib": {"source": str(latin), "n_samples": 2, "seq_len": 16},
        }
    )
    with pytest.raises(ConfigError, match=r"--calib .*not UTF-8"):
        quantize(cfg, progress=False)
    assert not (tmp_path / "q").exists()


def test_group_size_that_does_not_divide_uses_a_short_last_group(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")  # d_in 64 and 128
    out = quantize(_cfg(model_dir, tmp_path / "q", group_size=48), progress=False).out
    m = read_manifest(out)
    assert m.bits.from_bytes == pytest.approx(m.bits.from_model, rel=0.01)
    model, _, _ = load_quantized(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_checkpoint_files_honour_the_umask(tmp_path: Path) -> None:
    """safetensors creates 0600 files; a serving user must be able to read them."""
    import os

    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    old = os.umask(0o027)
    try:
        out = quantize(_cfg(model_dir, tmp_path / "q", method="rtn"), progress=False).out
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_settings_that_do_not_apply_are_refused_before_anything_runs(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    with pytest.raises(ConfigError, match=r"quant\.symmetric does not apply to quant\.method=lwq"):
        make_config({"model": str(model_dir), "quant": {"method": "lwq", "symmetric": True}})
    with pytest.raises(ConfigError, match=r"quant\.group_size does not apply.*method\.group_size"):
        make_config({"quant": {"method": "lwq", "group_size": 64}})
    with pytest.raises(ConfigError, match=r"method\.budget does not apply to quant\.method=gptq"):
        make_config({"quant": {"method": "gptq"}, "method": {"budget": 3.0}})
    with pytest.raises(ConfigError, match=r"gptq\.damp, calib\.source do not apply.*=rtn"):
        make_config(
            {"quant": {"method": "rtn"}, "calib": {"source": str(CALIB)}, "gptq": {"damp": 0.1}}
        )
    cfg = make_config(
        {**_cfg(model_dir, tmp_path / "q").model_dump(), "pipeline": {"work_dir": "elsewhere"}}
    )
    with pytest.raises(ConfigError, match=r"pipeline\.work_dir does not apply to lwq quantize"):
        quantize(cfg, progress=False)
    assert not (tmp_path / "q").exists()
    # A dumped configuration loads back: what does not apply sits at its default.
    lwq = make_config({"quant": {"method": "lwq"}, "method": {"budget": 2.7}})
    assert make_config(lwq.model_dump()) == lwq


def test_a_zoo_model_calibrates_on_the_zoo_slice_by_default(tmp_path: Path) -> None:
    cfg = make_config({"model": str(ZOO / "llama-6l-128d"), "quant": {"method": "gptq"}})
    from lwq.config import resolve_inputs

    assert resolve_inputs(cfg).calib.source == str(CALIB)
    assert resolve_inputs(cfg).pipeline.eval_data is None
    assert resolve_inputs(cfg, evaluation=True).pipeline.eval_data == str(
        ZOO / "data" / "validation.txt"
    )
    rtn = make_config({"model": str(ZOO / "llama-6l-128d"), "quant": {"method": "rtn"}})
    assert resolve_inputs(rtn).calib.source is None  # RTN takes no calibration


@pytest.mark.parametrize("model_type", GENERIC_TYPES)
def test_any_decoder_family_is_quantized_packed_reloaded_and_evaluated(
    model_type: str, tmp_path: Path
) -> None:
    """Families without a declared adapter: blocks and layers discovered."""
    from lwq.eval.perplexity import perplexity_of_text

    model_dir = save_tiny_model_dir(model_type, tmp_path / "m")
    report = quantize(_cfg(model_dir, tmp_path / "q", bits=4), progress=False)
    ref, tok = load_model_dir(model_dir)
    n_linear = sum(1 for _ in adapter_for(ref).iter_layers(ref))
    assert len(report.manifest.layers) == n_linear > 0
    model, _, _ = load_quantized(report.out)
    packed, _, _ = load_quantized(report.out, packed_modules=True)
    ids = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        torch.testing.assert_close(packed(input_ids=ids).logits, got, rtol=1e-4, atol=1e-4)
    text = CALIB.read_text(encoding="utf-8")[:3000]
    fp = perplexity_of_text(ref, tok, text, 32).perplexity
    q = perplexity_of_text(model, tok, text, 32).perplexity
    assert abs(q - fp) / fp < 0.2, (q, fp)  # W4 of a random model: close, not equal


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "falcon"])
def test_the_method_runs_on_discovered_families(model_type: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(model_type, tmp_path / "m")
    cfg = make_config(
        {
            "model": str(model_dir),
            "out": str(tmp_path / "q"),
            "calib": {"source": str(CALIB), "n_samples": 4, "seq_len": 32, "batch_size": 4},
            "quant": {"method": "lwq"},
            "method": {
                "budget": 2.6,
                "group_size": 32,
                "profile_samples": 8,
                "profile_seq_len": 16,
                "ties": "inputs",
            },
        }
    )
    report = quantize(cfg, progress=False)
    assert abs(report.bits - 2.6) <= 0.02
    model, _, _ = load_quantized(report.out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
