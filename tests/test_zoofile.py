"""The zoo manifest: defaults merged into entries, every problem reported before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ZOO

from lwq.errors import ConfigError
from lwq.zoofile import load_manifest


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "zoo.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_entries_inherit_the_defaults_and_name_zoo_models(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
zoo: {ZOO}
defaults:
  bits: [2.5, 3.0]
  config:
    calib: {{n_samples: 8}}  # 8 windows hold the profile's 8 sequences of 16 tokens
    method: {{r_max: 0.4, profile_samples: 8, profile_seq_len: 16}}
    pipeline: {{work_dir: work}}
entries:
  - model: llama-6l-128d
  - model: llama-6l-128d
    method: gptq
    bits: 3
    registry_name: llama-uniform
    config: {{calib: {{seq_len: 64}}, method: null}}
""",
    )
    lwq, gptq = load_manifest(path)
    assert lwq.label == "llama-6l-128d lwq" and gptq.label == "llama-6l-128d gptq"
    assert lwq.budgets == [2.5, 3.0] and gptq.budgets == [3.0]
    assert lwq.config.model == str(ZOO / "llama-6l-128d")
    # The zoo's texts are the defaults; entry keys merge into the defaults' key by key.
    assert lwq.config.calib.source == str(ZOO / "data" / "calibration.txt")
    assert lwq.config.pipeline.eval_data == str(ZOO / "data" / "validation.txt")
    assert lwq.config.calib.n_samples == 8 and lwq.config.method.r_max == 0.4
    m = lwq.config.method  # every layer chooses its base, whatever the budget
    assert m.lo_bits is None and m.chosen_bases() == (2, 3)
    assert gptq.config.quant.method == "gptq" and gptq.config.calib.seq_len == 64
    assert gptq.config.calib.n_samples == 8
    assert gptq.config.pipeline.registry_name == "llama-uniform"
    assert lwq.config.pipeline.registry_name is None  # lwq-<model>, as lwq run


def test_every_problem_of_every_entry_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
zoo: {ZOO}
entries:
  - model: llama-6l-128d
    bitz: 2.5
  - model: no-such-model
  - model: llama-6l-128d
    method: gptq
    bits: 2.5
  - model: gpt2-6l-128d
    bits: 1.5
  - model: gpt2-6l-128d
    method: rtn
    bits: 4
    config: {{calib: {{n_samples: 8}}}}
  - model: gpt2-6l-128d
    name: good
    config: {{quant: {{bits: 3}}}}
  - model: gpt2-6l-128d
    name: fine
    config: {{method: {{r_max: 2}}}}
  - model: gpt2-6l-128d
    name: small
    config: {{calib: {{n_samples: 8}}}}
""",
    )
    with pytest.raises(ConfigError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert "entry 1 (llama-6l-128d): bitz: unknown key" in msg
    assert "entry 2 (no-such-model): no such model folder or file" in msg
    assert "entry 3 (llama-6l-128d): bits 2.5: gptq takes whole widths" in msg
    assert "entry 4 (gpt2-6l-128d): method.budget=1.5 is below" in msg
    assert "entry 5 (gpt2-6l-128d): calib.n_samples does not apply to quant.method=rtn" in msg
    assert "entry 6 (good):" in msg and "quant.bits does not apply to quant.method=lwq" in msg
    assert "entry 7 (fine): config.method.r_max" in msg
    # 8 windows of the model's 256 tokens hold 16 of the profile's 256 sequences:
    assert "entry 8 (small): calibration too small for the sensitivity profile" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("entries: []", "entries: the list is empty"),
        ("entriez: []", "entriez: unknown key"),
        ("defaults: {method: awq}\nentries: [{model: x}]", "defaults.method"),
        ("- model: x", "the top level must be a mapping with the keys"),
        ("entries: [3]", "entry 1 (?): an entry is a mapping"),
        (
            f"zoo: {ZOO}\nentries: [{{model: llama-6l-128d}}, {{model: llama-6l-128d}}]",
            "entries named 'llama-6l-128d lwq' twice",
        ),
        ("entries: [{model: 'models:/base/1'}]", "needs the registry"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="--manifest") as err:
        load_manifest(_write(tmp_path, text))
    assert expected in str(err.value)


def test_a_missing_manifest_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--manifest .*: no such file"):
        load_manifest(tmp_path / "none.yaml")
