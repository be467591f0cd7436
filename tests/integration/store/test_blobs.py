"""Blobs on the real S3 endpoint, PostgreSQL and Docker: presigned uploads checked against
their digest, per-account isolation, the worker's verification and cache."""

import hashlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests

from rgrid.client.remote import RemoteClient
from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.core.models import Account, Blob, Upload
from rgrid.service import executions as svc
from rgrid.service.accounts import issue_key
from rgrid.store import blobs, uploads
from rgrid.store.inputs import InputFile, hash_files
from tests.conftest import stored_log

#: S3's smallest part: files above it go up in parts.
PART = 5 * 1024 * 1024


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def api_url(server_settings) -> Iterator[str]:
    """The API on a real port (5 MiB parts), for the CLI's own client to upload through."""
    from werkzeug.serving import make_server

    from rgrid.api import create_app

    app = create_app(replace(server_settings, upload_part_bytes=PART))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def upload(ctx, api_url, tmp_path):
    """Send bytes as the CLI does (rgrid.client.remote: start, presigned PUTs, complete) as
    an account; returns their digest and the length of each PUT."""

    def _upload(account_id: int, data: bytes, claimed: str | None = None):
        with session_scope(ctx.session_factory) as session:
            _, key = issue_key(session, session.get(Account, account_id))
        path = tmp_path / secrets.token_hex(8)
        path.write_bytes(data)
        item = InputFile(name=path.name, path=path, size=len(data), sha256=claimed or "")
        if claimed is None:
            hash_files([item])
        sent: list[int] = []
        RemoteClient(api_url, key, retry_s=0).upload(item, sent.append)
        return item.sha256, sent

    return _upload


def _missing(ctx, account_id: int, digests: list[str]) -> list[str]:
    with session_scope(ctx.session_factory) as session:
        return blobs.missing_digests(session, ctx.store, account_id, digests)


def test_a_presigned_upload_is_stored_once_verified(ctx, account, upload):
    data = secrets.token_bytes(1000)
    digest = _digest(data)
    assert _missing(ctx, account.id, [digest]) == [digest]
    upload(account.id, data)
    assert _missing(ctx, account.id, [digest]) == []
    with session_scope(ctx.session_factory) as session:
        blob = blobs.find_blob(session, account.id, digest)
        assert blob.size == 1000 and ctx.store.get_bytes(blob.object_key) == data


def test_large_files_go_up_in_parts(ctx, account, upload, monkeypatch):
    puts: list[int] = []
    put = RemoteClient._put
    monkeypatch.setattr(
        RemoteClient, "_put", lambda self, url, body: puts.append(len(body)) or put(self, url, body)
    )
    data = secrets.token_bytes(11 * 1024 * 1024)
    digest, sent = upload(account.id, data)
    assert puts == [PART, PART, 1024 * 1024]
    assert sum(sent) == len(data) and max(sent) <= 1024 * 1024  # streamed, in 1 MiB reads
    with session_scope(ctx.session_factory) as session:
        assert blobs.find_blob(session, account.id, digest).size == len(data)
    assert _missing(ctx, account.id, [digest]) == []


def test_a_wrong_digest_is_refused_and_nothing_is_referenced(ctx, account, upload):
    data = b"the real bytes"
    claimed = _digest(b"what the client claimed")
    with pytest.raises(BadInput, match="do not match their digest"):
        upload(account.id, data, claimed=claimed)
    assert _missing(ctx, account.id, [claimed]) == [claimed]
    with session_scope(ctx.session_factory) as session:
        assert session.query(Upload).filter_by(account_id=account.id).count() == 0
        assert session.query(Blob).filter_by(account_id=account.id).count() == 0


def test_a_cut_off_upload_references_nothing_and_the_next_run_uploads_again(ctx, account, upload):
    settings = replace(ctx.settings, upload_part_bytes=PART)
    data = secrets.token_bytes(11 * 1024 * 1024)
    digest = _digest(data)
    with session_scope(ctx.session_factory) as session:
        plan = uploads.start_upload(session, ctx.store, settings, account.id, digest, len(data))
    first = plan["parts"][0]  # the connection drops after the first part
    response = requests.put(first["url"], data=data[: first["length"]], timeout=60)
    parts = [{"part_number": 1, "etag": response.headers["ETag"]}]
    with pytest.raises(BadInput, match="cut off"), session_scope(ctx.session_factory) as session:
        uploads.complete_upload(session, ctx.store, account.id, plan["upload_id"], parts)
    assert _missing(ctx, account.id, [digest]) == [digest]
    upload(account.id, data)  # the next run sends it whole
    assert _missing(ctx, account.id, [digest]) == []


def test_a_single_put_that_never_arrived_is_refused(ctx, account):
    digest = _digest(b"never sent")
    with session_scope(ctx.session_factory) as session:
        plan = uploads.start_upload(session, ctx.store, ctx.settings, account.id, digest, 10)
    with pytest.raises(BadInput, match="never arrived"), session_scope(ctx.session_factory) as s:
        uploads.complete_upload(s, ctx.store, account.id, plan["upload_id"], None)
    assert _missing(ctx, account.id, [digest]) == [digest]


def test_accounts_never_see_each_others_blobs(ctx, account, upload):
    from rgrid.service.accounts import create_account

    data = secrets.token_bytes(64)
    digest, _ = upload(account.id, data)
    with session_scope(ctx.session_factory) as session:
        other = create_account(session, f"other-{secrets.token_hex(4)}").id
    assert _missing(ctx, other, [digest]) == [digest]
    with (
        session_scope(ctx.session_factory) as session,
        pytest.raises(BadInput, match="not uploaded"),
    ):
        svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=other,
            script="pass\n",
            script_name="job.py",
            inputs=[{"path": "x.bin", "sha256": digest, "size": 64}],
        )
    upload(other, data)  # its own copy
    with session_scope(ctx.session_factory) as session:
        mine = blobs.find_blob(session, account.id, digest)
        theirs = blobs.find_blob(session, other, digest)
        assert mine.object_key != theirs.object_key


def test_a_blob_whose_object_vanished_is_missing_again(ctx, account, upload):
    digest, _ = upload(account.id, b"soon deleted")
    with session_scope(ctx.session_factory) as session:
        ctx.store.delete(blobs.find_blob(session, account.id, digest).object_key)
    assert _missing(ctx, account.id, [digest]) == [digest]


READER = """\
import os, sys
for name in sys.argv[1:]:
    print(name, open(name, 'rb').read().decode(errors='replace').strip())
os.makedirs('outputs/nested', exist_ok=True)
open('outputs/nested/count.txt', 'w').write(str(len(sys.argv) - 1))
"""


def _run_with_inputs(ctx, account, run_script, upload, files: dict[str, bytes]) -> dict:
    """Upload what the account lacks (as the CLI does), then run READER on the files."""
    manifest = []
    for name, data in files.items():
        digest = _digest(data)
        if _missing(ctx, account.id, [digest]):
            upload(account.id, data)
        manifest.append({"path": name, "sha256": digest, "size": len(data)})
    return run_script(READER, inputs=manifest, args=list(files))


def test_inputs_are_placed_under_work_with_their_names(ctx, account, run_script, upload):
    files = {"data/a.csv": b"alpha\n", "data/deep/b.csv": b"beta\n", "top.txt": b"top\n"}
    result = _run_with_inputs(ctx, account, run_script, upload, files)
    assert result["status"] == "succeeded", result["error"]
    assert stored_log(ctx, result["execution_id"], "stdout") == (
        "data/a.csv alpha\ndata/deep/b.csv beta\ntop.txt top\n"
    )
    assert result["outputs"][0]["path"] == "nested/count.txt"
    assert result["input_hash"] is not None


def test_worker_verifies_downloads_and_caches_them(ctx, account, run_script, upload):
    data = secrets.token_bytes(256)
    digest, _ = upload(account.id, data)
    cache = ctx.settings.blob_cache_dir / str(account.id)
    shutil.rmtree(cache / digest[:2], ignore_errors=True)
    with session_scope(ctx.session_factory) as session:
        key = blobs.find_blob(session, account.id, digest).object_key
    ctx.store.put_bytes(key, b"tampered with in the store")  # the store lies
    corrupt = _run_with_inputs(ctx, account, run_script, upload, {"in.bin": data})
    assert corrupt["status"] == "error" and "corrupt" in corrupt["error"]
    assert not (cache / digest[:2] / digest).exists()

    ctx.store.put_bytes(key, data)
    good = _run_with_inputs(ctx, account, run_script, upload, {"in.bin": data})
    assert good["status"] == "succeeded"
    assert (cache / digest[:2] / digest).read_bytes() == data
    ctx.store.put_bytes(key, b"changed again")  # a repeat never downloads: the cache serves it
    again = _run_with_inputs(ctx, account, run_script, upload, {"in.bin": data})
    assert again["status"] == "succeeded"
    ctx.store.put_bytes(key, data)


def test_identical_outputs_are_stored_once(ctx, account, run_script):
    script = "open('outputs/same.txt', 'w').write('same bytes')\n"
    first = run_script(script)
    second = run_script(script + "# another script, same output\n")
    digest = first["outputs"][0]["sha256"]
    assert second["outputs"][0]["sha256"] == digest
    with session_scope(ctx.session_factory) as session:
        assert session.query(Blob).filter_by(account_id=account.id, digest=digest).count() == 1


def test_large_input_is_streamed_into_the_container(ctx, account, run_script, tmp_path, upload):
    size = 64 * 1024 * 1024
    data = os.urandom(size)
    result = _run_with_inputs(ctx, account, run_script, upload, {"big.bin": data})
    assert result["status"] == "succeeded", result["error"]
    assert stored_log(ctx, result["execution_id"], "stdout").startswith("big.bin ")


def test_concurrent_writers_of_the_same_bytes_end_with_one_blob(ctx, account, tmp_path):
    import threading

    path = tmp_path / "same.bin"
    path.write_bytes(secrets.token_bytes(4096))
    digest = _digest(path.read_bytes())
    errors = []

    def write() -> None:
        try:
            with session_scope(ctx.session_factory) as session:
                blobs.store_file(session, ctx.store, account.id, path, digest)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with session_scope(ctx.session_factory) as session:
        rows = session.query(Blob).filter_by(account_id=account.id, digest=digest).all()
        assert len(rows) == 1 and ctx.store.get_bytes(rows[0].object_key) == path.read_bytes()


def test_a_put_url_used_again_after_its_upload_changes_no_blob(
    ctx, account, run_script, upload, monkeypatch
):
    """Issue 10: the URL outlives the check, but writes only a staging key no run reads."""
    from rgrid.core import cache_keys
    from rgrid.service import maintenance

    urls: list[str] = []
    put = RemoteClient._put
    monkeypatch.setattr(
        RemoteClient, "_put", lambda self, url, *rest: urls.append(url) or put(self, url, *rest)
    )
    data = b"the verified bytes\n"
    digest, _ = upload(account.id, data)
    (url,) = urls
    assert "content-length" in url.lower() and "X-Amz-Expires=600" in url  # bound and brief
    with session_scope(ctx.session_factory) as session:
        key = blobs.find_blob(session, account.id, digest).object_key
    assert key == cache_keys.blob_content_key(account.id, digest)
    assert ctx.store.get_bytes(key) == data

    forged = b"X" * len(data)  # the same length: the signed size lets it through
    assert requests.put(url, data=forged, timeout=30).ok
    assert ctx.store.get_bytes(key) == data
    assert _missing(ctx, account.id, [digest]) == []
    result = _run_with_inputs(ctx, account, run_script, upload, {"in.txt": data})
    assert result["status"] == "succeeded", result["error"]
    assert stored_log(ctx, result["execution_id"], "stdout") == "in.txt the verified bytes\n"

    # The maintenance purge removes what the reused URL left; pending uploads' keys stay.
    with session_scope(ctx.session_factory) as session:
        pending = uploads.start_upload(session, ctx.store, ctx.settings, account.id, digest, 5)
    requests.put(pending["url"], data=b"12345", timeout=30)
    staged = [k for k in ctx.store.keys_older_than(f"uploads/{account.id}/", 0)]
    assert len(staged) == 2
    monkeypatch.setattr(maintenance, "STRAY_UPLOAD_AGE_S", 0)
    with session_scope(ctx.session_factory) as session:
        assert maintenance.purge_stray_uploads(ctx.store, session) >= 1
    assert ctx.store.keys_older_than(f"uploads/{account.id}/", 0) == [
        cache_keys.upload_staging_key(account.id, pending["upload_id"])
    ]


def test_more_bytes_than_declared_are_refused_and_nothing_is_stored(ctx, account):
    """moto ignores the signed Content-Length (real S3 refuses the PUT): the size is checked
    again on completion, before anything is read."""
    claimed = b"x"
    digest = _digest(claimed)
    with session_scope(ctx.session_factory) as session:
        plan = uploads.start_upload(session, ctx.store, ctx.settings, account.id, digest, 1)
    sent = requests.put(plan["url"], data=b"x" * (2 * 1024 * 1024), timeout=60)
    if sent.ok:
        with (
            pytest.raises(BadInput) as refused,
            session_scope(ctx.session_factory) as session,
        ):
            uploads.complete_upload(session, ctx.store, account.id, plan["upload_id"], None)
        assert refused.value.message == (
            "the upload is larger than declared (2097152 bytes arrived, 1 declared): "
            "nothing was stored"
        )
    assert _missing(ctx, account.id, [digest]) == [digest]
    assert ctx.store.keys_older_than(f"uploads/{account.id}/", 0) == []
    with session_scope(ctx.session_factory) as session:
        assert session.query(Upload).filter_by(account_id=account.id).count() == 0


def _inline(data: bytes) -> dict:
    import base64

    return {"sha256": _digest(data), "data": base64.b64encode(data).decode()}


def _source(path: str, data: bytes) -> dict:
    return {"path": path, "sha256": _digest(data), "size": len(data)}


TREE_MAIN = "import helper\nimport other\nprint('sum', helper.VALUE + other.VALUE)\n"


def test_inline_files_are_stored_as_blobs_and_the_host_cache_is_the_tree(
    ctx, account, run_script, monkeypatch
):
    """Small files sent in the submission itself become blobs as an upload's would (a repeat
    finds them); on the worker host the tree is made from its content-addressed copies, so
    after one module is edited only that one is fetched from the store."""
    helper, other = b"VALUE = 1\n", b"VALUE = 2  # " + secrets.token_hex(8).encode() + b"\n"
    sources = [_source("helper.py", helper), _source("other.py", other)]
    first = run_script(TREE_MAIN, sources=sources, inline=[_inline(helper), _inline(other)])
    assert first["status"] == "succeeded", first["error"]
    assert _missing(ctx, account.id, [_digest(helper), _digest(other)]) == []

    fetched: list[str] = []
    download = ctx.store.download
    monkeypatch.setattr(
        ctx.store, "download", lambda key, dest: fetched.append(key) or download(key, dest)
    )
    edited = b"VALUE = 10  # " + secrets.token_hex(8).encode() + b"\n"
    sources = [_source("helper.py", edited), _source("other.py", other)]
    second = run_script(TREE_MAIN, sources=sources, inline=[_inline(edited)])
    assert second["status"] == "succeeded", second["error"]
    assert second["source_digest"] != first["source_digest"]
    with session_scope(ctx.session_factory) as session:
        assert fetched == [blobs.find_blob(session, account.id, _digest(edited)).object_key]


@pytest.mark.parametrize(
    "inline, reason",
    [
        ([{"sha256": _digest(b"x = 1\n"), "data": "eCA9IDIK"}], "do not match their digest"),
        ([_inline(b"print('not named')\n")], "none of the submission's files"),
        ([{"sha256": _digest(b"x = 1\n"), "data": "not base64!"}], "not base64"),
    ],
)
def test_a_false_or_stray_inline_file_is_refused_and_nothing_is_stored(
    ctx, account, submit, inline, reason
):
    with pytest.raises(BadInput, match=reason):
        submit("import m\n", sources=[_source("m.py", b"x = 1\n")], inline=inline)
    with session_scope(ctx.session_factory) as session:
        assert session.query(Blob).filter_by(account_id=account.id).count() == 0


def test_inline_files_over_the_budget_are_refused(ctx, account):
    settings = replace(ctx.settings, inline_upload_bytes=10)
    data = b"VALUE = 'more than ten bytes'\n"
    with (
        pytest.raises(BadInput, match="RGRID_INLINE_UPLOAD_BYTES"),
        session_scope(ctx.session_factory) as session,
    ):
        svc.create_execution(
            session,
            ctx.store,
            settings,
            account_id=account.id,
            script="import m\n",
            script_name="job.py",
            sources=[_source("m.py", data)],
            inline=[_inline(data)],
        )


def test_a_blob_seen_recently_is_not_asked_about_again(ctx, account, upload, monkeypatch):
    """Within RGRID_BLOB_PRESENCE_TTL the API trusts an object it saw (no HEAD per file per
    run); with 0 it asks every time, and a vanished object is missing again."""
    digest, _ = upload(account.id, secrets.token_bytes(32))
    asked: list[str] = []
    exists = ctx.store.exists
    monkeypatch.setattr(ctx.store, "exists", lambda key: asked.append(key) or exists(key))

    def missing(ttl: float) -> list[str]:
        with session_scope(ctx.session_factory) as session:
            return blobs.missing_digests(session, ctx.store, account.id, [digest], ttl)

    assert missing(300) == [] and len(asked) == 1
    assert missing(300) == [] and len(asked) == 1
    with session_scope(ctx.session_factory) as session:
        ctx.store.delete(blobs.find_blob(session, account.id, digest).object_key)
    assert missing(0) == [digest] and len(asked) == 2
