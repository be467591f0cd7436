"""Content-addressed files per account: which an account lacks, uploading them, trusting them.

A digest is a promise. Uploaded bytes land under a staging key (``uploads/...``), the only kind
of key a presigned URL ever names, with a URL bound to the declared size that expires minutes
after it is issued. Only the server, once it has checked size and digest, copies them to the
blob's own key (``blobs/<account>/<digest>``), so a URL reused after the check writes nothing
any run reads. A client that lied about its digest gets an error and its bytes are deleted.
Every lookup is per account: an account asking about another's digest is told "missing" and
uploads its own copy.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import Row, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput, NotFound, OverQuota, RGridError
from rgrid.core.hashing import sha256_bytes, sha256_stream
from rgrid.core.models import Account, Blob, Upload, utcnow
from rgrid.core.units import human_bytes
from rgrid.store.objectstore import ObjectStore, PresigningStore, all_exist, exists_many

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: The pace a part's URL lifetime allows for the parts before it (a 5 GiB file: 85 minutes).
SLOW_UPLOAD_BYTES_PER_S = 1024**2


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


def decode_inline(settings: Settings, items: list[dict], referenced: set[str]) -> dict[str, bytes]:
    """Files sent in a submission's own body (``{sha256, data}``, base64), checked: each one
    a file the submission names, its bytes hashing to its digest, all of them within
    ``inline_upload_bytes``. Returns digest -> bytes; BadInput (one line) otherwise."""
    import base64
    import binascii
    import hashlib

    decoded: dict[str, bytes] = {}
    total = 0
    for item in items:
        digest = check_digest(item.get("sha256"))
        if digest not in referenced:
            raise BadInput(f"inline file {digest[:12]}… is none of the submission's files")
        try:
            data = base64.b64decode(item.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise BadInput(f"inline file {digest[:12]}… is not base64") from exc
        total += len(data)
        if total > settings.inline_upload_bytes:
            raise BadInput(
                f"inline files total over {settings.inline_upload_bytes} bytes"
                " (RGRID_INLINE_UPLOAD_BYTES): upload the larger ones"
            )
        check_size(settings, len(data))
        if hashlib.sha256(data).hexdigest() != digest:
            raise BadInput(f"inline file bytes do not match their digest {digest[:12]}…")
        decoded[digest] = data
    return decoded


def store_inline(
    session: Session,
    store: ObjectStore,
    account_id: int,
    files: dict[str, bytes],
    presence_ttl_s: float = 0,
) -> None:
    """Store files sent inline (already checked by ``decode_inline``: the server hashed
    these very bytes) as blobs of the account, as a completed upload would: one PUT each, at
    the digest's own key, none for a file the account has stored already."""
    import io

    if not files:
        return
    known = blobs_for(session, account_id, list(files))
    keys = [blob.object_key for blob in known.values()]
    present = dict(zip(known, all_exist(store, keys, presence_ttl_s), strict=True))
    for digest, data in files.items():
        existing = known.get(digest)
        if existing is not None and present[digest]:
            touch(existing)
            continue
        key = cache_keys.blob_content_key(account_id, digest)
        store.put_stream(key, io.BytesIO(data), sha256=digest)
        if existing is not None:  # its object vanished: this copy replaces it
            existing.object_key, existing.size = key, len(data)
            touch(existing)
            continue
        blob = Blob(
            account_id=account_id, digest=digest, size=len(data), object_key=key, use_count=0
        )
        try:
            with session.begin_nested():  # a concurrent writer of the same bytes may win
                session.add(blob)
        except IntegrityError:
            winner = find_blob(session, account_id, digest)
            if winner is not None:
                touch(winner)


def check_size(settings: Settings, size: object) -> int:
    if not isinstance(size, int) or size < 0:
        raise BadInput(f"not a file size: {size!r}")
    if size > settings.max_input_file_bytes:
        raise BadInput(
            f"file of {size} bytes is over the {settings.max_input_file_bytes} byte limit"
        )
    return size


def start_upload(
    session: Session,
    store: PresigningStore,
    settings: Settings,
    account_id: int,
    digest: str,
    size: int,
) -> dict:
    """Where to send the bytes: one presigned PUT, or presigned parts for a large file."""
    check_digest(digest)
    check_size(settings, size)
    _check_staging_room(session, store, settings, account_id, size)
    upload = Upload(
        id=secrets.token_hex(16),
        account_id=account_id,
        digest=digest,
        size=size,
        object_key="",
    )
    upload.object_key = cache_keys.upload_staging_key(account_id, upload.id)
    part = settings.upload_part_bytes
    expires = settings.upload_url_expiry_s
    result: dict = {"upload_id": upload.id}
    if size <= part:
        result["url"] = store.upload_url(upload.object_key, size, digest, expires)
        # Signed into the URL: the client sends it, and S3 refuses a body of other bytes.
        result["headers"] = store.upload_headers(digest)
    else:
        upload.multipart_id = store.start_multipart(upload.object_key)
        result["parts"] = [
            {
                "part_number": number,
                "offset": offset,
                "length": min(part, size - offset),
                "url": store.part_url(
                    upload.object_key,
                    upload.multipart_id,
                    number,
                    min(part, size - offset),
                    # The client sends parts in order: a later part's URL also allows for the
                    # bytes before it, at a slow connection's pace.
                    expires + offset // SLOW_UPLOAD_BYTES_PER_S,
                ),
            }
            for number, offset in enumerate(range(0, size, part), start=1)
        ]
    session.add(upload)
    return result


def _check_staging_room(
    session: Session, store: ObjectStore, settings: Settings, account_id: int, size: int
) -> None:
    """An account's open uploads are unchecked bytes in the bucket: at most
    ``max_open_uploads`` of them, declaring at most ``max_staged_bytes`` in all. Its own
    abandoned ones are cleared first, so a cap reached by a killed client frees itself."""
    from rgrid.service.purge import purge_abandoned_uploads

    # One start at a time per account (a row lock; SQLite's writer lock is one already), so
    # that concurrent starts cannot all fit in the same room.
    session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
    purge_abandoned_uploads(store, session, settings, account_id)
    count, staged = session.execute(
        select(func.count(Upload.id), func.coalesce(func.sum(Upload.size), 0)).where(
            Upload.account_id == account_id
        )
    ).one()
    if count >= settings.max_open_uploads:
        raise OverQuota(
            f"{count} uploads of this account are already in progress, the most allowed "
            f"(RGRID_MAX_OPEN_UPLOADS): let them finish first"
        )
    if staged + size > settings.max_staged_bytes:
        raise OverQuota(
            f"uploads in progress would hold {human_bytes(staged + size)}, over this "
            f"account's {human_bytes(settings.max_staged_bytes)} staging limit "
            "(RGRID_MAX_STAGED_BYTES): let them finish first"
        )


def _check_size(store: ObjectStore, key: str, size: int, declared: int) -> None:
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


def _check_digest(store: ObjectStore, key: str, expected: str, declared: int) -> None:
    """Hash what is stored at ``key``; unless it is the promised bytes, delete it and say so."""
    with store.open_stream(key) as stream:
        actual, size = sha256_stream(stream)
    _check_size(store, key, size, declared)
    if actual != expected:
        store.delete(key)
        raise BadInput(
            f"uploaded bytes do not match their digest (claimed {expected[:12]}…, "
            f"got {actual[:12]}…): nothing was stored"
        )


def _adopt(
    session: Session,
    store: ObjectStore,
    account_id: int,
    key: str,
    expected: str,
    size_hint: int,
) -> Blob:
    """Hash what is stored at ``key``; only if it matches ``expected`` does a Blob row point
    at it. Otherwise the bytes are deleted and nothing references them."""
    _check_digest(store, key, expected, size_hint)
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


def _discard(session: Session, upload: Upload) -> None:
    """Forget a failed upload for good: committed now, because the caller's transaction is
    about to roll back with the error."""
    session.delete(upload)
    session.commit()


def complete_upload(
    session: Session,
    store: PresigningStore,
    account_id: int,
    upload_id: str,
    parts: list[dict] | None,
) -> Blob:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.account_id != account_id:
        raise NotFound(f"no upload {upload_id}")
    if upload.multipart_id:
        try:
            if not parts:
                raise BadInput("a multipart upload needs its parts' ETags to complete")
            store.complete_multipart(upload.object_key, upload.multipart_id, parts)
        except RGridError as exc:
            store.abort_multipart(upload.object_key, upload.multipart_id)
            _discard(session, upload)
            raise BadInput(
                "the upload was cut off before all its parts arrived: send it again"
            ) from exc
    try:
        blob = _promote(session, store, upload)
    except NotFound as exc:
        _discard(session, upload)
        raise BadInput("the upload never arrived (or was cut off): send it again") from exc
    except BadInput:
        _discard(session, upload)
        raise
    session.delete(upload)
    return blob


def _promote(session: Session, store: PresigningStore, upload: Upload) -> Blob:
    """Check the staged bytes and move them to the blob's own key. The size first (a HEAD:
    the S3 endpoint here, moto, does not enforce the signed length, so this is what refuses
    20 MiB sent for a 1-byte claim before anything reads them); then a server-side copy to
    the content key, and the digest checked on that copy, which no presigned URL can write,
    so bytes swapped into the staging key meanwhile are never trusted."""
    staging, account_id = upload.object_key, upload.account_id
    _check_size(store, staging, store.size(staging), upload.size)
    existing = find_blob(session, account_id, upload.digest)
    if existing is not None and store.exists(existing.object_key):
        # Stored already (a concurrent upload of the same file): the promise is still checked.
        _check_digest(store, staging, upload.digest, upload.size)
        store.delete(staging)
        touch(existing)
        return existing
    key = cache_keys.blob_content_key(account_id, upload.digest)
    store.copy(staging, key)
    store.delete(staging)
    return _adopt(session, store, account_id, key, upload.digest, upload.size)


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
    return _adopt(session, store, account_id, key, digest, path.stat().st_size), True


#: Objects stored at once: each is one PUT, and the store's round trip, not bandwidth, bounds
#: many small files (moto here: ~70 PUTs/s one at a time, ~200/s sixteen at a time).
OUTPUT_STORE_THREADS = 16
#: Digests per ``IN (...)`` query: well under PostgreSQL's and SQLite's parameter limits.
_QUERY_CHUNK = 1000

# Small outputs are packed, as content-addressed stores do it (git's packfiles, REAPI's batch
# blob calls, restic's packs): one object holds many blobs back to back, and each blob's row
# names the pack, its offset and its size, so every output keeps its own digest (reuse, the
# output cache and `rgrid why` refer to outputs by digest, as before). 10,000 outputs of 1 KiB
# are one PUT and one GET instead of 10,000 of each (moto here: ~200 PUTs/s).

#: Outputs up to this size are packed; larger ones stay an object each.
PACK_MAX_BLOB_BYTES = 64 * 1024
#: A pack is closed once it holds this many bytes (one PUT of at most this plus one blob).
PACK_TARGET_BYTES = 16 * 1024**2
#: Fewer new small outputs than this are stored an object each: one round of concurrent PUTs
#: costs about what a pack's PUT does, and one object lost from the store then loses one file.
PACK_MIN_FILES = OUTPUT_STORE_THREADS
#: Packs assembled and sent at once (each is held in memory while it is sent: 64 MiB at most).
PACKS_AT_ONCE = 4


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


def _insert_new(session: Session, rows: list[dict]) -> set[str]:
    """Insert blob rows, leaving alone any digest a concurrent writer inserted first: one
    statement per page of rows (a savepoint per row took ~1 ms each). Returns the digests
    inserted."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = Blob.__table__
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["account_id", "digest"])
        .returning(table.c.digest)
    )
    # Core's executemany: SQLAlchemy batches the rows into multi-row VALUES itself, with one
    # compiled statement ("insertmanyvalues"). Rows passed to ``.values()`` instead were
    # compiled anew for each chunk: 10,000 rows took seconds.
    return set(session.connection().execute(statement, rows).scalars())


def plan_packs(members: list[tuple[str, int]]) -> list[list[str]]:
    """(digest, size) of small outputs, in order, cut into packs of ``PACK_TARGET_BYTES``."""
    packs: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for digest, size in members:
        if current and filled + size > PACK_TARGET_BYTES:
            packs.append(current)
            current, filled = [], 0
        current.append(digest)
        filled += size
    if current:
        packs.append(current)
    return packs


#: What one stored object holds: (digest, object key, size, offset in a pack or None).
_Stored = tuple[str, str, int, "int | None"]


def store_outputs(
    session_factory: Callable[[], Session],
    store: ObjectStore,
    account_id: int,
    files: list[tuple[Path | str, str]] | list[tuple[Path | str, str, int]],
    store_by: float | None = None,
    on_late: Callable[[], Exception] | None = None,
    contents: dict[str, bytes] | None = None,
) -> int:
    """Store a run's output files (path, sha256[, size]) as blobs of the account; returns how
    many objects were written. A file the account has stored already is touched, not sent
    again. ``contents``: bytes of small files already read, by path (the worker kept them as
    it hashed them), packed without reading the files again.

    For thousands of small files (one per record or tile): one query for what is stored, one
    HEAD per object that holds it, the new small files packed (``PACK_MAX_BLOB_BYTES`` each at
    most, into packs of ``PACK_TARGET_BYTES``), the packs and the larger files' PUTs
    ``OUTPUT_STORE_THREADS`` at a time, one insert for their rows. Nothing is read back: the
    worker hashed these bytes itself, from a folder nothing can change any more (the sandbox
    has ended); a packed file is hashed again as it is packed, and an S3 store checks each
    body against its digest as it arrives (``ChecksumSHA256``). Past ``store_by`` (a
    ``time.monotonic()``) what is not sent yet is not sent: ``on_late()`` is raised; rows for
    what was sent are still written, so no stored object is left without one."""
    from rgrid.core.db import session_scope

    wanted: dict[str, Path | str] = {}
    listed: dict[str, int] = {}
    for path, digest, *size in files:
        wanted.setdefault(digest, path)
        if size:
            listed[digest] = size[0]
    with session_scope(session_factory) as session:
        known = {
            digest: (blob.id, blob.object_key)
            for digest, blob in blobs_for(session, account_id, list(wanted)).items()
        }

    def late() -> bool:
        return store_by is not None and time.monotonic() > store_by

    def put(digest: str) -> list[_Stored]:
        if late():
            return []
        key = cache_keys.blob_object_key(account_id, secrets.token_hex(16))
        path = wanted[digest]
        with open(path, "rb") as fh:
            store.put_stream(key, fh, sha256=digest)
            size = os.fstat(fh.fileno()).st_size
        return [(digest, key, size, None)]

    packing = threading.BoundedSemaphore(PACKS_AT_ONCE)
    held = contents or {}

    def put_pack(members: list[str]) -> list[_Stored]:
        if late():
            return []
        key = cache_keys.pack_object_key(account_id, secrets.token_hex(16))
        with packing:
            data = bytearray()
            entries: list[_Stored] = []
            for digest in members:
                chunk = held.get(str(wanted[digest]))
                if chunk is None:
                    with open(wanted[digest], "rb") as fh:
                        chunk = fh.read()
                if sha256_bytes(chunk) != digest:
                    name = os.path.basename(wanted[digest])
                    raise RGridError(f"output {name} changed while it was stored")
                entries.append((digest, key, len(chunk), len(data)))
                data += chunk
            store.put_bytes(key, bytes(data), sha256=sha256_bytes(data))
        return entries

    written: list[_Stored] = []
    with ThreadPoolExecutor(OUTPUT_STORE_THREADS, thread_name_prefix="rgrid-outputs") as pool:
        # A row whose object vanished is replaced, as ``store_file`` does.
        present = exists_many(store, [key for _, key in known.values()])
        kept = {digest: present[key] for digest, (_, key) in known.items()}
        gone = [digest for digest, ok in kept.items() if not ok]
        new = [digest for digest in wanted if not kept.get(digest)]
        sizes = {d: listed[d] if d in listed else os.stat(wanted[d]).st_size for d in new}
        small = [d for d in new if sizes[d] <= PACK_MAX_BLOB_BYTES]
        if len(small) < PACK_MIN_FILES:
            small = []
        packed = set(small)
        jobs: list[Callable[[], list[_Stored]]] = [
            functools.partial(put_pack, members)
            for members in plan_packs([(d, sizes[d]) for d in small])
        ]
        jobs += [functools.partial(put, d) for d in new if d not in packed]
        try:
            for result in pool.map(lambda job: job(), jobs):
                written.extend(result)
        finally:
            _record_outputs(session_factory, store, account_id, known, kept, gone, written)
    if late() and len(written) < len(new):
        raise (on_late() if on_late else RGridError("time limit reached while storing outputs"))
    return len({key for _, key, _, _ in written})


def _record_outputs(
    session_factory: Callable[[], Session],
    store: ObjectStore,
    account_id: int,
    known: dict[str, tuple[int, str]],
    kept: dict[str, bool],
    gone: list[str],
    written: list[_Stored],
) -> None:
    """One transaction: rows for the objects just written (a concurrent writer's row wins,
    and our copy is deleted: a pack only if none of its blobs got a row), and the reused ones
    touched."""
    from rgrid.core.db import session_scope

    with session_scope(session_factory) as session:
        if gone:
            session.execute(Blob.__table__.delete().where(Blob.id.in_([known[d][0] for d in gone])))
        now = utcnow()
        rows = [
            {
                "account_id": account_id,
                "digest": digest,
                "size": size,
                "object_key": key,
                "pack_offset": offset,
                "use_count": 0,
                "created_at": now,
                "last_used_at": now,
            }
            for digest, key, size, offset in written
        ]
        inserted = _insert_new(session, rows) if rows else set()
        lost = [digest for digest, _, _, _ in written if digest not in inserted]
        referenced = {key for digest, key, _, _ in written if digest in inserted}
        unreferenced = {key for _, key, _, _ in written} - referenced
        reused = [known[d][0] for d, ok in kept.items() if ok]
        if lost:
            reused += [b.id for b in blobs_for(session, account_id, lost).values()]
        touch_all(session, reused)
    for key in unreferenced:
        store.delete(key)  # a concurrent run stored the same bytes first: its copy is kept


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
