"""Issue 10, findings 2-4: one tenant cannot fill the host's disk, Redis or the workers.

Each test drives the real pipeline (PostgreSQL, Redis, Docker, S3) with an execution that
goes over one limit, and checks the user's view (status, one-line reason) and that nothing
is left behind (container, mount, folder, stored outputs)."""

from __future__ import annotations

import dataclasses
import http.server
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.models import Account, Blob
from rgrid.host import sandbox, sandbox_fs
from rgrid.pipeline.chain import run_all
from rgrid.pipeline.context import PipelineContext


def limited(ctx: PipelineContext, **settings) -> PipelineContext:
    """The session's context with some settings changed (sandboxes with other limits are
    pooled apart: the limits are part of the pool key)."""
    return dataclasses.replace(
        ctx, settings=dataclasses.replace(ctx.settings, **settings), background=[]
    )


def _execution(ctx, execution_id: str) -> dict:
    from rgrid.service import executions as svc

    with session_scope(ctx.session_factory) as session:
        return svc.execution_to_dict(session.get(svc.Execution, execution_id))


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        targets = [line.split()[1] for line in fh]
    return [t for t in targets if t.startswith(str(root) + "/")]


def _live_host_dirs(ctx) -> set[str]:
    return {
        c["Labels"][cache_keys.HOST_DIR_LABEL]
        for c in ctx.docker.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL})
    }


def _nothing_left(ctx, execution_id: str) -> None:
    """No container for the execution, and no sandbox folder or mount without a live
    sandbox (the warm pool's own are alive)."""
    # A sandbox whose supervisor said it was done exits and removes itself (not killed).
    deadline = time.monotonic() + 10
    name = {"name": sandbox.RUN_NAME_PREFIX + execution_id}
    while ctx.docker.api.containers(all=True, filters=name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ctx.docker.api.containers(all=True, filters=name)
    ctx.join_background()  # the pool refill, after the run: it may be making a folder now
    root = ctx.settings.sandboxes_dir
    live = _live_host_dirs(ctx)
    for mount in _mounts_under(root):
        assert str(Path(mount).parent) in live, f"mount left behind: {mount}"
    folders = [str(p) for p in root.iterdir()] if root.is_dir() else []
    assert set(folders) <= live, f"folders left behind: {set(folders) - live}"


@pytest.fixture
def small_disk(ctx) -> Iterator[PipelineContext]:
    context = limited(ctx, disk_limit="64m", tmp_size="32m")
    yield context
    context.join_background()


FILL_WORK = """
import sys, time
with open("/work/outputs/big.bin", "wb") as fh:
    try:
        while True:
            fh.write(b"x" * 1024 * 1024)
            fh.flush()
    except OSError as exc:
        print(f"hit {time.time()} {exc.strerror}", flush=True)
        raise
"""

# Swallows the error and exits 0: going over a limit still ends the run failed.
FILL_TMP = """
import time
try:
    with open("/tmp/big.bin", "wb") as fh:
        while True:
            fh.write(b"x" * 1024 * 1024)
            fh.flush()
except OSError as exc:
    print(f"hit {time.time()} {exc.strerror}", flush=True)
"""


@pytest.mark.parametrize(
    ("script", "reason"),
    [(FILL_WORK, "disk limit 64 MiB reached"), (FILL_TMP, "/tmp limit 32 MiB reached")],
    ids=["work", "tmp"],
)
def test_a_script_writing_past_its_disk_limit_fails_naming_it(small_disk, submit, script, reason):
    execution_id = submit(script)
    run_all(small_disk, execution_id)
    finished = time.time()
    execution = _execution(small_disk, execution_id)
    assert execution["status"] == "failed"
    assert execution["error"] == reason
    assert execution["outputs"] in (None, [])
    logs = "".join(text for _, text in small_disk.logs.read(execution_id)) or _stored_log(
        small_disk, execution_id
    )
    assert "No space left on device" in logs
    assert reason in logs
    _nothing_left(small_disk, execution_id)
    # Measured, not asserted (speed goes in bench/): from the refused write to the end.
    hit = float(logs.split("hit ", 1)[1].split()[0])
    print(f"\ndisk limit hit -> run ended: {finished - hit:.2f} s")


def _stored_log(ctx, execution_id: str) -> str:
    from rgrid.core import cache_keys
    from rgrid.store.logbuffer import decode_log

    data = ctx.store.get_bytes(cache_keys.log_object_key(execution_id))
    return "".join(text for _, text in decode_log(data))


def test_inputs_count_against_the_disk_limit(small_disk, ctx, account, tmp_path):
    from rgrid.core.hashing import sha256_file
    from rgrid.service import executions as svc
    from rgrid.store import blobs as blob_svc

    data = os.urandom(70 * 1024**2)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    digest, _ = sha256_file(path)
    with session_scope(ctx.session_factory) as session:
        blob_svc.store_file(session, ctx.store, account.id, path, digest)
    with session_scope(ctx.session_factory) as session:
        execution_id = svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script="print('never')\n",
            script_name="job.py",
            inputs=[{"path": "big.bin", "sha256": digest, "size": len(data)}],
        ).id
    run_all(small_disk, execution_id)
    execution = _execution(small_disk, execution_id)
    assert execution["status"] == "failed"
    assert execution["error"] == "disk limit 64 MiB reached by the inputs"
    _nothing_left(small_disk, execution_id)


def test_a_script_writing_5000_outputs_is_refused_at_the_file_limit(ctx, account):
    from rgrid.service import executions as svc

    ctx = limited(ctx, max_output_files=1000)  # the default is 100,000 (issue 24)
    with session_scope(ctx.session_factory) as session:
        execution_id = svc.create_execution(
            session,
            ctx.store,
            ctx.settings,
            account_id=account.id,
            script="for i in range(5000):\n    open(f'/work/outputs/{i}.txt', 'w').write(str(i))\n",
            script_name="job.py",
        ).id
    started = time.monotonic()
    run_all(ctx, execution_id)
    took = time.monotonic() - started
    execution = _execution(ctx, execution_id)
    print(f"\n5,000 outputs: script {execution['run_s']} s, whole execution {took:.2f} s")
    assert execution["status"] == "failed"
    assert execution["error"] == (
        f"output file limit reached: more than {ctx.settings.max_output_files} files "
        "in /work/outputs"
    )
    assert execution["outputs"] in (None, [])
    with session_scope(ctx.session_factory) as session:
        stored = session.query(Blob).filter_by(account_id=account.id).count()
    assert stored == 0  # nothing half-stored
    _nothing_left(ctx, execution_id)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An index that answers every request, then sends one byte every half second."""

    gone = threading.Event()
    requests = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Trickle.requests.set()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            _Trickle.gone.set()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def trickling_index() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    _Trickle.gone.clear()
    _Trickle.requests.clear()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    server.shutdown()
    server.server_close()


def test_a_build_from_a_trickling_index_ends_at_the_build_deadline(ctx, submit, trickling_index):
    context = limited(ctx, build_timeout_s=3)
    name = f"slowpkg{secrets.token_hex(3)}"
    execution_id = submit(
        "print('never')\n", requirements=f"--index-url {trickling_index}\n{name}\n"
    )
    run_all(context, execution_id)
    execution = _execution(context, execution_id)
    assert _Trickle.requests.is_set()  # uv did reach the index
    assert execution["status"] == "build_failed"
    assert execution["error"] == "dependency install stopped: build time limit 3 s reached"
    # uv's process group was killed: its connection to the index is closed.
    assert _Trickle.gone.wait(10)


SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"


def _wait_for(ctx, execution_id: str, statuses: set[str], within_s: float) -> str:
    deadline = time.monotonic() + within_s
    while True:
        status = _execution(ctx, execution_id)["status"]
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@pytest.fixture
def worker(server_settings, tmp_path) -> Iterator[None]:
    """A real Celery worker (two slots) on this session's queue, with one execution per
    account at a time."""
    from scripts.devenv import free_port
    from scripts.launcher import Stack, StackConfig

    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(tmp_path / "worker-data"),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": server_settings.redis_url,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
        "RGRID_MAX_CONCURRENT_PER_ACCOUNT": "1",
    }
    config = StackConfig(
        env=env,
        log_dir=tmp_path / "logs",
        name=f"limits-{free_port()}",
        api_port=0,
        roles=("worker",),
        supervised=False,
        concurrency=2,
    )
    from tests.conftest import retire_sandboxes

    try:
        with Stack(config):
            yield
    finally:
        retire_sandboxes(tmp_path / "worker-data")


def test_an_account_at_its_concurrency_limit_does_not_keep_another_queued(
    ctx, worker, submit, account
):
    from rgrid.core import queueing
    from rgrid.service.cancelling import cancel

    with session_scope(ctx.session_factory) as session:
        other = Account(id=account.id + 1, name=f"acct-{secrets.token_hex(4)}")
        session.add(other)
    app = queueing.create_celery_app()
    first, second = submit(SLEEPER), submit(SLEEPER + "# the second\n")
    queueing.enqueue_pipeline(app, first)
    assert _wait_for(ctx, first, {"running"}, 120) == "running"
    queueing.enqueue_pipeline(app, second)
    theirs = submit("print('hello from B')\n", account_id=other.id)
    queueing.enqueue_pipeline(app, theirs)
    try:
        # The worker has two slots: A's second execution must not take the free one.
        assert _wait_for(ctx, theirs, {"succeeded", "failed", "error"}, 60) == "succeeded"
        assert _execution(ctx, second)["status"] == "queued"
        assert _execution(ctx, first)["status"] == "running"
    finally:
        cancel(ctx, second)
        cancel(ctx, first)
    assert _wait_for(ctx, first, {"cancelled"}, 30) == "cancelled"
    assert _wait_for(ctx, second, {"cancelled"}, 30) == "cancelled"


FLOOD = """
import sys
out = sys.stdout.buffer
for _ in range(100):
    out.write(b"\\x01" * 1024 * 1024)
    out.flush()
"""


@pytest.fixture
def own_redis(tmp_path) -> Iterator[str]:
    """A Redis of this test's own, started as scripts/services.sh starts the shared one
    (noeviction under a memory limit), so that its peak memory is this test's alone."""
    import redis

    from scripts.devenv import free_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path)]
        + ["--save", "", "--appendonly", "no"]
        + ["--maxmemory", "1gb", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _group_peak_rss(pgid: int) -> int:
    """The largest peak resident size (VmHWM) of any process in a process group, in bytes."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            continue
    return peak


def test_a_control_byte_flood_is_capped_in_stored_bytes(
    ctx, server_settings, own_redis, tmp_path, submit
):
    import redis
    import requests

    from rgrid.core import cache_keys
    from rgrid.service.executions import LOG_PAGE_BYTES
    from rgrid.store.redis_logs import RedisLogBuffer
    from scripts.devenv import free_port
    from scripts.launcher import Stack, StackConfig, create_account_key

    client = redis.Redis.from_url(own_redis)
    context = dataclasses.replace(limited(ctx, redis_url=own_redis), logs=RedisLogBuffer(client))
    env = {
        **os.environ,
        "RGRID_DATA_DIR": str(tmp_path / "api-data"),
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_REDIS_URL": own_redis,
        "RGRID_S3_ENDPOINT_URL": server_settings.s3_endpoint_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
    }
    port = free_port()
    config = StackConfig(
        env=env, log_dir=tmp_path / "logs", name=f"flood-{port}", api_port=port, roles=("api",)
    )
    name = f"flood-{secrets.token_hex(4)}"
    with Stack(config) as stack:
        key = create_account_key(env, name)
        api_before = _group_peak_rss(stack.processes["api"].pid)
        with session_scope(ctx.session_factory) as session:
            account_id = session.query(Account).filter_by(name=name).one().id
        execution_id = submit(FLOOD, account_id=account_id)
        url = f"{config.api_url}/v1/executions/{execution_id}/logs"
        headers = {"Authorization": f"Bearer {key}"}
        baseline = int(client.info("memory")["used_memory"])
        pages: list[int] = []

        def follow() -> None:
            """A client following the log live, as `rgrid run` does."""
            offset = 0
            while True:
                answer = requests.get(url, params={"offset": offset, "wait": 1}, headers=headers)
                answer.raise_for_status()
                pages.append(len(answer.content))
                page = answer.json()
                offset = page["next_offset"]
                if page["complete"]:
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        run_all(context, execution_id)
        follower.join(300)
        assert not follower.is_alive()
        redis_peak = int(client.info("memory")["used_memory_peak"]) - baseline
        api_peak = _group_peak_rss(stack.processes["api"].pid)

    execution = _execution(ctx, execution_id)
    assert execution["status"] == "succeeded"
    cap = ctx.settings.max_log_bytes
    stored = ctx.store.open_stream(cache_keys.log_object_key(execution_id))
    size = 0
    tail = b""
    while block := stored.read(1024 * 1024):
        size += len(block)
        tail = (tail + block)[-4096:]
    assert size <= cap + 4096  # the cap, plus RGrid's own notes
    assert b"log truncated at 64 MiB" in tail
    assert max(pages) <= LOG_PAGE_BYTES + 64 * 1024
    # Bounded by the cap, with Redis's own overhead: not 832 MiB as before.
    assert redis_peak < 2 * cap
    assert not client.keys("rgrid:log:*")  # released once stored
    # The API serves pages, never the log: its peak grows by far less than the log's size.
    assert api_peak - api_before < cap
    print(
        f"\n100 MiB \\x01 flood: log stored {size / 1024**2:.1f} MiB; Redis peak growth "
        f"{redis_peak / 1024**2:.1f} MiB; API peak RSS {api_peak / 1024**2:.1f} MiB "
        f"(before: {api_before / 1024**2:.1f} MiB); "
        f"{len(pages)} pages, largest {max(pages) / 1024:.0f} KiB"
    )


def test_the_reaper_unmounts_and_removes_an_orphaned_sandbox_filesystem(ctx, tmp_path):
    """A runner killed between its run and its cleanup leaves a mounted filesystem and its
    image: the reaper's sweep takes both, as it takes the folder. One that another
    installation left (a test session's, an embedded user's data folder that may never run
    again) is unmounted and its image deleted too."""
    from rgrid.service.maintenance import reap_containers

    root = ctx.settings.sandboxes_dir
    root.mkdir(parents=True, exist_ok=True)
    elsewhere = tmp_path / "other-installation" / "sandboxes"
    elsewhere.mkdir(parents=True)
    orphans = [
        sandbox_fs.make_host_folder(
            folder, f"rgrid-run-{secrets.token_hex(8)}", 1000, 1000, 16 << 20
        )
        for folder in (root, elsewhere)
    ]
    two_minutes_ago = time.time() - 120
    for orphan in orphans:
        (orphan / "fs" / "work" / "left.bin").write_bytes(b"x" * 1024**2)
        assert os.path.ismount(orphan / "fs")
        os.utime(orphan, (two_minutes_ago, two_minutes_ago))
    with session_scope(ctx.session_factory) as session:
        reap_containers(ctx.docker, session, root)
    ours, theirs = orphans
    assert not ours.exists()
    assert not os.path.ismount(theirs / "fs")
    assert not (theirs / sandbox.DISK_IMAGE).exists()
    assert not [m for m in _mounts_under(tmp_path) + _mounts_under(root) if "rgrid-run-" in m]


def test_the_reaper_takes_a_sandbox_container_that_was_never_started():
    """A process killed between creating and starting a sandbox leaves a container that will
    never end itself (its supervisor never ran); the reaper removes it once it is old."""
    from rgrid.service.maintenance import NEVER_STARTED_AFTER_S, _never_started

    now = time.time()
    old = int(now - NEVER_STARTED_AFTER_S - 1)
    assert _never_started({"State": "created", "Created": old}, now)
    assert not _never_started({"State": "created", "Created": int(now - 5)}, now)
    assert not _never_started({"State": "running", "Created": old}, now)


def test_storing_outputs_past_the_runs_time_limit_fails_and_records_none(ctx, submit, monkeypatch):
    """Storing outputs counts within the run's own time limit: a run whose outputs cannot
    be stored in time ends failed, naming it, with no output recorded."""
    from rgrid.pipeline import outputs

    # The run's whole time budget (and the grace) already spent when storing starts.
    monkeypatch.setattr(outputs, "OUTPUT_STORE_GRACE_S", -(10.0**6))
    execution_id = submit(
        "for i in range(3):\n    open(f'/work/outputs/{i}.txt', 'w').write(str(i))\n",
        timeout_s=30,
    )
    run_all(ctx, execution_id)
    execution = _execution(ctx, execution_id)
    assert execution["status"] == "failed"
    assert execution["error"] == "time limit 30s reached while storing 3 outputs"
    assert execution["outputs"] in (None, [])
    _nothing_left(ctx, execution_id)
