"""The S3-compatible object store, through boto3; clients fetch objects by presigned URL."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.client import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from rgrid.core.errors import NotFound, RGridError, ServiceUnavailable

#: S3's limit for a copy in one request.
_SINGLE_COPY_MAX = 5 * 1000**3

#: Bodies smaller than this are PUT in one request: boto3's own multipart threshold (8 MiB).
_SINGLE_PUT_MAX = TransferConfig().multipart_threshold


class _Prefixed(io.RawIOBase):
    """``head`` (already read), then the rest of ``stream``: a readable file for boto3."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream = memoryview(head), stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class S3Store:
    """A bucket; a PresigningStore (rgrid.store.objectstore)."""

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
                # Outputs are stored many at a time (output_blobs.OUTPUT_STORE_THREADS): one
                # kept-alive connection each, not botocore's default 10.
                max_pool_connections=32,
            ),
        )

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") != "NoSuchBucket":
                raise _translate(exc, kwargs) from exc
        except BotoCoreError as exc:
            raise _translate(exc, kwargs) from exc
        # The store lost everything (a restarted endpoint, a recreated bucket): make the bucket
        # again and carry on. Cache rows that point at lost bytes are misses where read.
        self.ensure_bucket()
        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, kwargs) from exc

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call(self.client.create_bucket, Bucket=self.bucket)
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"object store unreachable: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        """``sha256`` (hex): sent as the body's ``ChecksumSHA256``, so S3 refuses other bytes
        (moto 5.2 does not check it)."""
        extra = {"ChecksumSHA256": checksum_sha256(sha256)} if sha256 else {}
        self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **extra)

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None:
        """A body below the multipart threshold (most logs and outputs) in one PUT, checked
        against ``sha256`` by S3 when given; a larger one through boto3's managed upload, in
        parts, memory constant (each part checked by the checksum botocore adds). The managed
        upload starts a transfer manager and its threads on every call: ~15 ms here before
        the first byte, on the path of every run's result."""
        head = stream.read(_SINGLE_PUT_MAX)
        if len(head) < _SINGLE_PUT_MAX:
            self.put_bytes(key, head, sha256)
            return
        rest = io.BufferedReader(_Prefixed(head, stream), 1024 * 1024)
        self._call(self.client.upload_fileobj, rest, self.bucket, key)

    def get_bytes(self, key: str) -> bytes:
        return self._call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"].read()

    def download(self, key: str, dest: Path) -> None:
        """One streamed GET in 1 MiB reads. boto3's download_file splits into parallel ranged
        GETs instead, and the S3 endpoint used here (moto) copies the whole object for every
        range: a 2 GiB download took minutes."""
        body = self.open_stream(key)
        try:
            with open(dest, "wb") as fh:
                for chunk in body.iter_chunks(1024 * 1024):
                    fh.write(chunk)
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"object store download failed: {exc}") from exc
        finally:
            body.close()

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

    def open_stream(self, key: str) -> BinaryIO:
        """The object's body as a stream (read in chunks: constant memory)."""
        return self._call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"]

    def open_range(self, key: str, offset: int, length: int) -> BinaryIO:
        """``length`` bytes from ``offset`` on, in one ranged GET: a packed blob's bytes
        without the rest of its pack."""
        if length <= 0:
            return io.BytesIO(b"")
        return self._call(
            self.client.get_object,
            Bucket=self.bucket,
            Key=key,
            Range=f"bytes={offset}-{offset + length - 1}",
        )["Body"]

    def size(self, key: str) -> int:
        return self._call(self.client.head_object, Bucket=self.bucket, Key=key)["ContentLength"]

    def copy(self, source: str, dest: str) -> None:
        """A server-side copy: no byte passes through this process. boto3's managed copy, so
        an object over S3's 5 GB single-copy limit is copied in parts; below it, in one
        request (the S3 endpoint used here, moto, copies the whole object for every part)."""
        self._call(
            self.client.copy,
            {"Bucket": self.bucket, "Key": source},
            self.bucket,
            dest,
            Config=TransferConfig(multipart_threshold=_SINGLE_COPY_MAX, max_concurrency=4),
        )

    def keys_under(self, prefix: str) -> set[str]:
        """Every key that starts with ``prefix`` (a LIST per 1,000): what many HEADs of keys
        sharing it would say, in a request or a few (``objectstore.exists_many``)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            return {item["Key"] for page in pages for item in page.get("Contents", [])}
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, {}) from exc

    def keys_older_than(self, prefix: str, age_s: float) -> list[str]:
        """Keys under ``prefix`` last written more than ``age_s`` seconds ago."""
        cutoff = datetime.now(UTC) - timedelta(seconds=age_s)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            return [
                item["Key"]
                for page in pages
                for item in page.get("Contents", [])
                if item["LastModified"] < cutoff
            ]
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, {}) from exc

    # Presigned uploads: the CLI sends bytes straight to the store, never through the API.
    # Each URL names a staging key, never a blob's own, expires minutes after it is issued,
    # and is signed with the declared length and (a single PUT) the declared SHA-256: S3
    # refuses a body of another length (signature mismatch) or of other bytes (BadDigest).
    # moto 5.2, the endpoint here, checks neither (it does not verify presigned signatures):
    # rgrid.store.uploads checks both again at completion, whatever the store.

    def upload_url(self, key: str, size: int, sha256: str, expires_s: int) -> str:
        # Signing involves no request, so a lost bucket would only show as the client's PUT
        # failing: make sure it exists first (one HEAD per new file).
        self.ensure_bucket()
        return self.client.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ContentLength": size,
                "ChecksumSHA256": checksum_sha256(sha256),
            },
            ExpiresIn=expires_s,
        )

    def upload_headers(self, sha256: str) -> dict[str, str]:
        """The headers ``upload_url`` signed, which its PUT must carry."""
        return {"x-amz-checksum-sha256": checksum_sha256(sha256)}

    def start_multipart(self, key: str) -> str:
        return self._call(self.client.create_multipart_upload, Bucket=self.bucket, Key=key)[
            "UploadId"
        ]

    def part_url(
        self, key: str, upload_id: str, part_number: int, size: int, expires_s: int
    ) -> str:
        return self.client.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": part_number,
                "ContentLength": size,
            },
            ExpiresIn=expires_s,
        )

    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        self._call(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": p["part_number"], "ETag": p["etag"]} for p in parts]
            },
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass  # Already completed or gone: nothing to abort.


def checksum_sha256(hex_digest: str) -> str:
    """S3's form of a SHA-256 (``x-amz-checksum-sha256``): the digest's bytes in base64."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _translate(exc: ClientError | BotoCoreError, kwargs: dict) -> RGridError:
    """A boto3 failure as the error a user can act on."""
    if isinstance(exc, BotoCoreError):
        return ServiceUnavailable(f"object store unreachable: {exc}")
    code = exc.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchKey", "404", "NotFound"):
        return NotFound(f"object {kwargs.get('Key', '')} not found")
    return ServiceUnavailable(f"object store error: {exc}")
