"""Checkpoint storage: a local folder or any S3-compatible endpoint (AWS S3, MinIO, Ceph).

A checkpoint is stored as one object per file under a prefix. Every object
carries its SHA-256 (from the checkpoint's manifest, verified against the
local file before upload and against the downloaded bytes after download;
S3-compatible stores do not all check checksums themselves), large files go up
in multipart uploads, and the manifest is written last: a prefix without
``lwq_manifest.json`` is an unfinished upload that nothing reads.
Credentials come from the standard AWS variables or profiles and never appear
in messages.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lwq.errors import LwqError
from lwq.hashing import file_sha256
from lwq.pack.checkpoint import MANIFEST, ChecksumError, Manifest, read_manifest

MULTIPART_THRESHOLD = 16 * 1024 * 1024


class StorageError(LwqError):
    """The checkpoint store cannot be reached, or refuses the request."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    uri: str
    sha256: str
    size: int


class Store(Protocol):
    def uri(self, key: str) -> str: ...

    def put(self, local: Path, key: str, sha256: str) -> StoredObject: ...

    def get(self, key: str, dest: Path) -> Path: ...

    def exists(self, key: str) -> bool: ...


class LocalStore:
    """A folder; each object is written to a temporary name, then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def put(self, local: Path, key: str, sha256: str) -> StoredObject:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(local, tmp)
        if file_sha256(tmp) != sha256:
            tmp.unlink()
            raise ChecksumError(f"{local}: the copy at {dest} does not match its SHA-256")
        os.replace(tmp, dest)
        return StoredObject(key, str(dest), sha256, dest.stat().st_size)

    def get(self, key: str, dest: Path) -> Path:
        src = self.root / key
        if not src.is_file():
            raise StorageError(f"{src} does not exist")
        shutil.copyfile(src, dest)
        return dest

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()


class S3Store:
    """A bucket and prefix on an S3-compatible endpoint, through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self._check_bucket(create_bucket)

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS S3'}"

    def _error(self, err: Exception, action: str) -> StorageError:
        """A message that names the endpoint and the setting, never a secret."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        if isinstance(err, EndpointConnectionError):
            return StorageError(
                f"cannot reach the S3 endpoint {self.endpoint_url or 'AWS S3'} to {action}; "
                "check pipeline.s3_endpoint_url (or AWS_ENDPOINT_URL)"
            )
        if isinstance(err, NoCredentialsError):
            return StorageError(
                f"no credentials for {self._where()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied"):
                return StorageError(
                    f"{self._where()} refused the credentials ({code}) to {action}: check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                )
            return StorageError(f"{self._where()}: {action} failed ({code})")
        return StorageError(f"{self._where()}: {action} failed ({type(err).__name__})")

    def _check_bucket(self, create: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(err, "open the bucket") from err
        except BotoCoreError as err:
            raise self._error(err, "open the bucket") from err
        if not create:
            raise StorageError(
                f"the bucket {self.bucket} does not exist at "
                f"{self.endpoint_url or 'AWS S3'}; create it, or set "
                "pipeline.create_bucket: true"
            )
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as err:
            raise self._error(err, "create the bucket") from err

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put(self, local: Path, key: str, sha256: str) -> StoredObject:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        if file_sha256(local) != sha256:
            raise ChecksumError(f"{local} does not match its SHA-256; not uploaded")
        try:
            self.client.upload_file(
                str(local),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"},
                Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD),
            )
        except (BotoCoreError, ClientError) as err:
            raise self._error(err, f"upload {key}") from err
        except Exception as err:  # boto3's transfer wraps errors in S3UploadFailedError
            cause = err.__cause__ or err.__context__
            if isinstance(cause, BotoCoreError | ClientError):
                raise self._error(cause, f"upload {key}") from err
            raise
        return StoredObject(key, self.uri(key), sha256, local.stat().st_size)

    def get(self, key: str, dest: Path) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except (BotoCoreError, ClientError) as err:
            raise self._error(err, f"download {key}") from err
        return dest

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(err, f"look up {key}") from err
        except BotoCoreError as err:
            raise self._error(err, f"look up {key}") from err

    def object_sha256(self, key: str) -> str:
        """The SHA-256 recorded with the object at upload."""
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return str(head["Metadata"].get("sha256", ""))


def open_store(location: str, endpoint_url: str | None = None, create: bool = False) -> Store:
    """``s3://BUCKET[/PREFIX]`` or a local folder."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"pipeline.storage={location!r}: give s3://BUCKET[/PREFIX]")
        return S3Store(bucket, prefix, endpoint_url, create)
    return LocalStore(Path(location))


def upload_checkpoint(store: Store, ckpt: Path, key: str) -> str:
    """Every file of the checkpoint under ``key``, verified, the manifest last; its URI."""
    manifest = read_manifest(ckpt)  # checks every local file's SHA-256 first
    for name, meta in sorted(manifest.files.items()):
        store.put(ckpt / name, f"{key}/{name}", meta.sha256)
    store.put(ckpt / MANIFEST, f"{key}/{MANIFEST}", file_sha256(ckpt / MANIFEST))
    return store.uri(key)


def download_checkpoint(store: Store, key: str, dest: Path) -> Path:
    """The checkpoint at ``key`` into ``dest``, every file checked against the manifest."""
    if (dest / MANIFEST).is_file():
        read_manifest(dest)  # already here: verify and reuse
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:12]}")
    stage.mkdir(mode=0o777)  # minus the umask, like every other folder
    try:
        if not store.exists(f"{key}/{MANIFEST}"):
            raise StorageError(f"{store.uri(key)} holds no finished checkpoint (no manifest)")
        store.get(f"{key}/{MANIFEST}", stage / MANIFEST)
        manifest = Manifest.parse((stage / MANIFEST).read_text(encoding="utf-8"), store.uri(key))
        for name, meta in manifest.files.items():
            store.get(f"{key}/{name}", stage / name)
            if file_sha256(stage / name) != meta.sha256:
                raise ChecksumError(f"{store.uri(key)}/{name}: SHA-256 differs from the manifest")
        os.replace(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest
