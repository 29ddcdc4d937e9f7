from __future__ import annotations

from pathlib import Path

import pytest

from lwq.errors import ConfigError
from lwq.textio import read_text


def test_reads_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\r\nline", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "first\nline"
    assert read_text(tmp_path) == "first\nline\n\nsecond"


def test_wrong_encoding_names_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"--calib .*not UTF-8.*0xe9"):
        read_text(bad, setting="--calib")


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.txt"):
        read_text(tmp_path / "sub")
