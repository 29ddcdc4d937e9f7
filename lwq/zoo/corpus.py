"""The zoo's training corpus: the reStructuredText sources of the Python docs.

Debian's ``python3.11-doc`` package carries about 11 MB of English prose with
markup under ``/usr/share/doc/python3.11/html/_sources``. It is fetched from the
Debian registry with ``apt-get download`` (no root install), checked against the
SHA-256 that the registry's index gives, and unpacked with ``dpkg-deb -x``.

Files are split by a hash of their path, so the split does not depend on the
order of the archive or on which other files exist.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lwq.hashing import file_sha256
from lwq.errors import CorpusError

PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
Split = Literal["train", "validation", "calibration"]
SPLITS: tuple[Split, ...] = ("train", "validation", "calibration")
# Per mille of files per split (by path hash): 90 % / 5 % / 5 %.
_SPLIT_BOUNDS = ((900, "train"), (950, "validation"), (1000, "calibration"))
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    relpath: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CorpusSource:
    """Where the corpus came from; recorded in every model card."""

    package: str
    version: str
    deb_sha256: str
    text_sha256: str
    n_files: int
    n_bytes: int


def split_of(relpath: str) -> Split:
    """Deterministic split of one file, by the SHA-256 of its relative path."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 1000
    for bound, name in _SPLIT_BOUNDS:
        if bucket < bound:
            return name  # type: ignore[return-value]
    raise AssertionError("unreachable: bucket < 1000")


def split_documents(docs: Iterable[Document]) -> dict[Split, list[Document]]:
    out: dict[Split, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc.relpath)].append(doc)
    return out


def corpus_sha256(docs: Sequence[Document]) -> str:
    """Hash of the whole corpus: sorted (path, text) pairs, NUL separated."""
    h = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d.relpath):
        h.update(doc.relpath.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
    return h.hexdigest()


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise CorpusError(
            f"{what}: the command {cmd[0]!r} is not installed. The zoo corpus comes from "
            f"Debian's {PACKAGE}; on a machine without apt, download the .deb elsewhere "
            "and pass it with --deb FILE."
        )
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CorpusError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def registry_sha256(package: str = PACKAGE) -> str | None:
    """SHA-256 of the package according to the local apt index, if apt has one."""
    if shutil.which("apt-cache") is None:
        return None
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"^SHA256: ([0-9a-f]{64})$", proc.stdout, flags=re.M)
    return m.group(1) if m else None


def download_deb(workdir: Path, package: str = PACKAGE) -> Path:
    """``apt-get download`` the package into ``workdir`` and return its path."""
    _run(
        ["apt-get", "download", package],
        f"downloading {package} from the Debian registry (check network access to the "
        "Debian mirror, run 'apt-get update', or pass --deb FILE)",
        cwd=workdir,
    )
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise CorpusError(f"apt-get download left {len(debs)} {package} files in {workdir}")
    return debs[0]


def verify_deb(deb: Path, package: str = PACKAGE) -> tuple[str, str]:
    """Check the archive against the registry index; return (version, sha256)."""
    digest = file_sha256(deb)
    expected = registry_sha256(package)
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], f"reading {deb}").strip()
    if expected is not None and digest != expected:
        # A different version than the index knows is not corruption: name both.
        raise CorpusError(
            f"{deb} is corrupted or not the registry's {package}: its SHA-256 is "
            f"{digest}, the apt index says {expected}. Delete it and run "
            "'lwq zoo build' again without --deb (or run 'apt-get update')."
        )
    return version, digest


def extract_documents(deb: Path, workdir: Path) -> list[Document]:
    """Unpack the archive with ``dpkg-deb -x`` and read the .txt sources, sorted."""
    target = workdir / "extracted"
    _run(
        ["dpkg-deb", "-x", str(deb), str(target)],
        f"unpacking {deb} (the file may be truncated or corrupted: delete it and retry)",
    )
    root = target / SOURCES_DIR
    if not root.is_dir():
        raise CorpusError(f"{deb} has no {SOURCES_DIR}: is it really {PACKAGE}?")
    docs = []
    for path in sorted(root.rglob("*.txt")):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(f"{rel} in {deb} is not valid UTF-8: corrupted archive?") from err
        docs.append(Document(rel, text.replace("\r\n", "\n")))
    if not docs:
        raise CorpusError(f"no .txt sources found under {SOURCES_DIR} in {deb}")
    return docs


def fetch_corpus(workdir: Path, deb: Path | None = None) -> tuple[CorpusSource, list[Document]]:
    """Download (or take ``deb``), verify, unpack and hash the corpus."""
    workdir.mkdir(parents=True, exist_ok=True)
    deb_path = deb if deb is not None else download_deb(workdir)
    if not deb_path.is_file():
        raise CorpusError(f"--deb {deb_path} does not exist")
    version, digest = verify_deb(deb_path)
    docs = extract_documents(deb_path, workdir)
    source = CorpusSource(
        package=PACKAGE,
        version=version,
        deb_sha256=digest,
        text_sha256=corpus_sha256(docs),
        n_files=len(docs),
        n_bytes=sum(len(d.text.encode("utf-8")) for d in docs),
    )
    return source, docs
