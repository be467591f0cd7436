"""Issue 24, item 3: a run may leave thousands of small output files (one per record or tile).

Against the real pipeline (PostgreSQL, Redis, Docker, the S3 endpoint): 2,000 outputs are
stored and listed; a file stored before is reused, not stored again; two outputs of the same
bytes are one blob; a run over the file limit ends ``failed`` naming the limit and stores
nothing."""

from __future__ import annotations

import hashlib

from rgrid import executions as svc
from rgrid.db import session_scope
from rgrid.models import Blob
from rgrid.pipeline import run_all
from tests.integration.test_tenant_limits import _execution, limited

TILES = """
import os
os.makedirs('/work/outputs/tiles', exist_ok=True)
for i in range({count}):
    with open(f'/work/outputs/tiles/{{i:05}}.txt', 'w') as fh:
        fh.write(f'tile {{i}}\\n' + 'x' * 1000)
with open('/work/outputs/same-a.txt', 'w') as fh:
    fh.write('same bytes')
with open('/work/outputs/same-b.txt', 'w') as fh:
    fh.write('same bytes')
"""


def _blobs(ctx, account_id: int) -> dict[str, Blob]:
    with session_scope(ctx.session_factory) as session:
        rows = session.query(Blob).filter_by(account_id=account_id).all()
        session.expunge_all()
        return {row.digest: row for row in rows}


def _tile(i: int) -> bytes:
    return (f"tile {i}\n" + "x" * 1000).encode()


def test_2000_outputs_are_stored_listed_and_reused(ctx, submit, account):
    first = submit(TILES.format(count=2000))
    run_all(ctx, first)
    execution = _execution(ctx, first)
    assert execution["status"] == "succeeded", execution["error"]
    assert len(execution["outputs"]) == 2002
    stored = _blobs(ctx, account.id)
    # 2,000 tiles and one blob for the two files of the same bytes.
    assert len(stored) == 2001
    for i in (0, 999, 1999):
        digest = hashlib.sha256(_tile(i)).hexdigest()
        assert ctx.store.get_bytes(stored[digest].object_key) == _tile(i)
    same = stored[hashlib.sha256(b"same bytes").hexdigest()]
    assert ctx.store.get_bytes(same.object_key) == b"same bytes"
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, first)
        listing = svc.output_listing(session, row, ctx.store)
    assert [item["path"] for item in listing][:2] == ["same-a.txt", "same-b.txt"]
    assert len(listing) == 2002 and all(item["url"] for item in listing)

    # The same outputs again: nothing is written, each blob counts one more use.
    second = submit(TILES.format(count=2000) + "\n# another script\n")
    run_all(ctx, second)
    assert _execution(ctx, second)["status"] == "succeeded"
    again = _blobs(ctx, account.id)
    assert {d: b.object_key for d, b in again.items()} == {
        d: b.object_key for d, b in stored.items()
    }
    assert all(again[d].use_count == stored[d].use_count + 1 for d in stored)


def test_an_output_whose_stored_object_vanished_is_stored_again(ctx, submit, account):
    first = submit(TILES.format(count=3))
    run_all(ctx, first)
    stored = _blobs(ctx, account.id)
    lost = stored[hashlib.sha256(_tile(1)).hexdigest()]
    ctx.store.delete(lost.object_key)
    second = submit(TILES.format(count=3) + "\n# again\n")
    run_all(ctx, second)
    assert _execution(ctx, second)["status"] == "succeeded"
    again = _blobs(ctx, account.id)
    assert again[lost.digest].object_key != lost.object_key
    assert ctx.store.get_bytes(again[lost.digest].object_key) == _tile(1)


def test_a_run_over_the_output_file_limit_stores_nothing(ctx, account):
    few = limited(ctx, max_output_files=100)
    with session_scope(few.session_factory) as session:
        execution_id = svc.create_execution(
            session,
            few.store,
            few.settings,
            account_id=account.id,
            script=TILES.format(count=150),
            script_name="job.py",
        ).id
    run_all(few, execution_id)
    few.join_background()
    execution = _execution(few, execution_id)
    assert execution["status"] == "failed"
    assert execution["exit_code"] == 0
    assert execution["error"] == ("output file limit reached: more than 100 files in /work/outputs")
    assert execution["outputs"] in (None, [])
    assert _blobs(ctx, account.id) == {}
