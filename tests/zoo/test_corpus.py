"""Corpus fetching and splitting, with the Debian tools faked where needed."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from lwq.errors import CorpusError
from lwq.zoo import corpus
from lwq.zoo.corpus import Document, corpus_sha256, split_documents, split_of


def test_split_is_deterministic_and_proportional() -> None:
    names = [f"library/mod{i}.rst.txt" for i in range(4000)]
    first = [split_of(n) for n in names]
    assert first == [split_of(n) for n in names]
    counts = Counter(first)
    assert 0.87 < counts["train"] / 4000 < 0.93
    assert 0.03 < counts["validation"] / 4000 < 0.07
    assert 0.03 < counts["calibration"] / 4000 < 0.07


def test_split_documents_partitions() -> None:
    docs = [Document(f"f{i}.txt", f"text {i}") for i in range(300)]
    parts = split_documents(docs)
    paths = [d.relpath for part in parts.values() for d in part]
    assert sorted(paths) == sorted(d.relpath for d in docs)


def test_corpus_hash_ignores_order_but_not_content() -> None:
    a, b = Document("a.txt", "alpha"), Document("b.txt", "beta")
    assert corpus_sha256([a, b]) == corpus_sha256([b, a])
    assert corpus_sha256([a, b]) != corpus_sha256([a, Document("b.txt", "betA")])


def _fake_bin(tmp_path: Path, name: str, script: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return bindir


def test_no_network_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = _fake_bin(
        tmp_path, "apt-get",
        "echo 'E: Failed to fetch python3.11-doc: Temporary failure resolving' >&2; exit 100\n",
    )
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    with pytest.raises(CorpusError, match=r"Debian registry.*--deb FILE.*Temporary failure"):
        corpus.download_deb(tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_corrupted_download_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # apt-get "succeeds" but leaves garbage: the checksum or the unpacker must catch it.
    bindir = _fake_bin(
        tmp_path, "apt-get",
        "head -c 5000 /dev/urandom > python3.11-doc_3.11.2-6_all.deb\n",
    )
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    with pytest.raises(CorpusError, match="corrupted"):
        corpus.fetch_corpus(tmp_path / "work")


def test_missing_deb_argument(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.fetch_corpus(tmp_path / "work", deb=tmp_path / "nope.deb")
