"""RTN and GPTQ on hand-built weights and Hessians."""

from __future__ import annotations

import pytest
import torch

from lwq.errors import ConfigError, NumericalError
from lwq.quant.gptq import GPTQSettings, gptq_quantize
from lwq.quant.grid import GridSpec, grid_params, quantize
from lwq.quant.rtn import rtn_quantize


def _correlated_inputs(
    d_in: int, n: int = 2048, seed: int = 0, spread: float = 1.0
) -> torch.Tensor:
    """Correlated features with scales spread over [0.5, 0.5 + spread]: (n, d_in)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen) / d_in**0.5 + torch.eye(d_in)
    X = torch.randn(n, d_in, generator=gen) @ mix
    scale = torch.rand(d_in, generator=gen) * spread + 0.5
    return X / X.std(dim=0) * scale


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def _out_err(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - Q) @ X.T).square().sum())


def test_bad_grid_settings_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"bits=5 .*\(2, 3, 4, 8\)"):
        GridSpec(bits=5)
    with pytest.raises(ConfigError, match="group_size=0"):
        GridSpec(group_size=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_within_one_step(bits: int, symmetric: bool) -> None:
    W = torch.randn(16, 96)
    spec = GridSpec(bits, 32, symmetric)
    qw = rtn_quantize(W, spec)
    assert int(qw.codes.max()) <= spec.maxq
    assert torch.equal(qw.scales, qw.scales.half().float())  # stored exactly in fp16
    step = qw.scales[:, spec.group_index(96)]
    err = (qw.dequantize() - W).abs()
    # Inside the grid the error is at most half a step; only the ends (integer
    # zero point, and the symmetric grid's one code fewer above zero) clip more.
    assert (err <= step + 1e-6).all()
    assert (err <= step / 2 + 1e-6).float().mean() > 0.9
    # Grid points map back to their own codes.
    g = spec.group_index(96)
    again = quantize(qw.dequantize(), qw.scales[:, g], qw.zeros[:, g], spec.maxq)
    assert torch.equal(again.to(torch.uint8), qw.codes)


def test_partial_last_group_and_per_row_grid() -> None:
    W = torch.randn(8, 100)
    qw = rtn_quantize(W, GridSpec(4, 32))
    assert qw.scales.shape == (8, 4)  # 32 + 32 + 32 + 4
    assert rtn_quantize(W, GridSpec(4, -1)).scales.shape == (8, 1)


def test_gptq_with_diagonal_hessian_is_rtn() -> None:
    W = torch.randn(32, 128)
    H = torch.diag(torch.rand(128) + 0.5)
    spec = GridSpec(3, 32)
    res = gptq_quantize(W, H, spec, GPTQSettings(damp=0.0))
    assert torch.equal(res.weight.codes, rtn_quantize(W, spec).codes)


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_lazy_batch_updates_equal_unblocked_gptq(group_size: int) -> None:
    X = _correlated_inputs(128)
    W = torch.randn(24, 128)
    spec = GridSpec(3, group_size)
    blocked = gptq_quantize(W, _hessian(X), spec, GPTQSettings(block_size=128))
    unblocked = gptq_quantize(W, _hessian(X), spec, GPTQSettings(block_size=1))
    agree = (blocked.weight.codes == unblocked.weight.codes).float().mean()
    assert agree > 0.995  # float32 summation order may flip a rare tie
    assert blocked.loss == pytest.approx(unblocked.loss, rel=1e-3)


@pytest.mark.parametrize(
    "settings",
    [GPTQSettings(), GPTQSettings(act_order=True), GPTQSettings(static_groups=True)],
    ids=["plain", "act_order", "static_groups"],
)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits: int, settings: GPTQSettings) -> None:
    X = _correlated_inputs(256)
    W = torch.randn(64, 256)
    spec = GridSpec(bits, 64)
    rtn = _out_err(W, rtn_quantize(W, spec).dequantize(), X)
    res = gptq_quantize(W, _hessian(X), spec, settings)
    gptq = _out_err(W, res.weight.dequantize(), X)
    assert gptq < 0.8 * rtn
    # The proxy loss is the output error per token, halved (up to dampening).
    assert res.loss == pytest.approx(gptq / X.shape[0], rel=0.25)


def test_dead_inputs_get_zero_weight() -> None:
    X = _correlated_inputs(64)
    X[:, 5] = 0
    res = gptq_quantize(torch.randn(8, 64), _hessian(X), GridSpec(4, 32))
    assert (res.weight.dequantize()[:, 5] == 0).all()


def test_hessian_that_cannot_be_inverted_names_the_layer() -> None:
    with pytest.raises(NumericalError, match=r"blocks\.3\.mlp"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8), GridSpec(4, 8), name="blocks.3.mlp")
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), H, GridSpec(4, 8), name="x")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_masked_weights_use_the_high_grid(method: str) -> None:
    X = _correlated_inputs(128)
    W = torch.randn(16, 128)
    W[3, 7] = 25.0  # an outlier that would wreck a 2-bit min-max grid
    mask = torch.rand(16, 128, generator=torch.Generator().manual_seed(1)) < 0.05
    mask[3, 7] = True
    lo, hi = GridSpec(2, 64), GridSpec(8, 64)
    if method == "rtn":
        qw = rtn_quantize(W, lo, mask, hi)
    else:
        qw = gptq_quantize(W, _hessian(X), lo, mask=mask, hi=hi).weight
    assert qw.mask is not None and qw.hi_scales is not None
    deq = qw.dequantize()
    # The outlier is kept (GPTQ first moves it by the earlier columns' error
    # feedback); the low grid never saw it.
    assert abs(float(deq[3, 7]) - 25.0) < (0.1 if method == "rtn" else 1.0)
    s_lo, _ = grid_params(W[3:4, 0:64], lo, ~mask[3:4, 0:64])
    assert float(s_lo[0]) < 25.0 / 3
    # Every masked code is read on the high grid, every other one on the low grid.
    assert int(qw.codes[~mask].max()) <= lo.maxq
    plain = rtn_quantize(W, lo).dequantize()
    assert _out_err(W, deq, X) < _out_err(W, plain, X)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("act_order", [False, True])
def test_float16_high_grid_keeps_outliers_exact(method: str, act_order: bool) -> None:
    """Dense-and-sparse (SqueezeLLM/SpQR): masked weights are stored as float16."""
    X = _correlated_inputs(128)
    W = torch.randn(16, 128)
    mask = torch.rand(16, 128, generator=torch.Generator().manual_seed(2)) < 0.01
    mask[5, 40] = True
    W[5, 40] = 30.0
    lo, hi = GridSpec(2, 64), GridSpec(16, 64)
    if method == "rtn":
        qw = rtn_quantize(W, lo, mask, hi)
        # Without error feedback the outliers are the original weights in float16.
        assert torch.equal(qw.dequantize()[mask], W[mask].half().float())
    else:
        settings = GPTQSettings(act_order=act_order)
        qw = gptq_quantize(W, _hessian(X), lo, settings, mask=mask, hi=hi).weight
        assert abs(float(qw.dequantize()[5, 40]) - 30.0) < 1.0
    assert qw.hi_scales is None and qw.hi_values is not None
    assert int(qw.codes[mask].max()) == 0
    deq = qw.dequantize()
    assert torch.equal(deq[mask], qw.hi_values[mask])
    assert torch.equal(deq[mask].half().float(), deq[mask])  # float16-exact
    assert _out_err(W, deq, X) < _out_err(W, rtn_quantize(W, lo).dequantize(), X)


def test_high_columns_last_lets_the_fine_grid_absorb_the_coarse_error() -> None:
    """A mask of whole columns, quantized 2-bit columns first, 4-bit ones last:
    the codes stay in place (packing needs no order), every weight is on the
    grid its mask names, and the output error drops against left to right."""
    from lwq.pack.layer import pack_layer, unpack_layer
    from lwq.quant.layer import LayerJob, quantize_layer

    X = _correlated_inputs(128, spread=2.0)
    H = _hessian(X)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(32, 128, dtype=torch.bool)
    mask[:, torch.randperm(128, generator=torch.Generator().manual_seed(4))[:40]] = True
    lo, hi = GridSpec(2, 64), GridSpec(4, 64)
    natural = LayerJob("l", lo, hi, mask)
    last = LayerJob("l", lo, hi, mask, hi_last=True)
    order = last.column_order()
    assert order is not None and bool(mask[0, order[-40:]].all()) and natural.column_order() is None
    a = quantize_layer(W, H, natural, GPTQSettings()).weight
    b = quantize_layer(W, H, last, GPTQSettings()).weight
    assert int(b.codes[~mask].max()) <= lo.maxq and int(b.codes[mask].max()) <= hi.maxq
    assert torch.equal(unpack_layer(pack_layer("l", b)).dequantize(), b.dequantize())
    assert _out_err(W, b.dequantize(), X) < 0.9 * _out_err(W, a.dequantize(), X)
    # the identity order is left to right with the grids fitted up front
    same = gptq_quantize(W, H, lo, mask=mask, hi=hi, column_order=torch.arange(128)).weight
    static = gptq_quantize(W, H, lo, GPTQSettings(static_groups=True), mask=mask, hi=hi)
    assert torch.equal(same.dequantize(), static.weight.dequantize())
    with pytest.raises(AssertionError, match="whole columns"):
        LayerJob("l", lo, hi, torch.eye(32, 128, dtype=torch.bool), hi_last=True)


@pytest.mark.parametrize("bits", [2, 3])
def test_a_clipped_range_lowers_the_weighted_rounding_error(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128))  # heavy tails, as real weights
    weight = torch.rand(128, generator=gen) + 0.1
    spec = GridSpec(bits, 128)

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = scale[:, None], zero[:, None]
        deq = s * (quantize(w, s, z, spec.maxq) - z)
        return ((deq - w).square() * weight).sum(dim=1)

    minmax = error(*grid_params(w, spec))
    clipped = error(*grid_params(w, spec, weight=weight))
    assert (clipped <= minmax + 1e-6).all()  # the search starts from min-max
    assert float(clipped.sum()) < 0.8 * float(minmax.sum())
    # Only the selected weights count, and the range still holds zero.
    select = torch.rand(64, 128, generator=gen) < 0.5
    scale, zero = grid_params(w, spec, select, weight)
    assert ((zero >= 0) & (zero <= spec.maxq)).all() and (scale > 0).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_clipped_grids_lowers_the_output_error(act_order: bool) -> None:
    X = _correlated_inputs(256)
    W = torch.distributions.StudentT(3.0).sample((64, 256))
    spec, H = GridSpec(2, 64), _hessian(X)
    plain = gptq_quantize(W, H, spec, GPTQSettings(act_order=act_order))
    mse = gptq_quantize(W, H, spec, GPTQSettings(act_order=act_order, clip="mse"))
    assert _out_err(W, mse.weight.dequantize(), X) < _out_err(W, plain.weight.dequantize(), X)


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_jobs_sharing_a_hessian_quantized_together_equal_each_alone(clip: str) -> None:
    """Stacked rows (the method's probes) give what each job gives alone: plain jobs,
    masked ones on 4-bit or float16 high grids, two low grids, a whole-column mask."""
    from lwq.quant.layer import LayerJob, quantize_layer, quantize_together

    d_in = 96
    X = _correlated_inputs(d_in, seed=3)
    H = _hessian(X)
    gen = torch.Generator().manual_seed(4)
    Ws = [torch.randn(d, d_in, generator=gen) for d in (24, 40, 24)]
    lo2, lo3, hi4, hi16 = GridSpec(2, 32), GridSpec(3, 32), GridSpec(4, 32), GridSpec(16, 32)
    cols = torch.zeros(24, d_in, dtype=torch.bool)
    cols[:, [3, 50, 77]] = True
    jobs = [
        LayerJob("a0", lo2),
        LayerJob("a1", lo2, hi4, torch.rand(24, d_in, generator=gen) < 0.05),
        LayerJob("b1", lo2, hi4, torch.rand(40, d_in, generator=gen) < 0.3),
        LayerJob("b2", lo3, hi4, torch.rand(40, d_in, generator=gen) < 0.1),
        LayerJob("b3", lo3),
        LayerJob("c1", lo2, hi16, torch.rand(24, d_in, generator=gen) < 0.1),  # other hi grid
        LayerJob("c2", lo2, hi4, cols, hi_last=True),
    ]
    weights = [Ws[0], Ws[0], Ws[1], Ws[1], Ws[1], Ws[2], Ws[2]]
    settings = GPTQSettings(act_order=True, clip=clip)
    together = quantize_together(weights, H, jobs, settings)
    for W, job, got in zip(weights, jobs, together, strict=True):
        alone = quantize_layer(W, H, job, settings).weight.dequantize()
        assert got.shape == W.shape
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5, msg=job.name)
