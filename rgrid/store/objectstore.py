"""Where scripts, logs and outputs are kept: an S3-compatible bucket, or a local folder for the
embedded default. Both speak the same small interface so the pipeline does not care which."""

from __future__ import annotations

import io
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable

from rgrid.core.config import Settings
from rgrid.core.errors import NotFound


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, dest: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def download_url(self, key: str, expires_s: int = 3600) -> str | None: ...
    def open_stream(self, key: str) -> BinaryIO: ...
    def open_range(self, key: str, offset: int, length: int) -> BinaryIO:
        """``length`` bytes of the object from ``offset`` on (a ranged GET): one blob of a
        pack, or a span of several."""
        ...


@runtime_checkable
class PresigningStore(ObjectStore, Protocol):
    """A store in a bucket that clients send bytes to directly, by presigned URL (S3), so
    that no upload passes through the API. The local folder of the embedded default is not."""

    def ensure_bucket(self) -> None: ...
    def upload_url(self, key: str, size: int, sha256: str, expires_s: int) -> str: ...
    def upload_headers(self, sha256: str) -> dict[str, str]: ...
    def start_multipart(self, key: str) -> str: ...
    def part_url(
        self, key: str, upload_id: str, part_number: int, size: int, expires_s: int
    ) -> str: ...
    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None: ...
    def abort_multipart(self, key: str, upload_id: str) -> None: ...
    def size(self, key: str) -> int: ...
    def copy(self, source: str, dest: str) -> None: ...
    def keys_older_than(self, prefix: str, age_s: float) -> list[str]: ...


def _partial(path: Path) -> Path:
    """A temporary name of this writer's own: two writers of one key must not share one."""
    return path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")


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

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(path)
        tmp.write_bytes(data)
        tmp.replace(path)

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None:
        """``sha256`` is S3's check in transit; a local copy has no transit to check."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(path)
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

    def open_stream(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} not found") from exc

    def open_range(self, key: str, offset: int, length: int) -> BinaryIO:
        with self.open_stream(key) as fh:
            fh.seek(offset)
            return io.BytesIO(fh.read(length))


#: HEADs (and LISTs) of many objects run on this many connections at once: one after the
#: other, the 2,000 HEADs of a 1,000-input batch page took 30 s on the S3 endpoint here.
EXISTS_THREADS = 8
#: Keys that share their folder and the first this many characters of their name (a batch's
#: executions' logs: ``logs/<batch id>...``) are looked for with one LIST of that prefix...
LIST_PREFIX_CHARS = 10
#: ... when there are at least this many of them; fewer get a HEAD each.
LIST_AT_LEAST = 16


def exists_many(store: ObjectStore, keys: list[str]) -> dict[str, bool]:
    """Whether each object is in the store. A local folder: a stat each. S3: keys sharing a
    prefix (``LIST_PREFIX_CHARS``) in numbers are listed, the rest get a HEAD each, several
    requests at a time."""
    keys = list(dict.fromkeys(keys))
    lister = getattr(store, "keys_under", None)
    if isinstance(store, LocalStore) or len(keys) < 2:
        return {key: store.exists(key) for key in keys}
    groups: dict[str, list[str]] = {}
    for key in keys:
        folder, _, name = key.rpartition("/")
        groups.setdefault(f"{folder}/{name[:LIST_PREFIX_CHARS]}", []).append(key)
    listed = [p for p, members in groups.items() if lister and len(members) >= LIST_AT_LEAST]
    headed = [key for p, members in groups.items() if p not in listed for key in members]
    found: dict[str, bool] = {}
    with ThreadPoolExecutor(EXISTS_THREADS) as pool:
        heads = pool.map(store.exists, headed)
        lists = pool.map(lister, listed) if listed else []
        found.update(zip(headed, heads, strict=True))
        for prefix, present in zip(listed, lists, strict=True):
            found.update((key, key in present) for key in groups[prefix])
    return found


#: Object keys this process found in the store, and when (``time.monotonic()``).
_SEEN: dict[str, float] = {}
_SEEN_MAX = 100_000


def all_exist(store: ObjectStore, keys: list[str], ttl_s: float = 0) -> list[bool]:
    """Whether each key is in the store (``exists_many``: several at a time), except for keys
    this process found there less than ``ttl_s`` ago. A HEAD costs 5-15 ms of botocore and the S3
    endpoint here: a project's 30 modules asked about one by one were 0.15-0.5 s of every
    run's missing-digests call (bench/projects.py), for objects that only RGrid's own purge,
    which drops their rows first, ever deletes. A store that lost objects behind RGrid's back
    is noticed within ``ttl_s`` (and by the worker that fetches one: it drops the row)."""
    now = time.monotonic()
    fresh = [ttl_s > 0 and now - _SEEN.get(key, -ttl_s - 1) < ttl_s for key in keys]
    ask = [key for key, ok in zip(keys, fresh, strict=True) if not ok]
    present_now = exists_many(store, ask)  # several at a time, a LIST where many share a prefix
    answers = [present_now[key] for key in ask]
    if ttl_s > 0:
        if len(_SEEN) > _SEEN_MAX:
            _SEEN.clear()
        for key, present in zip(ask, answers, strict=True):
            if present:
                _SEEN[key] = now
            else:
                _SEEN.pop(key, None)
    told = iter(answers)
    return [True if ok else next(told) for ok in fresh]


def forget_presence(key: str) -> None:
    """``key`` is known to be gone from the store (deleted, or found missing)."""
    _SEEN.pop(key, None)


def store_from_settings(settings: Settings) -> ObjectStore:
    """S3 when an endpoint is configured (RGRID_S3_ENDPOINT_URL); else a local folder, the
    embedded default's."""
    if settings.s3_endpoint_url:
        from rgrid.store.s3store import (
            S3Store,
        )  # boto3 is slow to import; the embedded CLI skips it

        return S3Store(settings.s3_endpoint_url, settings.s3_bucket, settings.s3_region)
    return LocalStore(settings.effective_store_dir)
