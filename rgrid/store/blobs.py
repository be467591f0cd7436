"""Content-addressed files per account: which an account has, checking stored bytes against
their digest, adopting them as blobs, reading them back, and a host's verified copies.

A digest is a promise. Bytes become a blob (``blobs/<account>/<digest>`` or an object of their
own) only once the server has checked their size and digest (``adopt``); bytes that do not
match are deleted. Every lookup is per account: an account asking about another's digest is
told "missing" and uploads its own copy. How bytes arrive from a client is
rgrid/store/uploads.py; how a run's outputs are stored and packed, rgrid/store/output_blobs.py.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

from sqlalchemy import Row, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput, RGridError
from rgrid.core.hashing import sha256_stream
from rgrid.core.models import Blob, utcnow
from rgrid.store.objectstore import ObjectStore, all_exist

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: Digests per ``IN (...)`` query: well under PostgreSQL's and SQLite's parameter limits.
_QUERY_CHUNK = 1000


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BadInput(f"not a sha256 hex digest: {digest!r}")
    return digest


def find_blob(session: Session, account_id: int, digest: str) -> Blob | None:
    return session.scalars(
        select(Blob).where(Blob.account_id == account_id, Blob.digest == digest)
    ).one_or_none()


#: Where a blob's bytes are: (object key, offset in its pack or None, size).
Location = tuple[str, "int | None", int]


def blob_locations(session: Session, account_id: int, digests: list[str]) -> dict[str, Location]:
    """Digest -> where the bytes are, of those of ``digests`` this account has stored, in one
    query. An input may be a packed blob: an output of an earlier run, sent again as input."""
    rows = session.execute(
        select(Blob.digest, Blob.object_key, Blob.pack_offset, Blob.size).where(
            Blob.account_id == account_id, Blob.digest.in_(set(digests))
        )
    )
    return {digest: (key, offset, size) for digest, key, offset, size in rows.all()}


def check_uploaded(session: Session, account_id: int, manifest: list[dict]) -> None:
    """Every input of ``manifest`` must be a blob this account stored, of the size claimed:
    one query for a whole page of a batch, or a whole execution's inputs."""
    if not manifest:
        return
    sizes = dict(
        session.execute(
            select(Blob.digest, Blob.size).where(
                Blob.account_id == account_id,
                Blob.digest.in_({item["sha256"] for item in manifest}),
            )
        ).all()
    )
    for item in manifest:
        if sizes.get(item["sha256"]) != item["size"]:
            raise BadInput(f"input {item['path']} was not uploaded")


def missing_digests(
    session: Session,
    store: ObjectStore,
    account_id: int,
    digests: list[str],
    presence_ttl_s: float = 0,
) -> list[str]:
    """The digests this account has no stored copy of. A row whose object vanished counts as
    missing (and is dropped), so the file is simply uploaded again. ``presence_ttl_s``: an
    object this process saw in the store that recently is not asked about again (see
    ``all_exist``)."""
    wanted = list(dict.fromkeys(check_digest(d) for d in digests))
    rows = list(
        session.scalars(select(Blob).where(Blob.account_id == account_id, Blob.digest.in_(wanted)))
    )
    found = {}
    keys = list(dict.fromkeys(b.object_key for b in rows))  # a pack's blobs share one key
    present = dict(zip(keys, all_exist(store, keys, presence_ttl_s), strict=True))
    for blob in rows:
        if present[blob.object_key]:
            found[blob.digest] = blob
        else:
            session.delete(blob)
    session.flush()
    return [digest for digest in wanted if digest not in found]


def check_size(settings: Settings, size: object) -> int:
    if not isinstance(size, int) or size < 0:
        raise BadInput(f"not a file size: {size!r}")
    if size > settings.max_input_file_bytes:
        raise BadInput(
            f"file of {size} bytes is over the {settings.max_input_file_bytes} byte limit"
        )
    return size


def check_stored_size(store: ObjectStore, key: str, size: int, declared: int) -> None:
    if size > declared:
        store.delete(key)
        raise BadInput(
            f"the upload is larger than declared ({size} bytes arrived, {declared} declared): "
            "nothing was stored"
        )
    if size < declared:
        store.delete(key)
        raise BadInput(
            f"the upload was cut off ({size} of {declared} bytes arrived): send it again"
        )


def check_stored_digest(store: ObjectStore, key: str, expected: str, declared: int) -> None:
    """Hash what is stored at ``key``; unless it is the promised bytes, delete it and say so."""
    with store.open_stream(key) as stream:
        actual, size = sha256_stream(stream)
    check_stored_size(store, key, size, declared)
    if actual != expected:
        store.delete(key)
        raise BadInput(
            f"uploaded bytes do not match their digest (claimed {expected[:12]}…, "
            f"got {actual[:12]}…): nothing was stored"
        )


def adopt(
    session: Session,
    store: ObjectStore,
    account_id: int,
    key: str,
    expected: str,
    size_hint: int,
) -> Blob:
    """Hash what is stored at ``key``; only if it matches ``expected`` does a Blob row point
    at it. Otherwise the bytes are deleted and nothing references them."""
    check_stored_digest(store, key, expected, size_hint)
    existing = find_blob(session, account_id, expected)
    if existing is not None and existing.object_key != key and store.exists(existing.object_key):
        store.delete(key)  # an earlier upload of the same file is already stored
        touch(existing)
        return existing
    if existing is not None:
        if existing.object_key == key:  # a retried completion of this very upload
            touch(existing)
            return existing
        session.delete(existing)
        session.flush()
    blob = Blob(account_id=account_id, digest=expected, size=size_hint, object_key=key, use_count=0)
    try:
        with session.begin_nested():  # a concurrent upload or output of the same bytes may win
            session.add(blob)
    except IntegrityError:
        winner = find_blob(session, account_id, expected)
        assert winner is not None
        if winner.object_key != key:  # a concurrent writer of the digest's own key shares it
            store.delete(key)
        touch(winner)
        return winner
    return blob


def store_file(
    session: Session, store: ObjectStore, account_id: int, path: Path, digest: str
) -> tuple[Blob, bool]:
    """Store a local file as a blob unless the account has it already (embedded uploads and
    worker outputs). Returns the blob and whether bytes were written."""
    existing = find_blob(session, account_id, digest)
    if existing is not None and store.exists(existing.object_key):
        touch(existing)  # used again today: not to be purged as unused
        return existing, False
    key = cache_keys.blob_object_key(account_id, secrets.token_hex(16))
    with open(path, "rb") as fh:
        store.put_stream(key, fh)
    return adopt(session, store, account_id, key, digest, path.stat().st_size), True


def open_blob(store: ObjectStore, blob: Blob | Row):
    """A stream of the blob's own bytes: its object, or its range of a pack."""
    if blob.pack_offset is None:
        return store.open_stream(blob.object_key)
    return store.open_range(blob.object_key, blob.pack_offset, blob.size)


def read_blob(store: ObjectStore, blob: Blob | Row) -> bytes:
    with open_blob(store, blob) as stream:
        return stream.read()


def blobs_for(session: Session, account_id: int, digests: list[str]) -> dict[str, Row]:
    """The account's blobs of these digests, by digest, in a few queries however many: rows
    to read (id, digest, size, object_key, pack_offset), not ORM objects to change (loading
    10,000 of those took a second)."""
    found: dict[str, Row] = {}
    digests = list(dict.fromkeys(digests))
    columns = (Blob.id, Blob.digest, Blob.size, Blob.object_key, Blob.pack_offset)
    for start in range(0, len(digests), _QUERY_CHUNK):
        chunk = digests[start : start + _QUERY_CHUNK]
        for row in session.execute(
            select(*columns).where(Blob.account_id == account_id, Blob.digest.in_(chunk))
        ):
            found[row.digest] = row
    return found


def touch_all(session: Session, blob_ids: list[int]) -> None:
    """``touch`` for many blobs: one UPDATE per chunk instead of a query per blob."""
    now = utcnow()
    for start in range(0, len(blob_ids), _QUERY_CHUNK):
        session.execute(
            update(Blob)
            .where(Blob.id.in_(blob_ids[start : start + _QUERY_CHUNK]))
            .values(last_used_at=now, use_count=Blob.use_count + 1)
            .execution_options(synchronize_session=False)
        )


def touch(blob: Blob) -> None:
    blob.last_used_at = utcnow()
    blob.use_count = Blob.use_count + 1  # in SQL: concurrent runs must each count


def cached_path(cache_dir: Path, digest: str) -> Path:
    """Where this host keeps its copy of a blob (whether it has one yet or not)."""
    return cache_dir / digest[:2] / digest


def cached_copy(
    store: ObjectStore,
    key: str,
    digest: str,
    cache_dir: Path,
    pack_offset: int | None = None,
    size: int = 0,
) -> Path:
    """A verified copy of a blob on this host, downloaded at most once: the worker trusts the
    store no more than the API trusts the client. The caller gives each account its own
    ``cache_dir``: a warm copy must not make one account's run faster because another account
    uploaded the same file. A packed blob (``pack_offset``) is one ranged GET of its pack."""
    target = cached_path(cache_dir, digest)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{digest}.{secrets.token_hex(4)}.part")
    try:
        if pack_offset is None:
            store.download(key, partial)
        else:
            with store.open_range(key, pack_offset, size) as stream, open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, 1024 * 1024)
        with open(partial, "rb") as fh:
            actual, _ = sha256_stream(fh)
        if actual != digest:
            raise RGridError(
                f"stored blob {digest[:12]}… is corrupt (its bytes hash to "
                f"{actual[:12]}…); upload the file again"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
