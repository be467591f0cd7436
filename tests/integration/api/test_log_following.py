"""Following a run against the real Redis, object store and API: the long poll is woken by
the workers' announcements, and its final page lists the outputs to download."""

import base64
import io
import threading
import time
import urllib.request
import uuid

import pytest

from rgrid.api import create_app
from rgrid.core.db import session_scope
from rgrid.core.models import Account
from rgrid.service import accounts
from rgrid.store.redis_logs import RedisLogBuffer


@pytest.fixture(scope="module")
def app(server_settings):
    return create_app(server_settings)


def _later(delay_s: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()))
    thread.start()
    return thread


@pytest.mark.parametrize("change", ["append", "clear"])
def test_a_follower_wakes_when_another_connection_changes_the_log(ctx, change):
    """The wait returns on the announcement, not at its timeout (a generous 20 s, so that only
    a missed announcement can make it that long)."""
    execution_id = f"follow-{uuid.uuid4().hex[:12]}"
    writer = RedisLogBuffer(type(ctx.logs.client).from_url(ctx.settings.redis_url))
    with ctx.logs.changes(execution_id) as wait_for_change:
        actions = {
            "append": lambda: writer.append(execution_id, "stdout", "hello\n"),
            "clear": lambda: writer.clear(execution_id),
        }
        thread = _later(0.2, actions[change])
        started = time.monotonic()
        wait_for_change(20)
        waited = time.monotonic() - started
        thread.join()
    assert waited < 10, f"woke after {waited:.1f}s: the announcement was missed"
    if change == "append":
        assert ctx.logs.read(execution_id) == [("stdout", "hello\n")]
    ctx.logs.clear(execution_id)


def test_a_wait_with_no_change_ends_at_its_timeout(ctx):
    with ctx.logs.changes(f"quiet-{uuid.uuid4().hex[:12]}") as wait_for_change:
        started = time.monotonic()
        wait_for_change(0.3)
    assert time.monotonic() - started >= 0.3


def test_the_final_log_page_lists_the_outputs_with_their_download_urls(app, ctx, account, submit):
    from rgrid.pipeline.chain import run_all

    script = (
        "import os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/r.txt', 'w').write('42')\n"
    )
    execution_id = submit(script)
    with session_scope(ctx.session_factory) as session:
        _, secret = accounts.issue_key(session, session.get(Account, account.id))
    headers = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    page = client.get(f"/v1/executions/{execution_id}/logs?wait=0", headers=headers).json
    assert not page["complete"] and "outputs" not in page

    run_all(ctx, execution_id)
    page = client.get(f"/v1/executions/{execution_id}/logs?wait=5", headers=headers).json
    assert page["complete"] and page["execution"]["status"] == "succeeded"
    [output] = page["outputs"]
    assert output["path"] == "r.txt" and "key" not in output
    with urllib.request.urlopen(output["url"]) as response:
        assert response.read() == b"42"
    listed = client.get(f"/v1/executions/{execution_id}/outputs", headers=headers).json
    assert listed["outputs"][0]["sha256"] == output["sha256"]


@pytest.mark.parametrize("size", [0, 5, 9 * 1024 * 1024 + 7])
def test_a_stream_is_stored_whole_below_and_above_the_single_put_size(ctx, size):
    """Below 8 MiB one PUT; above it boto3's multipart upload, fed the bytes already read."""
    data = bytes((i * 7) % 251 for i in range(size))
    key = f"test/put-stream-{uuid.uuid4().hex}"
    ctx.store.put_stream(key, io.BufferedReader(io.BytesIO(data)))
    try:
        assert ctx.store.get_bytes(key) == data
    finally:
        ctx.store.delete(key)


def test_a_chunk_sent_again_after_a_lost_reply_is_stored_once(redis_url):
    from rgrid.service.context import redis_client

    logs = RedisLogBuffer(redis_client(redis_url))
    execution_id = f"once-{uuid.uuid4().hex}"
    try:
        logs.append(execution_id, "stdout", "done", once=("run-a", 0))
        logs.append(execution_id, "stdout", "done", once=("run-a", 0))  # the retry
        logs.append(execution_id, "stdout", " 8\n", once=("run-a", 1))
        logs.append(execution_id, "stderr", "oops\n", once=("run-b", 0))  # another writer
        logs.append(execution_id, "phase", "storing")
        assert logs.read(execution_id) == [
            ("stdout", "done"),
            ("stdout", " 8\n"),
            ("stderr", "oops\n"),
            ("phase", "storing"),
        ]
    finally:
        logs.clear(execution_id)
    assert logs.read(execution_id) == []


TOKEN_SCRIPT = (
    "import os, uuid\nos.makedirs('outputs', exist_ok=True)\n"
    "open('outputs/token.txt', 'w').write(uuid.uuid4().hex)\nprint('ran')\n"
)


def _headers(ctx, account) -> dict:
    with session_scope(ctx.session_factory) as session:
        _, secret = accounts.issue_key(session, session.get(Account, account.id))
    return {"Authorization": f"Bearer {secret}"}


def _submit_body(reuse: bool) -> dict:
    from rgrid.core.spec import RunSpec

    body = RunSpec(script=TOKEN_SCRIPT, script_name="job.py", args=["a"]).submit_body(stdin=False)
    return {**body, "reuse": reuse}


def _ran(ctx, account, body: dict) -> str:
    """The body's run, submitted as the API does it (created, its action key looked up) but
    not queued (no worker takes it from under the test), then run here; its id."""
    from rgrid.core.spec import RunSpec
    from rgrid.pipeline import reuse
    from rgrid.pipeline.chain import run_all
    from rgrid.service.executions import create_execution

    with session_scope(ctx.session_factory) as session:
        spec = RunSpec.from_body(body)
        execution = create_execution(
            session, ctx.store, ctx.settings, account_id=account.id, spec=spec
        )
        image = reuse.grid_runtime_image(ctx.hosts.client, ctx.settings.queue, "python:3.11")
        reuse.at_submission(
            session, ctx.store, ctx.settings, execution, env=None, runtime_image=image, reuse=False
        )
        execution_id = execution.id
    run_all(ctx, execution_id)
    ctx.join_background()
    return execution_id


def test_a_reused_submission_answers_with_its_log_and_small_outputs(app, ctx, account):
    """The answer to a submission the output cache answers is the whole run: its replayed
    log and its outputs, small ones with their bytes, so the CLI makes no other request."""
    headers = _headers(ctx, account)
    client = app.test_client()
    first_id = _ran(ctx, account, _submit_body(reuse=True))

    answer = client.post("/v1/executions", json=_submit_body(reuse=True), headers=headers)
    second = answer.json
    assert answer.status_code == 201 and second["reused_from"] == first_id
    page = second["log_page"]
    assert page["complete"] and page["execution"]["execution_id"] == second["execution_id"]
    # The log is chunked as the sandbox wrote it: "ran" and its newline may come apart.
    assert "".join(text for stream, text in page["chunks"] if stream == "stdout") == "ran\n"
    [output] = page["outputs"]
    with urllib.request.urlopen(output["url"]) as response:
        token = response.read()
    assert len(token) == 32 and base64.b64decode(output["data"]) == token


def test_outputs_ride_in_the_final_page_only_within_the_setting(server_settings, ctx, account):
    from dataclasses import replace

    headers = _headers(ctx, account)
    execution_id = _ran(ctx, account, _submit_body(reuse=False))
    for budget, inline in ((0, False), (32, True), (31, False)):
        client = create_app(replace(server_settings, inline_output_bytes=budget)).test_client()
        page = client.get(f"/v1/executions/{execution_id}/logs?wait=5", headers=headers).json
        [output] = page["outputs"]
        assert ("data" in output) is inline, (budget, output)
        assert output["url"]
