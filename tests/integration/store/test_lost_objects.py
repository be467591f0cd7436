"""A log or output the object store lost, on the real API, PostgreSQL and S3 endpoint: said to
be lost (never shown as an empty log or a failed download), and told apart from a log that
was never written. Loss is simulated by deleting the objects from the test bucket."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from rgrid.api import create_app
from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.models import Account, Execution
from rgrid.pipeline.chain import run_all
from rgrid.service import accounts, batches
from rgrid.service import executions as svc
from rgrid.store.blobs import find_blob, store_file

SCRIPT = """\
import os
print("counted", flush=True)
os.makedirs("outputs", exist_ok=True)
open("outputs/count.txt", "w").write("3\\n")
open("outputs/kept.txt", "w").write("kept\\n")
"""


@pytest.fixture(scope="module")
def app(server_settings):
    return create_app(server_settings)


@pytest.fixture
def api(app, ctx, account):
    """A test client of the real app, and this account's auth header."""
    with session_scope(ctx.session_factory) as session:
        _, secret = accounts.issue_key(session, session.get(Account, account.id))
    return app.test_client(), {"Authorization": f"Bearer {secret}"}


def _output_key(ctx, execution_id: str, path: str) -> str:
    with session_scope(ctx.session_factory) as session:
        execution = session.get(Execution, execution_id)
        (output,) = [o for o in execution.outputs if o["path"] == path]
        return find_blob(session, execution.account_id, output["sha256"]).object_key


def test_a_lost_log_and_a_lost_output_are_named_as_lost(api, ctx, submit):
    client, headers = api
    # A script of its own: no other test's run shares its output blobs.
    execution_id = submit(SCRIPT + f"# {uuid.uuid4().hex}\n", runtime="python:3.11", timeout_s=60)
    run_all(ctx, execution_id)
    base = f"/v1/executions/{execution_id}"

    # All there: nothing is said to be lost.
    page = client.get(f"{base}/logs", headers=headers).json
    # Chunk boundaries are the writes the sandbox saw ("counted" and "\n" may be two).
    assert "".join(text for stream, text in page["chunks"] if stream == "stdout") == "counted\n"
    checked = client.get(f"{base}?check_store=1", headers=headers).json
    assert checked["status"] == "succeeded"
    assert checked["log_lost"] is False and checked["lost_outputs"] == []
    # Without the check, no store request and no such fields.
    assert "log_lost" not in client.get(base, headers=headers).json

    ctx.store.delete(cache_keys.log_object_key(execution_id))
    response = client.get(f"{base}/logs", headers=headers)
    assert response.status_code == 404
    assert response.json == {
        "error": f"the log of execution {execution_id} is lost from the object store"
    }
    checked = client.get(f"{base}?check_store=1", headers=headers).json
    assert checked["log_lost"] is True and checked["lost_outputs"] == []

    ctx.store.delete(_output_key(ctx, execution_id, "count.txt"))
    checked = client.get(f"{base}?check_store=1", headers=headers).json
    assert checked["lost_outputs"] == ["count.txt"]


def test_a_log_never_written_is_empty_not_lost(ctx, account, tmp_path):
    """A batch's queued execution cancelled in bulk ends without any step, so without a log:
    its log reads as empty, and nothing is said to be lost."""
    data = tmp_path / "in.txt"
    data.write_text("input")
    digest = hashlib.sha256(b"input").hexdigest()
    with session_scope(ctx.session_factory) as session:
        store_file(session, ctx.store, account.id, data, digest)
        batch_id = batches.create_batch(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script="print('never runs')\n",
            script_name="never.py",
            runtime="python:3.11",
        ).id
    with session_scope(ctx.session_factory) as session:
        item = {"path": "in.txt", "sha256": digest, "size": 5}
        batches.add_inputs(session, ctx.settings, account.id, batch_id, [item])
    batches.cancel(ctx.session_factory, account.id, batch_id, lambda i: None, lambda i: None)
    with session_scope(ctx.session_factory) as session:
        (execution,) = session.query(Execution).filter(Execution.batch_id == batch_id).all()
        assert execution.status == "cancelled" and not execution.log_stored
        page = svc.read_logs(execution, ctx.logs, ctx.store)
        assert page["complete"] and page["chunks"] == []
        assert svc.lost_objects(session, execution, ctx.store) == {
            "log_lost": False,
            "lost_outputs": [],
        }


TILES = """\
import os
os.makedirs("outputs/tiles", exist_ok=True)
for i in range(30):
    open(f"outputs/tiles/{i:02}.txt", "w").write(f"{TOKEN} tile {i}\\n")
open("outputs/big.bin", "wb").write(os.urandom(100_000))
"""


def test_a_lost_pack_names_every_output_it_held(api, ctx, submit):
    """30 small outputs are one pack (store/output_blobs.py), the 100 kB one an object of its own:
    with the pack gone, `?check_store=1` names the 30, and only them; the listing still says
    where each was, and fetching them says they are lost, on one line."""
    client, headers = api
    script = f"TOKEN = {uuid.uuid4().hex!r}\n" + TILES
    execution_id = submit(script, runtime="python:3.11", timeout_s=60)
    run_all(ctx, execution_id)
    base = f"/v1/executions/{execution_id}"
    listing = client.get(f"{base}/outputs", headers=headers).json
    assert len(listing["packs"]) == 1 and "key" not in listing["packs"][0]
    packed = sorted(o["path"] for o in listing["outputs"] if "pack" in o)
    assert packed == [f"tiles/{i:02}.txt" for i in range(30)]
    assert [o["path"] for o in listing["outputs"] if "url" in o] == ["big.bin"]

    ctx.store.delete(_output_key(ctx, execution_id, "tiles/07.txt"))
    checked = client.get(f"{base}?check_store=1", headers=headers).json
    assert sorted(checked["lost_outputs"]) == packed

    from rgrid.client.downloads import save_outputs
    from rgrid.client.remote import RemoteClient
    from rgrid.core.errors import LostFromStore

    remote = RemoteClient("http://unused", None)
    with pytest.raises(LostFromStore) as lost:
        save_outputs(
            listing, ctx.settings.data_dir / f"fetch-{execution_id}", remote._fetch_output,
            lambda n: None, remote._fetch_span,
        )  # fmt: skip
    assert "(30) are lost from the object store" in lost.value.message
    assert lost.value.message.startswith("outputs tiles/")
