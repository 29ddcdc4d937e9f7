"""`lwq run --manifest`: a zoo of entries through the flows, skipped once registered."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import ZOO

pytestmark = pytest.mark.usefixtures("prefect_server")


def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(entry, bits target) -> the summary table's cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("entry", "---"):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_a_manifest_compresses_each_entry_once_and_survives_a_failure(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    text = (ZOO / "data" / "validation.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipeline = ["--work-dir", str(tmp_path / "work"), "--tracking-uri", db]
    assert main(["register-base", str(tiny_llama), "--name", "tiny-base", *pipeline]) == 0
    assert "registered as models:/tiny-base/1" in capsys.readouterr().out
    assert main(["register-base", str(tiny_llama), "--name", "tiny-base", *pipeline]) == 0
    assert "already registered (same weights) as models:/tiny-base/1" in capsys.readouterr().out

    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(
        f"""
defaults:
  config:
    calib: {{source: {ZOO / "data" / "calibration.txt"}, n_samples: 4, seq_len: 32}}
    method: {{group_size: 32, profile_samples: 8, profile_seq_len: 16}}
    pipeline:
      work_dir: {tmp_path / "work"}
      tracking_uri: {db}
      eval_data: eval.txt
entries:
  - model: {tiny_llama}
    bits: 2.7
  - model: {tiny_llama}
    method: gptq
    bits: [4, 3]
    config: {{method: null}}
  - model: broken
    name: broken
    method: rtn
    bits: 4
    config: {{calib: null, method: null}}
  - model: models:/tiny-base/1
    method: rtn
    bits: 4
    config: {{calib: null, method: null}}
""",
        encoding="utf-8",
    )
    assert main(["run", "--manifest", str(manifest)]) == 1  # one entry failed
    out = capsys.readouterr().out
    assert "4 entries checked" in out
    rows = _rows(out)
    assert set(rows) == {
        ("tiny-llama lwq", "2.7"),
        ("tiny-llama gptq", "4"),
        ("tiny-llama gptq", "3"),
        ("broken", "-"),
        ("models:/tiny-base/1 rtn", "4"),
    }, out
    assert rows[("tiny-llama lwq", "2.7")][2:4] == ["registered", "lwq-tiny-llama v1"]
    assert abs(float(rows[("tiny-llama lwq", "2.7")][4]) - 2.7) <= 0.02
    assert rows[("tiny-llama gptq", "4")][2:4] == ["registered", "lwq-tiny-llama v2"]
    assert rows[("tiny-llama gptq", "3")][2:4] == ["registered", "lwq-tiny-llama v3"]
    assert rows[("broken", "-")][2] == "failed" and re.search(r"^broken: .+", out, re.M)
    # A registered base model is downloaded and registered under its own derived name.
    assert rows[("models:/tiny-base/1 rtn", "4")][2:4] == ["registered", "lwq-tiny-base v1"]
    assert float(rows[("tiny-llama gptq", "4")][5]) > 0  # perplexity measured

    # A rerun registers nothing: each finished entry is skipped before any stage.
    assert main(["run", "--manifest", str(manifest)]) == 1
    again = _rows(capsys.readouterr().out)
    for key, cells in rows.items():
        if key[0] != "broken":
            assert again[key][2:6] == ["already registered", *cells[3:6]], (key, again[key])
    assert again[("broken", "-")][2] == "failed"

    # The same weights in another folder are the same run: nothing is registered again.
    copy = tmp_path / "copy" / "tiny-llama"
    shutil.copytree(tiny_llama, copy)
    text = manifest.read_text(encoding="utf-8")
    moved = tmp_path / "moved.yaml"
    moved.write_text(text.replace(f"model: {tiny_llama}\n", f"model: {copy}\n"), encoding="utf-8")
    assert main(["run", "--manifest", str(moved)]) == 1
    third = _rows(capsys.readouterr().out)
    assert third[("tiny-llama gptq", "3")][2:4] == ["already registered", "lwq-tiny-llama v3"]
    assert third[("tiny-llama lwq", "2.7")][2:4] == ["already registered", "lwq-tiny-llama v1"]


def test_manifest_takes_no_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(f"zoo: {ZOO}\nentries: [{{model: llama-6l-128d}}]\n", encoding="utf-8")
    assert main(["run", "--manifest", str(manifest), "--bits", "3", "--work-dir", "w"]) == 2
    err = capsys.readouterr().err
    assert "remove --bits, --work-dir or put it in the manifest" in err
