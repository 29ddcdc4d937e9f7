"""The sensitivity profile predicts the measured KL divergence of single layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ZOO

from lwq.adapters import adapter_for
from lwq.calibration import build_calibration_set
from lwq.eval.divergence import output_divergence
from lwq.method.layer import job_at_ratio
from lwq.method.saliency import ranking
from lwq.method.sensitivity import (
    GAMMA_MIN,
    Delta,
    ProbeSettings,
    chord_point,
    curve_exponents,
    fisher_sketch,
    probe_levels,
    sensitivity_profile,
)
from lwq.models import load_model_dir
from lwq.quant.grid import GridSpec
from lwq.quant.layer import quantize_layer


def test_fisher_sketch_norm_is_the_quadratic_form() -> None:
    logits = torch.randn(5, 50)
    delta = torch.randn(5, 50) * 0.1
    p = torch.softmax(logits, -1)
    exact = torch.stack(
        [d @ (torch.diag(q) - torch.outer(q, q)) @ d for q, d in zip(p, delta, strict=True)]
    )
    z = fisher_sketch(logits, delta, torch.eye(50))  # identity "sketch"
    torch.testing.assert_close(z.square().sum(-1), exact, rtol=1e-4, atol=1e-7)


def test_single_layer_prediction_matches_measurement() -> None:
    model, tok = load_model_dir(ZOO / "llama-6l-128d")
    adapter = adapter_for("llama")
    calib = build_calibration_set(tok, ZOO / "data" / "calibration.txt", 8, 128, seed=1)
    names = [n for n, _ in adapter.iter_layers(model)][:14]  # the first two blocks
    modules = dict(adapter.iter_layers(model))
    lo, hi = GridSpec(2, 128), GridSpec(4, 128)
    orders = {n: ranking(adapter.read_weight(modules[n]).abs()) for n in names}
    settings = ProbeSettings(r_max=0.3, sketch_dim=256, batch_size=4, r_mid=0.03)

    def probe(name: str, r: float) -> torch.Tensor:
        W = adapter.read_weight(modules[name])
        shape = (int(W.shape[0]), int(W.shape[1]))
        job = job_at_ratio(name, orders[name], shape, r, lo, hi)
        return quantize_layer(W, None, job, gptq=None).weight.dequantize()

    def delta(name: str, r: float) -> Delta:
        return Delta.of(adapter.read_weight(modules[name]) - probe(name, r))

    probes = {n: [delta(n, r) for r in probe_levels(settings)] for n in names}
    prof = sensitivity_profile(model, adapter, calib, probes, names, settings, progress=False)
    assert prof.AtA.shape == (14, 14) and prof.n_tokens == 8 * 128
    torch.testing.assert_close(prof.AtA, prof.AtA.T)
    assert float(torch.linalg.eigvalsh(prof.BtB).min()) > -1e-8 * float(prof.BtB.diagonal().max())
    ref, _ = load_model_dir(ZOO / "llama-6l-128d")
    for i in (0, 6, 13):  # q_proj of block 0, down_proj of block 0, down_proj of block 1
        name = names[i]
        W = adapter.read_weight(modules[name])
        adapter.write_weight(modules[name], probe(name, 0.0))
        measured = output_divergence(ref, model, calib.input_ids).kl
        adapter.write_weight(modules[name], W)
        predicted = 0.5 * float(prof.AtA[i, i])
        assert 0.6 < predicted / measured < 1.6, (name, predicted, measured)
        # Between the probes, at r = 0.03, the fitted curve predicts the measured KL.
        adapter.write_weight(modules[name], probe(name, 0.03))
        measured = output_divergence(ref, model, calib.input_ids).kl
        adapter.write_weight(modules[name], W)
        at = [0.0] * len(names)
        at[i] = 0.03
        predicted = float(prof.per_layer_loss(at)[i])
        assert 0.6 < predicted / measured < 1.6, (name, predicted, measured)
    assert prof.gamma is not None
    assert bool(((prof.gamma >= GAMMA_MIN) & (prof.gamma <= 1)).all())


def test_curve_exponent_recovers_a_power_law() -> None:
    x = 0.03 / 0.3
    for gamma in (0.3, 0.5, 0.8, 1.0):
        got = curve_exponents(torch.tensor([x**gamma], dtype=torch.float64), 0.03, 0.3)
        assert float(got[0]) == pytest.approx(gamma, abs=1e-9)
    # Outside the model's range: clipped, never beyond the chord nor below GAMMA_MIN.
    got = curve_exponents(torch.tensor([0.01, 1.5]), 0.03, 0.3)
    assert got.tolist() == pytest.approx([1.0, GAMMA_MIN])


def test_chord_point_has_the_probed_damage() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    b = b + a / 0.3  # the chord heads towards zero damage
    s = 0.1
    mid = float((a - s * b).square().sum())
    got = chord_point(a @ a, a @ b, b @ b, torch.tensor(mid))
    assert float(got) == pytest.approx(s, rel=1e-6)
    # Below the chord's least damage: its minimiser.
    low = chord_point(a @ a, a @ b, b @ b, torch.tensor(0.0))
    assert float(low) == pytest.approx(float(a @ b / (b @ b)), rel=1e-6)


def test_delta_storage_is_within_half_a_percent() -> None:
    dW = torch.randn(7, 150) * torch.logspace(-3, 0, 150)
    back = Delta.of(dW).dense()
    assert back.shape == dW.shape
    into = torch.full_like(dW, float("nan"))
    assert Delta.of(dW).dense(out=into) is into and torch.equal(into, back)
    whole = torch.randn(5, 128)  # whole blocks: the other path
    assert torch.equal(Delta.of(whole).dense(out=torch.empty(5, 128)), Delta.of(whole).dense())
    blocks = torch.nn.functional.pad(dW.abs(), (0, 42)).view(7, 3, 64).amax(dim=2)
    bound = blocks.repeat_interleave(64, dim=1)[:, :150] / 254 + 1e-12
    assert bool(((back - dW).abs() <= bound).all())


def test_reverse_mode_estimates_the_forward_gram_matrices() -> None:
    """Sampled-label backward passes converge to the Fisher-weighted Gram of the
    (linearized) output changes that the forward probes measure directly."""
    from tiny_models import tiny_model

    from lwq.calibration import CalibrationSet, tokens_sha256
    from lwq.method.reverse import reverse_profile

    model = tiny_model("llama")
    adapter = adapter_for(model)
    names = adapter.layer_names(model)[:5] + adapter.layer_names(model)[-2:]
    modules = dict(adapter.iter_layers(model))
    gen = torch.Generator().manual_seed(0)
    probes = {}
    for n in names:
        W = adapter.read_weight(modules[n])
        probes[n] = [Delta.of(0.02 * W.abs().mean() * torch.randn(W.shape, generator=gen))]
        probes[n].append(Delta.of(0.5 * probes[n][0].dense()))
    ids = torch.randint(0, 96, (4, 16), generator=gen)
    calib = CalibrationSet(ids, "random", 0, tokens_sha256(ids))
    fwd = sensitivity_profile(
        model, adapter, calib, probes, names, ProbeSettings(0.3, 4096, 0, 4), progress=False
    )
    settings = ProbeSettings(0.3, 0, seed=3)
    rev = reverse_profile(
        model, adapter, ids.repeat(1500, 1), probes, names, settings, "", progress=False
    )
    scale = float(fwd.AtA.diagonal().max())
    for a, b in ((fwd.AtA, rev.AtA), (fwd.AtB, rev.AtB), (fwd.BtB, rev.BtB)):
        assert float((a - b).abs().max()) < 0.12 * scale, (a.diagonal(), b.diagonal())
    assert float(rev.AtA.diagonal().min()) > 0


def test_directional_samples_are_linear_and_independent_of_the_pass_size() -> None:
    """<dL_s/dW_i, dW_i> is linear in the error (what predicting an allocation along
    its own errors relies on), and the tokens per backward pass change nothing."""
    from tiny_models import tiny_model

    from lwq.method.reverse import HEAD_CHUNK, directional_samples

    model = tiny_model("llama")
    adapter = adapter_for(model)
    names = adapter.layer_names(model)[:3]
    modules = dict(adapter.iter_layers(model))
    gen = torch.Generator().manual_seed(0)
    probes = {}
    for n in names:
        W = adapter.read_weight(modules[n])
        a, b = (Delta.of(0.02 * torch.randn(W.shape, generator=gen)) for _ in range(2))
        probes[n] = [a, b, Delta.of(a.dense() + b.dense())]
    ids = torch.randint(0, 96, (6, HEAD_CHUNK), generator=gen)
    flags = [p.requires_grad for p in model.parameters()]
    one = directional_samples(model, adapter, ids, probes, names, 3, 5, False, HEAD_CHUNK)
    three = directional_samples(model, adapter, ids, probes, names, 3, 5, False, 3 * HEAD_CHUNK)
    assert one.shape == (6, 3, 3) and float(one.abs().max()) > 0
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-6)
    scale = float(one.abs().max())
    assert float((one[:, :, 0] + one[:, :, 1] - one[:, :, 2]).abs().max()) < 0.02 * scale
    assert [p.requires_grad for p in model.parameters()] == flags  # the model left as it was


def test_probe_errors_round_trip_through_their_file(tmp_path: Path) -> None:
    from lwq.method.sensitivity import DeltaStore

    store = DeltaStore(tmp_path)
    a = [Delta.of(torch.randn(8, 128)), Delta.of(torch.randn(8, 128) * 1e-3)]
    b = [Delta.of(torch.randn(3, 70))]
    store.put("a", a)
    store.put("b", b)
    assert list(store) == ["a", "b"] and len(store) == 2
    for got, want in zip([*store["a"], *store["b"]], [*a, *b], strict=True):
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    with store.path.open("r+b") as f:  # a file cut short is an error, not garbage
        f.truncate(store.path.stat().st_size - 1)
    with pytest.raises(OSError, match="probes of b are cut short"):
        store["b"]
    store.close()
    assert not store.path.exists()


def test_cross_layer_noise_is_shrunk_and_signal_kept() -> None:
    from lwq.method.reverse import shrink_cross_layer

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 6, generator=gen, dtype=torch.float64)  # 3 layers x (a, b)
    G, shrink = shrink_cross_layer(noise, 3)
    assert shrink > 0.5  # independent columns: the cross-layer entries are noise
    common = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    signal = common + 0.1 * torch.randn(64, 6, generator=gen, dtype=torch.float64)
    _, shrink2 = shrink_cross_layer(signal, 3)
    assert shrink2 < 0.1  # strongly correlated layers: kept
    raw = noise.T @ noise
    same = torch.arange(6)[:, None] % 3 == torch.arange(6)[None, :] % 3
    assert torch.equal(G[same], raw[same])  # each layer's own block is untouched
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-9
