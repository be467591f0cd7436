"""Files arriving from a client: presigned uploads (single or multipart), their completion and
check, the account's staging room and abandoned uploads, and small files sent inline.

Uploaded bytes land under a staging key (``uploads/...``), the only kind of key a presigned URL
ever names, with a URL bound to the declared size that expires minutes after it is issued. Only
the server, once it has checked size and digest, copies them to the blob's own key
(``blobs/<account>/<digest>``), so a URL reused after the check writes nothing any run reads. A
client that lied about its digest gets an error and its bytes are deleted.
"""

from __future__ import annotations

import secrets
from datetime import UTC, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput, NotFound, OverQuota, RGridError
from rgrid.core.models import Account, Blob, Upload, utcnow
from rgrid.core.units import human_bytes
from rgrid.store.blobs import (
    adopt,
    blobs_for,
    check_digest,
    check_size,
    check_stored_digest,
    check_stored_size,
    find_blob,
    touch,
)
from rgrid.store.objectstore import ObjectStore, PresigningStore, all_exist

#: The pace a part's URL lifetime allows for the parts before it (a 5 GiB file: 85 minutes).
SLOW_UPLOAD_BYTES_PER_S = 1024**2


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
    check_stored_size(store, staging, store.size(staging), upload.size)
    existing = find_blob(session, account_id, upload.digest)
    if existing is not None and store.exists(existing.object_key):
        # Stored already (a concurrent upload of the same file): the promise is still checked.
        check_stored_digest(store, staging, upload.digest, upload.size)
        store.delete(staging)
        touch(existing)
        return existing
    key = cache_keys.blob_content_key(account_id, upload.digest)
    store.copy(staging, key)
    store.delete(staging)
    return adopt(session, store, account_id, key, upload.digest, upload.size)


def upload_lifetime_s(settings: Settings, upload: Upload) -> float:
    """How long after it started an upload may still receive bytes: its last URL's lifetime
    (``start_upload``: a part's URL allows for the parts before it)."""
    lifetime = settings.upload_url_expiry_s
    if upload.multipart_id:
        lifetime += upload.size // SLOW_UPLOAD_BYTES_PER_S
    return lifetime


def purge_abandoned_uploads(
    store: ObjectStore, session: Session, settings: Settings, account_id: int | None = None
) -> tuple[int, int]:
    """Uploads never completed whose URLs expired ``upload_abandon_grace_s`` ago (a small
    file's: 20 minutes after it started, by default), and their staged bytes: (count, bytes
    they announced). Run every few minutes by beat (issue 24: one tenant must not keep the
    store full of unchecked bytes for a day), and for one account before its new upload is
    counted against its cap."""
    now = utcnow()
    query = select(Upload).where(
        Upload.created_at
        < now - timedelta(seconds=settings.upload_url_expiry_s + settings.upload_abandon_grace_s)
    )
    if account_id is not None:
        query = query.where(Upload.account_id == account_id)
    abandoned = [
        upload
        for upload in session.scalars(query)
        if _aware(upload.created_at)
        + timedelta(seconds=upload_lifetime_s(settings, upload) + settings.upload_abandon_grace_s)
        < now
    ]
    for upload in abandoned:
        if upload.multipart_id and hasattr(store, "abort_multipart"):
            store.abort_multipart(upload.object_key, upload.multipart_id)
        store.delete(upload.object_key)
        session.delete(upload)
    session.flush()
    return len(abandoned), sum(upload.size for upload in abandoned)


def _aware(moment):
    """SQLite hands back naive datetimes (stored as UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
