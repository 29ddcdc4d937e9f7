"""Reading user text files (evaluation and calibration corpora)."""

from __future__ import annotations

from pathlib import Path

from lwq.errors import ConfigError


def read_text(path: Path, setting: str = "--data") -> str:
    """Read a UTF-8 text file, or every ``*.txt`` file of a folder in name order.

    ``setting`` names the option the path came from, so errors say what to change.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"{setting} {path}: the folder holds no *.txt file")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{setting} {path}: no such file or folder")
    parts = []
    for f in files:
        raw = f.read_bytes()
        try:
            parts.append(raw.decode("utf-8").replace("\r\n", "\n"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{setting} {f}: not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x}); "
                "convert it, e.g. 'iconv -f latin1 -t utf-8', or pass another file"
            ) from err
    text = "\n\n".join(parts)
    if not text.strip():
        raise ConfigError(f"{setting} {path}: the text is empty")
    return text
