"""--method lwq end to end on a tiny model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ZOO
from tiny_models import save_tiny_model_dir

from lwq.config import MethodConfig, make_config
from lwq.errors import ConfigError, LwqError
from lwq.pack.checkpoint import load_quantized
from lwq.quantize import quantize

REVERSE_ONLY = ("profile_samples", "profile_seq_len")


def _cfg(model: Path, out: Path, budget: float, **method: Any) -> Any:
    return make_config(
        {
            "model": str(model),
            "out": str(out),
            "calib": {
                "source": str(ZOO / "data" / "calibration.txt"),
                "n_samples": 4,
                "seq_len": 32,
                "batch_size": 4,
            },
            "quant": {"method": "lwq"},
            "method": {
                "budget": budget,
                "group_size": 32,
                "profile_samples": 8,
                "profile_seq_len": 16,
                **method,
            },
        }
    )


@pytest.mark.parametrize(
    ("objective", "profile"), [("full", "reverse"), ("fixed", "reverse"), ("full", "forward")]
)
def test_budget_is_met_from_bytes_and_report_is_complete(
    objective: str, profile: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    method: dict[str, Any] = {"objective": objective, "profile": profile}
    if profile == "forward":
        defaults = {k: MethodConfig.model_fields[k].default for k in REVERSE_ONLY}
        method.update(defaults, sketch_dim=16)  # the reverse profile's settings back to defaults
    with caplog.at_level(logging.WARNING):
        report = quantize(_cfg(model_dir, tmp_path / "q", 2.7, **method), progress=False)
    if profile == "forward":
        assert "had 4 sequences (128 tokens) for 14 layers" in caplog.text
    m = report.manifest
    assert abs(m.bits.from_bytes - 2.7) <= 0.02
    alloc = m.allocation
    assert alloc is not None
    assert alloc.objective == objective and len(alloc.layers) == 14
    ratios = [x.ratio for x in alloc.layers]
    assert all(0 <= r <= 0.3 + 1e-9 for r in ratios)
    assert any(x.n_hi > 0 for x in alloc.layers)
    if objective == "fixed":
        assert max(ratios) - min(ratios) < 1e-9
    assert all(x.output_error is not None and x.output_error >= 0 for x in alloc.layers)
    tokens = 8 * 16 if profile == "reverse" else 4 * 32
    assert m.quantization.mode == "sequential" and alloc.profile.n_tokens == tokens
    model, _, _ = load_quantized(report.out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_a_calibration_set_too_small_for_the_profile_fails_before_any_work(
    tmp_path: Path,
) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q", 2.7, profile_samples=8)
    small = cfg.model_dump()
    small["method"]["profile_samples"] = 9  # 4 x 32 tokens hold 8 sequences of 16
    with pytest.raises(ConfigError, match=r"profile_samples=9 .* hold 8: raise calib\.n_samples"):
        make_config(small)
    # The same refusal from the saved state's own check, should a config bypass validation:
    bypass = cfg.model_copy(update={"method": cfg.method.model_copy(update={"profile_samples": 9})})
    with pytest.raises(ConfigError, match=r"method\.profile_samples=9 .* holds 8: raise calib"):
        quantize(bypass, progress=False)
    assert not (tmp_path / "q").exists()


def test_a_self_calibration_too_small_for_the_profile_is_refused_before_it_is_generated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the calibration set was generated for a profile it cannot hold")

    monkeypatch.setattr("lwq.calibration.generate_calibration_set", no_work)
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    args = ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "q"), "--method"]
    args += ["lwq", "--calib", "self", "--n-samples", "8", "--seq-len", "128", "--bits", "2.7"]
    assert main(args) == 2
    err = capsys.readouterr().err
    samples = MethodConfig.model_fields["profile_samples"].default
    assert f"method.profile_samples={samples}" in err and "hold 8" in err and "--n-samples" in err
    # Without --seq-len the windows are the model's context (64 tokens): none holds 128.
    assert main([*args[:-6], "--n-samples", "16", "--bits", "2.7"]) == 2
    assert "16 windows of 64 tokens (calib.seq_len) hold 0" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_unreachable_budget_fails_before_any_work_and_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded for a budget that cannot be reached")

    monkeypatch.setattr("lwq.quantize.load_model_dir", no_work)
    with pytest.raises(ConfigError, match=r"method.budget=1.5 is below the 2\.\d+ .*lo_bits"):
        quantize(_cfg(model_dir, tmp_path / "q", 1.5), progress=False)
    # 2 bits + 0.1 x 2 bits + both grids' scales cannot reach 4.0: the error names the setting.
    with pytest.raises(ConfigError, match=r"method.budget=4 is above .* raise method.r_max"):
        quantize(_cfg(model_dir, tmp_path / "q", 4.0, r_max=0.1, lo_bits=2), progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="hi_bits"):
        _cfg(model_dir, tmp_path / "q", 2.5, lo_bits=4, hi_bits=4)
    # With one base for all (here one fixed ratio), an unset base is chosen per budget,
    # and budgets sharing one profile must share it; each layer's own base (the
    # default) serves every budget.
    from lwq.sweep import sweep

    monkeypatch.setattr("lwq.sweep.load_model_dir", no_work)
    with pytest.raises(ConfigError, match=r"2\.6 -> 2 bits, 3\.8 -> 3 bits"):
        sweep(_cfg(model_dir, tmp_path / "q", 2.6, objective="fixed"), [2.6, 3.8], progress=False)
    with pytest.raises(AssertionError, match="was loaded"):  # past every check
        sweep(_cfg(model_dir, tmp_path / "q", 2.6), [2.6, 3.8], progress=False)
    assert not (tmp_path / "q").exists()


def test_one_base_follows_the_budget(tmp_path: Path) -> None:
    """With one base for all (one fixed ratio), 3.8 bits at group 32 leave room above a
    3-bit grid (3.59 bits): 3/4-bit layers."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    report = quantize(_cfg(model_dir, tmp_path / "q", 3.8, objective="fixed"), progress=False)
    assert {x.lo.bits for x in report.manifest.layers.values()} == {3}
    assert abs(report.manifest.bits.from_bytes - 3.8) <= 0.02


def test_each_layer_takes_its_own_base(tmp_path: Path) -> None:
    """method.bases=[2, 3] at 3.0 bits, group 32 (2.56 and 3.59 bits per weight for
    the bases alone): both bases in the checkpoint, the budget met from bytes, and
    the predicted loss no higher than with either base for every layer."""
    from lwq.adapters import adapter_for
    from lwq.method.qp import solve_allocation
    from lwq.method.state import allocate, prepare
    from lwq.models import load_model_dir
    from lwq.quantize import MethodPlan, calibration_set, quantize_model

    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q", 3.0, bases=[3, 2])
    assert cfg.method.bases == (2, 3)
    fp, tok = load_model_dir(model_dir)
    calib = calibration_set(cfg, tok, fp.config)
    state = prepare(fp, adapter_for(fp), calib, cfg, None, False)
    assert state.n_families == 2 and len(state.costs) == 2 * len(state.names)
    mixed = allocate(state, cfg)
    one_base = solve_allocation(*state.options([0] * len(state.names)), 3.0)
    assert mixed.predicted_loss <= one_base.predicted_loss + 1e-12
    assert len(mixed.families) == len(state.names)
    # from 3.69 bits (a 3-bit grid at group 32, 3.59 bits, and 0.1 to spare) no layer
    # is offered 2 bits; offering every base can only lower the predicted loss
    floor = allocate(state, cfg, 3.8)
    assert floor.families == (1,) * len(state.names)
    free = allocate(state, _cfg(model_dir, tmp_path / "q", 3.8, bases=[2, 3], base_floor="none"))
    assert free.predicted_loss <= floor.predicted_loss + 1e-12
    plan = MethodPlan(state, mixed)
    m = quantize_model(model_dir, tmp_path / "q", plan, calib, cfg, False).manifest
    assert m.allocation is not None
    assert {x.lo.bits for x in m.layers.values()} == {2, 3}
    assert {x.name: x.lo_bits for x in m.allocation.layers} == {
        name: x.lo.bits for name, x in m.layers.items()
    }
    assert 3.0 - 0.03 <= m.bits.from_bytes <= 3.0 + 0.02
    model, _, _ = load_quantized(tmp_path / "q")
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_settings_that_do_not_go_with_several_bases_are_refused(tmp_path: Path) -> None:
    m = tmp_path / "m"
    for bad, match in [
        ({"bases": [2, 3], "lo_bits": 2}, "exclude each other"),
        ({"bases": [2]}, "two or more"),
        ({"bases": [2, 4]}, "hi_bits=4 must exceed"),
        ({"bases": [2, 3], "objective": "fixed"}, "objective=fixed does not apply"),
        ({"bases": [2, 3], "ties": "inputs"}, "ties=inputs does not apply"),
        ({"bases": [2, 3], "profile": "forward"}, "profile=forward does not apply"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_config({"model": str(m), "quant": {"method": "lwq"}, "method": bad})


@pytest.mark.parametrize("ties", ["inputs", "block"])
def test_ties_give_one_ratio_per_group(ties: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q", 2.6, ties=ties)
    report = quantize(cfg, progress=False)
    assert report.manifest.allocation is not None
    ratios: dict[str, float] = {x.name: x.ratio for x in report.manifest.allocation.layers}
    groups: dict[tuple[str, ...], list[float]] = {}
    for name, r in ratios.items():
        block, suffix = name.split(".")[2], name.split(".", 3)[3]
        key = (
            (block,)
            if ties == "block"
            else (
                block,
                {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(
                    suffix.split(".")[-1], suffix
                ),
            )
        )
        groups.setdefault(key, []).append(r)
    assert any(len(v) > 1 for v in groups.values())
    for v in groups.values():
        assert max(v) - min(v) < 1e-6
    assert abs(report.manifest.bits.from_bytes - 2.6) <= 0.02


def test_float16_high_impact_weights_and_lwc_end_to_end(tmp_path: Path) -> None:
    """Dense-and-sparse (hi_bits=16) and learned clipping go through the same path."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    fp16 = quantize(_cfg(model_dir, tmp_path / "a", 2.6, hi_bits=16), progress=False)
    layers = fp16.manifest.layers
    assert any(v.hi is not None and v.hi.bits == 16 for v in layers.values())
    assert abs(fp16.manifest.bits.from_bytes - 2.6) <= 0.02
    lwc = quantize(
        _cfg(model_dir, tmp_path / "b", 2.6, hi_refine="lwc", lwc_steps=5), progress=False
    )
    assert abs(lwc.manifest.bits.from_bytes - 2.6) <= 0.02
    for report in (fp16, lwc):
        model, _, _ = load_quantized(report.out)
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    with pytest.raises(ConfigError, match="hi_bits"):
        _cfg(model_dir, tmp_path / "c", 2.6, hi_bits=5)


def test_column_structured_high_impact_set_end_to_end(tmp_path: Path) -> None:
    """method.structure=columns: whole input columns on the high grid, a column map
    in the file, the budget met from bytes, and the same model after reloading."""
    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    report = quantize(_cfg(model_dir, tmp_path / "q", 2.7, structure="columns"), progress=False)
    m = report.manifest
    assert abs(m.bits.from_bytes - 2.7) <= 0.02
    masked = {k: v for k, v in m.layers.items() if v.n_hi > 0}
    assert masked and all(v.mask_encoding == "columns" for v in masked.values())
    for v in masked.values():
        assert v.n_hi % v.shape[0] == 0  # whole columns
    model, _, _ = load_quantized(report.out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize(("family", "bases"), [("llama", None), ("gpt2", None), ("llama", [2, 3])])
def test_layer_by_layer_checkpoint_equals_the_parallel_pass(
    family: str, bases: list[int] | None, tmp_path: Path
) -> None:
    """What a flow does (state and Hessians saved, layers quantized one by one from
    files, then assembled) gives the same bytes as the one-pass parallel-mode driver
    (with method.bases too: each layer on its own base)."""
    from lwq.adapters import adapter_for
    from lwq.calibration import CalibrationSet, build_calibration_set
    from lwq.loading import read_layer_weights
    from lwq.method.state import HessianStore, load_state, prepare, save_state
    from lwq.models import load_model_dir
    from lwq.pack.checkpoint import iter_packed_layers, read_manifest
    from lwq.pack.layer import PackedLayer, pack_layer
    from lwq.quant.layer import quantize_layer
    from lwq.quantize import MethodPlan, assemble_checkpoint, plan_for, quantize_model

    model_dir = save_tiny_model_dir(family, tmp_path / "m")
    one_base = {"lo_bits": 2} if bases is None else {}  # [2, 3]: the default bases
    cfg = _cfg(model_dir, tmp_path / "a", 2.7, **one_base)
    cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"mode": "parallel"})})
    model, tok = load_model_dir(model_dir)
    adapter = adapter_for(model.config.model_type)
    calib = build_calibration_set(tok, str(ZOO / "data" / "calibration.txt"), 4, 32, 0)
    calib.save(tmp_path / "calib.safetensors")
    calib = CalibrationSet.load(tmp_path / "calib.safetensors")
    state = prepare(model, adapter, calib, cfg, tmp_path / "state" / "hessians", progress=False)
    plan = plan_for(cfg, state)
    assert isinstance(plan, MethodPlan)
    one_pass = quantize_model(model_dir, tmp_path / "a", plan, calib, cfg, False).manifest
    # From the Hessians prepare stored, without a calibration pass: the same bytes.
    store = HessianStore.open(tmp_path / "state" / "hessians")
    stored = quantize_model(model_dir, tmp_path / "s", plan, calib, cfg, False, store).manifest
    assert stored.files == one_pass.files

    save_state(state, tmp_path / "state")
    light = load_state(tmp_path / "state", expect_code=state.code_version)
    assert light.names == state.names and torch.equal(light.profile.AtA, state.profile.AtA)
    assert light.bases == state.bases == tuple(bases or [2])
    assert torch.equal(light.profile.BtB, state.profile.BtB)
    weights = read_layer_weights(model_dir, list(state.names))
    gptq, errors = cfg.gptq.settings(), {}
    light_plan = MethodPlan(light, plan.alloc)
    for name in plan.alloc.names:
        assert torch.equal(
            weights[name], adapter.read_weight(dict(adapter.iter_layers(model))[name])
        )
        res = quantize_layer(weights[name], store.get(name), light_plan.job(name), gptq, None, True)
        errors[name] = res.output_error
        pack_layer(name, res.weight).save(tmp_path / f"{name}.safetensors")
    packed = [PackedLayer.load(tmp_path / f"{n}.safetensors") for n in reversed(state.names)]
    by_layer = assemble_checkpoint(
        model_dir, tmp_path / "b", packed, light_plan, calib, cfg, errors
    )
    a = {p.name: p for p in iter_packed_layers(tmp_path / "a", one_pass)}
    b = {p.name: p for p in iter_packed_layers(tmp_path / "b", by_layer)}
    for name in state.names:
        assert torch.equal(a[name].data, b[name].data), name
    assert by_layer.files == one_pass.files  # same bytes, file by file
    assert by_layer.allocation == one_pass.allocation
    assert read_manifest(tmp_path / "b").quantization.mode == "parallel"
    with pytest.raises(LwqError, match="layers were not quantized"):
        assemble_checkpoint(model_dir, tmp_path / "c", packed[1:], light_plan, calib, cfg, errors)


def test_a_state_of_other_code_is_refused(tmp_path: Path) -> None:
    from lwq.method.cost import layer_cost
    from lwq.method.qp import SensitivityProfile
    from lwq.method.state import MethodState, load_state, save_state
    from lwq.quant.grid import GridSpec

    z = torch.zeros(1, 1, dtype=torch.float64)
    name, lo, hi = "model.layers.0.mlp.up_proj", GridSpec(2, 32), GridSpec(4, 32)
    state = MethodState(
        (name,),
        {name: torch.arange(64)},
        (layer_cost(name, torch.arange(64), (2, 32), lo, hi),),
        SensitivityProfile((name,), 0.3, z, z, z, 1),
        lo,
        hi,
        1,
        {},
        code_version="abc",
    )
    save_state(state, tmp_path)
    with pytest.raises(LwqError, match="computed by other code"):
        load_state(tmp_path, expect_code="def")
    assert load_state(tmp_path, expect_code="abc").code_version == "abc"
    # a state of whole columns stays one: its jobs protect columns after a reload
    cols = layer_cost(name, torch.arange(32), (2, 32), lo, hi, "columns")
    state = MethodState((name,), {name: torch.arange(32)}, (cols,), state.profile, lo, hi, 1, {})
    save_state(state, tmp_path / "cols")
    back = load_state(tmp_path / "cols")
    assert back.costs[0].structure == "columns"
    assert torch.equal(back.costs[0].activation_ranks, cols.activation_ranks)
    mask = back.job(name, 0.25).mask
    assert mask is not None and mask[:, :8].all() and not mask[:, 8:].any()


def test_largest_layers_are_quantized_first() -> None:
    from types import SimpleNamespace

    from lwq.method.state import largest_first

    shapes = [(128, 128), (512, 128), (128, 512), (32, 128), (128, 128)]
    costs = [SimpleNamespace(shape=s) for s in shapes]
    state: Any = SimpleNamespace(names=[str(i) for i in range(5)], costs=costs * 2)  # 2 bases
    # The wide-input layer (a down projection) costs most, ties keep model order.
    assert largest_first(state) == [2, 1, 0, 4, 3]


def test_the_profile_reads_other_text_when_given_and_keeps_the_hessians(tmp_path: Path) -> None:
    from lwq.adapters import adapter_for
    from lwq.method.state import prepare
    from lwq.models import load_model_dir
    from lwq.quantize import calibration_set

    model_dir = save_tiny_model_dir("llama", tmp_path / "m")
    cfg = _cfg(model_dir, tmp_path / "q", 2.7)
    model, tok = load_model_dir(model_dir)
    adapter = adapter_for(model)
    calib = calibration_set(cfg, tok, model.config)

    def profile_of(text: torch.Tensor | None) -> Any:
        return prepare(model, adapter, calib, cfg, progress=False, profile_text=text)

    own = profile_of(None)
    other = profile_of(torch.randint(0, model.config.vocab_size, (6, 48)))
    assert not torch.allclose(own.profile.AtA, other.profile.AtA)
    assert own.profile.probe is not None and other.profile.probe is not None
    assert own.profile.n_tokens == other.profile.n_tokens == 8 * 16
    # The probes and costs come from the calibration set's Hessians either way:
    assert [c.bits(0.1) for c in own.costs] == [c.bits(0.1) for c in other.costs]
    assert all(torch.equal(own.orders[n], other.orders[n]) for n in own.names)
