"""A failed 'lwq zoo build' leaves the previous zoo exactly as it was."""

from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path

import pytest

from cli.main import main
from lwq.errors import LwqError
from lwq.zoo import build


def _old_zoo(tmp_path: Path) -> Path:
    zoo = tmp_path / "zoo"
    (zoo / "llama-6l-128d").mkdir(parents=True)
    (zoo / "llama-6l-128d" / "model.safetensors").write_bytes(b"previous weights")
    return zoo


def _assert_intact(zoo: Path) -> None:
    assert (zoo / "llama-6l-128d" / "model.safetensors").read_bytes() == b"previous weights"
    leftovers = [p.name for p in zoo.parent.iterdir() if p.name.startswith(".zoo")]
    assert leftovers == []


def test_corrupted_deb_keeps_previous_zoo(tmp_path: Path) -> None:
    zoo = _old_zoo(tmp_path)
    bad = tmp_path / "python3.11-doc_3.11.2_all.deb"
    bad.write_bytes(b"!<arch>\ntruncated")
    with pytest.raises(LwqError):
        build.build_zoo(zoo, deb=bad)
    _assert_intact(zoo)


def test_too_little_disk_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo = _old_zoo(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(build.shutil, "disk_usage", lambda _: usage(10**9, 10**9, 5 * 2**20))
    with pytest.raises(LwqError, match=r"only 5 MiB free.*--out"):
        build.build_zoo(zoo)
    _assert_intact(zoo)


def test_disk_filling_up_midway_keeps_previous_zoo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo = _old_zoo(tmp_path)

    def full(stage: Path, *args: object) -> list[object]:
        (stage / "partial").write_text("half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, "_build_into", full)
    with pytest.raises(LwqError, match="filled up.*untouched"):
        build.build_zoo(zoo)
    _assert_intact(zoo)


def test_cli_reports_unknown_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["zoo", "build", "--out", str(tmp_path / "z"), "--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
