"""Checkpoint storage on disk and on an S3-compatible endpoint (moto on loopback)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from lwq.fileio import current_umask
from lwq.hashing import file_sha256
from lwq.pack.checkpoint import MANIFEST, ChecksumError, read_manifest
from tasks.storage import (
    LocalStore,
    S3Store,
    StorageError,
    StoredObject,
    download_checkpoint,
    open_store,
    upload_checkpoint,
)


def _checkpoint(tmp_path: Path, tiny_llama: Path) -> Path:
    from lwq.config import make_config
    from lwq.quantize import quantize

    out = tmp_path / "ckpt"
    cfg = make_config(
        {"model": str(tiny_llama), "out": str(out), "quant": {"method": "rtn", "bits": 4}}
    )
    quantize(cfg, progress=False)
    return out


def test_local_store_round_trip_and_verification(tmp_path: Path, tiny_llama: Path) -> None:
    ckpt = _checkpoint(tmp_path, tiny_llama)
    store = LocalStore(tmp_path / "store")
    uri = upload_checkpoint(store, ckpt, "m/run1")
    assert Path(uri).is_dir() and (Path(uri) / MANIFEST).is_file()
    back = download_checkpoint(store, "m/run1", tmp_path / "back")
    assert read_manifest(back).files == read_manifest(ckpt).files
    # Downloaded folders and files get the umask's modes, like every other file.
    assert oct(back.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
    # A corrupted object is caught on download, and nothing is left half-written.
    victim = next(p for p in Path(uri).iterdir() if p.name.startswith("layers-"))
    victim.write_bytes(b"\0" * victim.stat().st_size)
    with pytest.raises(ChecksumError, match=victim.name):
        download_checkpoint(store, "m/run1", tmp_path / "back2")
    assert not (tmp_path / "back2").exists()


def test_s3_upload_multipart_checksums_and_manifest_last(
    tmp_path: Path, tiny_llama: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.storage as storage

    ckpt = _checkpoint(tmp_path, tiny_llama)
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 64 * 1024)  # the tiny files multipart
    store = open_store("s3://ckpts/team", s3_endpoint, create=True)
    assert isinstance(store, S3Store)
    order: list[str] = []
    real_put = store.put

    def put(local: Path, key: str, sha256: str) -> StoredObject:
        order.append(key)
        return real_put(local, key, sha256)

    monkeypatch.setattr(store, "put", put)
    uri = upload_checkpoint(store, ckpt, "tiny/abc")
    assert uri == "s3://ckpts/team/tiny/abc"
    assert order[-1] == f"tiny/abc/{MANIFEST}"  # the commit marker goes last
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    manifest = read_manifest(ckpt)
    for name, meta in manifest.files.items():
        head = s3.head_object(Bucket="ckpts", Key=f"team/tiny/abc/{name}")
        assert head["Metadata"]["sha256"] == meta.sha256
    back = download_checkpoint(store, "tiny/abc", tmp_path / "back")
    assert file_sha256(back / MANIFEST) == file_sha256(ckpt / MANIFEST)


def test_s3_errors_name_the_setting_and_never_the_secret(s3_endpoint: str) -> None:
    with pytest.raises(StorageError, match=r"pipeline\.create_bucket") as err:
        open_store("s3://no-such-bucket", s3_endpoint)
    assert "testing-secret-value" not in str(err.value)
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9.*s3_endpoint_url") as err:
        open_store("s3://b", "http://127.0.0.1:9")
    assert "testing-secret-value" not in str(err.value)


def test_upload_refuses_a_corrupted_local_checkpoint(tmp_path: Path, tiny_llama: Path) -> None:
    ckpt = _checkpoint(tmp_path, tiny_llama)
    f = next(p for p in ckpt.iterdir() if p.name.startswith("layers-"))
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ChecksumError):
        upload_checkpoint(LocalStore(tmp_path / "store"), ckpt, "x")
    assert not (tmp_path / "store" / "x" / MANIFEST).exists()
