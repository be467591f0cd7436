"""Issue 24, item 3: a run may leave thousands of small output files (one per record or tile).

Against the real pipeline (PostgreSQL, Redis, Docker, the S3 endpoint): 2,000 outputs are
stored in one pack and listed with it; a file stored before is reused, not stored again; two
outputs of the same bytes are one blob; a run over the file limit ends ``failed`` naming the
limit and stores nothing; a pack is purged only once none of its blobs is in use; a packed
output sent again as an input reaches the script by a ranged GET."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import update

from rgrid.core.db import session_scope
from rgrid.core.models import Blob, Execution, OutputCache, utcnow
from rgrid.pipeline import reuse
from rgrid.pipeline.chain import run_all
from rgrid.service import executions as svc
from rgrid.service import purge
from rgrid.store import blobs, output_blobs
from tests.conftest import stored_log
from tests.integration.host.test_tenant_limits import _execution, limited

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
    # 2,000 tiles and one blob for the two files of the same bytes, all in one pack (2 MB).
    assert len(stored) == 2001
    assert {blob.object_key for blob in stored.values()} == {stored[_digest(_tile(0))].object_key}
    assert all(blob.object_key.startswith("packs/") for blob in stored.values())
    assert sorted(blob.pack_offset for blob in stored.values())[0] == 0
    for i in (0, 999, 1999):
        digest = hashlib.sha256(_tile(i)).hexdigest()
        assert blobs.read_blob(ctx.store, stored[digest]) == _tile(i)
    same = stored[hashlib.sha256(b"same bytes").hexdigest()]
    assert blobs.read_blob(ctx.store, same) == b"same bytes"
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, first)
        listing = svc.output_listing(session, row, ctx.store)
    outputs = listing["outputs"]
    assert [item["path"] for item in outputs][:2] == ["same-a.txt", "same-b.txt"]
    # One URL for the pack, none per output: each output says where in the pack it is.
    assert len(outputs) == 2002 and len(listing["packs"]) == 1 and listing["packs"][0]["url"]
    assert all(item["pack"] == 0 and "url" not in item for item in outputs)
    assert outputs[0]["offset"] == outputs[1]["offset"]  # one blob, two names

    # The same outputs again: nothing is written, each blob counts one more use.
    second = submit(TILES.format(count=2000) + "\n# another script\n")
    run_all(ctx, second)
    assert _execution(ctx, second)["status"] == "succeeded"
    again = _blobs(ctx, account.id)
    assert {d: (b.object_key, b.pack_offset) for d, b in again.items()} == {
        d: (b.object_key, b.pack_offset) for d, b in stored.items()
    }
    assert all(again[d].use_count == stored[d].use_count + 1 for d in stored)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_few_small_outputs_stay_an_object_each(ctx, submit, account):
    """Under ``PACK_MIN_FILES`` new small files, one round of concurrent PUTs: no pack."""
    execution_id = submit(TILES.format(count=output_blobs.PACK_MIN_FILES - 3))
    run_all(ctx, execution_id)
    assert _execution(ctx, execution_id)["status"] == "succeeded"
    stored = _blobs(ctx, account.id)
    assert len(stored) == output_blobs.PACK_MIN_FILES - 2
    assert all(b.pack_offset is None and b.object_key.startswith("blobs/") for b in stored.values())


def test_a_lost_pack_is_stored_again_and_named_lost(ctx, submit, account):
    first = submit(TILES.format(count=40))
    run_all(ctx, first)
    stored = _blobs(ctx, account.id)
    (pack,) = {blob.object_key for blob in stored.values()}
    ctx.store.delete(pack)
    with session_scope(ctx.session_factory) as session:
        lost = svc.lost_objects(session, session.get(Execution, first), ctx.store)
    assert len(lost["lost_outputs"]) == 42 and "tiles/00039.txt" in lost["lost_outputs"]
    second = submit(TILES.format(count=40) + "\n# again\n")
    run_all(ctx, second)
    assert _execution(ctx, second)["status"] == "succeeded"
    again = _blobs(ctx, account.id)
    assert {blob.object_key for blob in again.values()} != {pack}
    assert blobs.read_blob(ctx.store, again[_digest(_tile(7))]) == _tile(7)


def _age(ctx, model, ids, days: int = 60) -> None:
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(model)
            .where(model.id.in_(list(ids)))
            .values(last_used_at=utcnow() - timedelta(days=days))
        )


def test_a_pack_is_purged_only_once_none_of_its_blobs_is_in_use(ctx, submit, account):
    """Run A packs tiles 0-39; run B writes tiles 20-59: 20-39 are A's blobs, used again (B's
    output-cache entry replays them), 40-59 a pack of B's. A month on, only A's entry and its
    own tiles 0-19 are stale: the purge drops their rows but keeps A's pack, which B's live
    entry still reads; B's repeat is still answered. Once everything is stale, both go."""
    shifted = TILES.replace("range({count})", "range(20, 20 + {count})")
    a = submit(TILES.format(count=40))
    run_all(ctx, a)
    b = submit(shifted.format(count=40))
    run_all(ctx, b)
    ctx.join_background()
    assert _execution(ctx, b)["status"] == "succeeded"
    stored = _blobs(ctx, account.id)
    pack_a = stored[_digest(_tile(0))].object_key
    pack_b = stored[_digest(_tile(59))].object_key
    assert pack_a != pack_b and stored[_digest(_tile(30))].object_key == pack_a
    only_a = [stored[_digest(_tile(i))].id for i in range(20)]
    _age(ctx, Blob, only_a)
    with session_scope(ctx.session_factory) as session:
        entry_a = session.query(OutputCache).filter_by(execution_id=a).one().id
    _age(ctx, OutputCache, [entry_a])

    removed = purge.purge_shared(ctx.settings, ctx.session_factory, ctx.store)
    assert removed["blobs"] >= 20 and removed["output_cache"] >= 1
    left = _blobs(ctx, account.id)
    assert not any(_digest(_tile(i)) in left for i in range(20))
    assert ctx.store.exists(pack_a) and ctx.store.exists(pack_b)
    assert blobs.read_blob(ctx.store, left[_digest(_tile(25))]) == _tile(25)
    with session_scope(ctx.session_factory) as session:
        entry_b = session.query(OutputCache).filter_by(execution_id=b).one()
        assert reuse.still_stored(session, ctx.store, entry_b)

    # `rgrid cache purge --all` of the account: no row is left, nor either pack.
    with session_scope(ctx.session_factory) as session:
        purge.purge_account(session, ctx.store, account.id, timedelta(0))
    assert _blobs(ctx, account.id) == {}
    assert not ctx.store.exists(pack_a) and not ctx.store.exists(pack_b)


def test_a_packed_output_sent_again_as_an_input_reaches_the_script(ctx, submit, account):
    """The CLI asks which digests the account lacks; a packed output is not lacking, so it is
    not uploaded again: the worker fetches its range of the pack, verified."""
    first = submit(TILES.format(count=40))
    run_all(ctx, first)
    tile = _tile(12)
    with session_scope(ctx.session_factory) as session:
        assert blobs.missing_digests(session, ctx.store, account.id, [_digest(tile)]) == []
    reader = "import sys\nprint(open(sys.argv[1]).read().splitlines()[0])\n"
    second = submit(
        reader,
        inputs=[{"path": "tile.txt", "sha256": _digest(tile), "size": len(tile)}],
        args=["tile.txt"],
    )
    run_all(ctx, second)
    execution = _execution(ctx, second)
    assert execution["status"] == "succeeded", execution["error"]
    assert stored_log(ctx, second, "stdout") == "tile 12\n"


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


def test_a_pack_no_row_names_is_swept_and_one_in_use_is_kept(ctx, submit, account):
    """A worker killed between a pack's PUT and its rows' commit leaves a pack nothing points
    into: the nightly sweep deletes it once it is older than any run may take; a pack rows
    point into stays."""
    from dataclasses import replace

    from rgrid.core import cache_keys
    from rgrid.service import maintenance

    execution_id = submit(TILES.format(count=40))
    run_all(ctx, execution_id)
    (used,) = {blob.object_key for blob in _blobs(ctx, account.id).values()}
    stray = cache_keys.pack_object_key(account.id, "stray-" + uuid_hex())
    ctx.store.put_bytes(stray, b"bytes no row names")
    with session_scope(ctx.session_factory) as session:
        assert maintenance.purge_stray_packs(ctx.store, session, ctx.settings) == 0  # too new
    every_pack_old = replace(ctx.settings, max_timeout_s=-7200)
    with session_scope(ctx.session_factory) as session:
        assert maintenance.purge_stray_packs(ctx.store, session, every_pack_old) >= 1
    assert not ctx.store.exists(stray) and ctx.store.exists(used)


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex
