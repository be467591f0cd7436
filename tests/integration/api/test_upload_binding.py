"""Issue 24, item 4: a presigned upload is bound to what it claimed, and one account cannot
fill the store with staged bytes. Through the real API (HTTP) and the S3 endpoint the tests
use (moto), with the CLI's own client where it uploads."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from rgrid.client.remote import RemoteClient
from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.models import Account, Blob, Upload, utcnow
from rgrid.service.accounts import issue_key
from rgrid.store.inputs import InputFile, hash_files
from rgrid.store.s3store import checksum_sha256
from rgrid.store.uploads import purge_abandoned_uploads

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def capped(server_settings):
    """Small caps, so that a test reaches them with a few tiny files."""
    return replace(server_settings, max_open_uploads=3, max_staged_bytes=10_000)


@pytest.fixture(scope="module")
def api_url(capped) -> Iterator[str]:
    from werkzeug.serving import make_server

    from rgrid.api import create_app

    server = make_server("127.0.0.1", 0, create_app(capped), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.fixture
def key(ctx, account) -> str:
    with session_scope(ctx.session_factory) as session:
        return issue_key(session, session.get(Account, account.id))[1]


def _start(api_url: str, key: str, data: bytes, size: int | None = None) -> requests.Response:
    return requests.post(
        f"{api_url}/uploads",
        json={
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data) if size is None else size,
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def _complete(api_url: str, key: str, upload_id: str) -> requests.Response:
    return requests.post(
        f"{api_url}/uploads/{upload_id}/complete",
        json={"parts": []},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def _staged(ctx, account) -> list[str]:
    return ctx.store.keys_older_than(f"{cache_keys.UPLOAD_STAGING_PREFIX}{account.id}/", 0)


def _open_uploads(ctx, account) -> int:
    with session_scope(ctx.session_factory) as session:
        return session.query(Upload).filter_by(account_id=account.id).count()


def test_the_url_is_signed_with_the_length_and_sha256_and_the_cli_sends_them(
    ctx, account, key, api_url, tmp_path
):
    data = b"bound to its claim\n"
    plan = _start(api_url, key, data).json()
    signed = parse_qs(urlsplit(plan["url"]).query)["X-Amz-SignedHeaders"][0].split(";")
    assert {"content-length", "x-amz-checksum-sha256"} <= set(signed)
    assert plan["headers"] == {"x-amz-checksum-sha256": checksum_sha256(_sha(data))}
    _complete(api_url, key, plan["upload_id"])  # never sent: refused, row gone

    path = tmp_path / "input.txt"
    path.write_bytes(data)
    item = InputFile(name=path.name, path=path, size=len(data), sha256="")
    hash_files([item])
    RemoteClient(api_url.removesuffix("/v1"), key, retry_s=0).upload(item, lambda n: None)
    with session_scope(ctx.session_factory) as session:
        blob = session.query(Blob).filter_by(account_id=account.id, digest=_sha(data)).one()
        assert ctx.store.get_bytes(blob.object_key) == data
    assert _staged(ctx, account) == [] and _open_uploads(ctx, account) == 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_20_mib_sent_for_a_1_byte_claim_is_refused_and_deleted(ctx, account, key, api_url):
    plan = _start(api_url, key, b"x").json()
    big = b"x" * (20 * MiB)
    sent = requests.put(plan["url"], data=big, headers=plan["headers"], timeout=120)
    # moto 5.2 takes it (it checks no presigned signature); S3 refuses it (the signed length).
    if sent.ok:
        assert len(_staged(ctx, account)) == 1
    answer = _complete(api_url, key, plan["upload_id"])
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        f"the upload is larger than declared ({20 * MiB} bytes arrived, 1 declared): "
        "nothing was stored"
    )
    assert _staged(ctx, account) == [] and _open_uploads(ctx, account) == 0


def test_open_uploads_and_staged_bytes_are_capped_per_account(ctx, account, key, api_url):
    started = [_start(api_url, key, secrets.token_bytes(10)) for _ in range(3)]
    assert [r.status_code for r in started] == [201, 201, 201]
    fourth = _start(api_url, key, b"one more")
    assert fourth.status_code == 429
    assert fourth.json()["error"] == (
        "3 uploads of this account are already in progress, the most allowed "
        "(RGRID_MAX_OPEN_UPLOADS): let them finish first"
    )
    # Another account is not held up by this one's uploads.
    with session_scope(ctx.session_factory) as session:
        other = Account(id=account.id + 1, name=f"other-{secrets.token_hex(4)}")
        session.add(other)
        session.flush()
        _, other_key = issue_key(session, other)
    assert _start(api_url, other_key, b"one more").status_code == 201

    # Completing (here: a refused completion) frees the room.
    for answer in started:
        _complete(api_url, key, answer.json()["upload_id"])
    assert _open_uploads(ctx, account) == 0
    assert _start(api_url, key, b"a", size=6_000).status_code == 201
    over = _start(api_url, key, b"b", size=6_000)
    assert over.status_code == 429
    assert over.json()["error"] == (
        "uploads in progress would hold 11.7 KiB, over this account's 9.8 KiB staging limit "
        "(RGRID_MAX_STAGED_BYTES): let them finish first"
    )


def _backdate(ctx, account, seconds: float) -> None:
    with session_scope(ctx.session_factory) as session:
        for upload in session.query(Upload).filter_by(account_id=account.id):
            upload.created_at = utcnow() - timedelta(seconds=seconds)


def test_abandoned_uploads_and_their_bytes_are_purged_within_the_hour(
    ctx, account, key, api_url, capped
):
    plan = _start(api_url, key, b"abandoned").json()
    requests.put(plan["url"], data=b"abandoned", headers=plan["headers"], timeout=30)
    assert len(_staged(ctx, account)) == 1
    # Its URL expired, but not yet the grace after it: kept.
    _backdate(ctx, account, capped.upload_url_expiry_s + 60)
    with session_scope(ctx.session_factory) as session:
        purge_abandoned_uploads(ctx.store, session, capped, account.id)
    assert _open_uploads(ctx, account) == 1
    # Past the grace (20 minutes after it started, with the default settings): gone.
    _backdate(ctx, account, capped.upload_url_expiry_s + capped.upload_abandon_grace_s + 1)
    with session_scope(ctx.session_factory) as session:
        removed = purge_abandoned_uploads(ctx.store, session, capped)
    assert removed[0] >= 1
    assert _open_uploads(ctx, account) == 0 and _staged(ctx, account) == []

    # Beat runs the job well within the hour.
    import celeryconfig
    from rgrid.core import queueing

    (job,) = [j for j in celeryconfig.beat_schedule.values() if j["task"] == queueing.PURGE_UPLOADS]
    assert job["schedule"] + capped.upload_url_expiry_s + capped.upload_abandon_grace_s <= 3600


def test_a_multipart_upload_is_not_abandoned_while_its_part_urls_live(ctx, account, capped):
    with session_scope(ctx.session_factory) as session:
        session.add(
            Upload(
                id=secrets.token_hex(16),
                account_id=account.id,
                digest="0" * 64,
                size=4 * 1024**3,  # its last part's URL lives ~68 minutes longer
                object_key=cache_keys.upload_staging_key(account.id, "big"),
                multipart_id="not-started",
                created_at=utcnow() - timedelta(hours=1),
            )
        )
    with session_scope(ctx.session_factory) as session:
        purge_abandoned_uploads(ctx.store, session, capped, account.id)
    assert _open_uploads(ctx, account) == 1


def test_an_accounts_abandoned_uploads_do_not_hold_its_cap(ctx, account, key, api_url, capped):
    for _ in range(3):
        assert _start(api_url, key, secrets.token_bytes(10)).status_code == 201
    assert _start(api_url, key, b"held").status_code == 429
    _backdate(ctx, account, capped.upload_url_expiry_s + capped.upload_abandon_grace_s + 1)
    assert _start(api_url, key, b"held").status_code == 201
    assert _open_uploads(ctx, account) == 1
