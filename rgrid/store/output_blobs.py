"""A run's output files stored as blobs of its account: the new ones sent many at a time, the
small ones packed, rows written for what was sent and the reused ones touched.

Small outputs are packed, as content-addressed stores do it (git's packfiles, REAPI's batch
blob calls, restic's packs): one object holds many blobs back to back, and each blob's row
names the pack, its offset and its size, so every output keeps its own digest (reuse, the
output cache and `rgrid why` refer to outputs by digest, as before). 10,000 outputs of 1 KiB
are one PUT and one GET instead of 10,000 of each (moto here: ~200 PUTs/s).
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.errors import RGridError
from rgrid.core.hashing import sha256_bytes
from rgrid.core.models import Blob, utcnow
from rgrid.store.blobs import blobs_for, touch_all
from rgrid.store.objectstore import ObjectStore, exists_many

#: Objects stored at once: each is one PUT, and the store's round trip, not bandwidth, bounds
#: many small files (moto here: ~70 PUTs/s one at a time, ~200/s sixteen at a time).
OUTPUT_STORE_THREADS = 16
#: Outputs up to this size are packed; larger ones stay an object each.
PACK_MAX_BLOB_BYTES = 64 * 1024
#: A pack is closed once it holds this many bytes (one PUT of at most this plus one blob).
PACK_TARGET_BYTES = 16 * 1024**2
#: Fewer new small outputs than this are stored an object each: one round of concurrent PUTs
#: costs about what a pack's PUT does, and one object lost from the store then loses one file.
PACK_MIN_FILES = OUTPUT_STORE_THREADS
#: Packs assembled and sent at once (each is held in memory while it is sent: 64 MiB at most).
PACKS_AT_ONCE = 4


#: What one stored object holds: (digest, object key, size, offset in a pack or None).
_Stored = tuple[str, str, int, "int | None"]


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
    wanted, listed = _by_digest(files)
    with session_scope(session_factory) as session:
        known = {
            digest: (blob.id, blob.object_key)
            for digest, blob in blobs_for(session, account_id, list(wanted)).items()
        }
    writer = _Writer(store, account_id, wanted, store_by, contents or {})
    written: list[_Stored] = []
    with ThreadPoolExecutor(OUTPUT_STORE_THREADS, thread_name_prefix="rgrid-outputs") as pool:
        # A row whose object vanished is replaced, as ``store_file`` does.
        present = exists_many(store, [key for _, key in known.values()])
        kept = {digest: present[key] for digest, (_, key) in known.items()}
        gone = [digest for digest, ok in kept.items() if not ok]
        new = [digest for digest in wanted if not kept.get(digest)]
        sizes = {d: listed[d] if d in listed else os.stat(wanted[d]).st_size for d in new}
        try:
            for result in pool.map(lambda job: job(), _jobs(writer, new, sizes)):
                written.extend(result)
        finally:
            _record_outputs(session_factory, store, account_id, known, kept, gone, written)
    if writer.late() and len(written) < len(new):
        raise (on_late() if on_late else RGridError("time limit reached while storing outputs"))
    return len({key for _, key, _, _ in written})


def _by_digest(
    files: list[tuple[Path | str, str]] | list[tuple[Path | str, str, int]],
) -> tuple[dict[str, Path | str], dict[str, int]]:
    """(digest -> the first path with it, digest -> its size where the caller listed one)."""
    wanted: dict[str, Path | str] = {}
    listed: dict[str, int] = {}
    for path, digest, *size in files:
        wanted.setdefault(digest, path)
        if size:
            listed[digest] = size[0]
    return wanted, listed


def _jobs(
    writer: _Writer, new: list[str], sizes: dict[str, int]
) -> list[Callable[[], list[_Stored]]]:
    """The PUTs to make: a pack per ``PACK_TARGET_BYTES`` of the new small files (if there
    are ``PACK_MIN_FILES`` of them), then one per other new file."""
    small = [d for d in new if sizes[d] <= PACK_MAX_BLOB_BYTES]
    if len(small) < PACK_MIN_FILES:
        small = []
    packed = set(small)
    jobs: list[Callable[[], list[_Stored]]] = [
        functools.partial(writer.put_pack, members)
        for members in plan_packs([(d, sizes[d]) for d in small])
    ]
    jobs += [functools.partial(writer.put, d) for d in new if d not in packed]
    return jobs


@dataclass
class _Writer:
    """Sends one output, or one pack of them, to the store; nothing once ``store_by`` passed."""

    store: ObjectStore
    account_id: int
    wanted: dict[str, Path | str]
    store_by: float | None
    held: dict[str, bytes]
    packing: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(PACKS_AT_ONCE)
    )

    def late(self) -> bool:
        return self.store_by is not None and time.monotonic() > self.store_by

    def put(self, digest: str) -> list[_Stored]:
        if self.late():
            return []
        key = cache_keys.blob_object_key(self.account_id, secrets.token_hex(16))
        path = self.wanted[digest]
        with open(path, "rb") as fh:
            self.store.put_stream(key, fh, sha256=digest)
            size = os.fstat(fh.fileno()).st_size
        return [(digest, key, size, None)]

    def put_pack(self, members: list[str]) -> list[_Stored]:
        if self.late():
            return []
        key = cache_keys.pack_object_key(self.account_id, secrets.token_hex(16))
        with self.packing:
            data = bytearray()
            entries: list[_Stored] = []
            for digest in members:
                chunk = self.held.get(str(self.wanted[digest]))
                if chunk is None:
                    with open(self.wanted[digest], "rb") as fh:
                        chunk = fh.read()
                if sha256_bytes(chunk) != digest:
                    name = os.path.basename(self.wanted[digest])
                    raise RGridError(f"output {name} changed while it was stored")
                entries.append((digest, key, len(chunk), len(data)))
                data += chunk
            self.store.put_bytes(key, bytes(data), sha256=sha256_bytes(data))
        return entries


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
