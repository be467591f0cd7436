"""Where scripts, logs and outputs are kept: an S3-compatible bucket, or a local folder for the
embedded default. Both speak the same small interface so the pipeline does not care which."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import boto3
from botocore.client import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from rgrid.config import Settings
from rgrid.errors import NotFound, ServiceUnavailable


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, dest: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def download_url(self, key: str, expires_s: int = 3600) -> str | None: ...


def _check_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"bad object key {key!r}")
    return path


class LocalStore:
    """A folder on this machine; keys are relative paths under it."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).parts)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(stream, fh, 1024 * 1024)
        tmp.replace(path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} not found") from exc

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} not found") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def download_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None


class S3Store:
    """An S3-compatible bucket through boto3; clients fetch objects through presigned URLs."""

    def __init__(self, endpoint_url: str | None, bucket: str, region: str):
        self.bucket = bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=BotoConfig(
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"object {kwargs.get('Key', '')} not found") from exc
            raise ServiceUnavailable(f"object store error: {exc}") from exc
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"object store unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call(self.client.create_bucket, Bucket=self.bucket)
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"object store unreachable: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=data)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        # upload_fileobj switches to multipart for large bodies, keeping memory constant.
        self._call(self.client.upload_fileobj, stream, self.bucket, key)

    def get_bytes(self, key: str) -> bytes:
        return self._call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"].read()

    def download(self, key: str, dest: Path) -> None:
        self._call(self.client.download_file, self.bucket, key, str(dest))

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=key)
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=key)

    def download_url(self, key: str, expires_s: int = 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )


def store_from_settings(settings: Settings) -> ObjectStore:
    """S3 when an endpoint is configured or a server database is used; else a local folder."""
    if settings.s3_endpoint_url:
        return S3Store(settings.s3_endpoint_url, settings.s3_bucket, settings.s3_region)
    return LocalStore(settings.effective_store_dir)
