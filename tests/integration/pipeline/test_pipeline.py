"""The pipeline on the real services: PostgreSQL, Redis, the S3 endpoint and Docker."""

import json
import threading
import time

import docker
import pytest
from sqlalchemy import select

from rgrid.core import cache_keys
from rgrid.core.config import DEFAULT_RUNTIME
from rgrid.core.db import session_scope
from rgrid.core.models import DependencyCache, Execution, ScriptCache
from rgrid.host import pool, sandbox
from rgrid.host.runtimes import resolve_runtime
from rgrid.pipeline.chain import run_all
from rgrid.store.logbuffer import decode_log
from tests.conftest import stored_log

HELLO = "print('hello')\nopen('outputs/result.txt', 'w').write('42')\n"


def _log(ctx, execution_id: str) -> list:
    return decode_log(ctx.store.get_bytes(cache_keys.log_object_key(execution_id)))


def _blob(ctx, digest: str):
    from rgrid.core.models import Blob

    with session_scope(ctx.session_factory) as session:
        return session.query(Blob).filter_by(digest=digest).first()


def _leftovers(ctx, execution_id: str, wait_s: float = 15) -> list:
    """The execution's sandbox if it is still there (removing it happens off the user's path,
    so it may take a moment), and host folders no sandbox owns any more."""
    client = docker.from_env()
    name = f"{sandbox.RUN_NAME_PREFIX}{execution_id}"
    deadline = time.monotonic() + wait_s
    while True:
        containers = [
            c for c in client.containers.list(all=True, filters={"name": name}) if c.name == name
        ]
        if not containers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ctx.join_background()  # a pool refill may be creating a folder for its next sandbox
    owned = {
        c["Labels"][cache_keys.HOST_DIR_LABEL]
        for c in client.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL})
    }
    root = ctx.settings.sandboxes_dir
    orphans = [p for p in root.iterdir() if str(p) not in owned] if root.is_dir() else []
    return containers + orphans


def test_run_stores_output_and_log_then_repeat_hits_cache(ctx, run_script, account):
    first = run_script(HELLO)
    assert first["status"] == "succeeded" and first["exit_code"] == 0
    assert first["script_cache_hit"] is False
    assert first["dependency_cache_hit"] is None  # no requirements: nothing to look up
    assert first["environment"] is None and first["deps_build_s"] is None
    assert first["runtime_image"].startswith("sha256:")
    assert stored_log(ctx, first["execution_id"], "stdout") == "hello\n"
    assert [o["path"] for o in first["outputs"]] == ["result.txt"]
    blob = _blob(ctx, first["outputs"][0]["sha256"])
    assert ctx.store.get_bytes(blob.object_key) == b"42"

    second = run_script(HELLO)
    assert second["status"] == "succeeded"
    assert second["script_cache_hit"] is True and second["deps_build_s"] is None
    assert second["runtime_image"] == first["runtime_image"]
    assert stored_log(ctx, second["execution_id"], "stdout") == "hello\n"
    with session_scope(ctx.session_factory) as session:
        row = (
            session.query(ScriptCache)
            # The script cache's key is the source tree's digest (a one-file tree here).
            .filter_by(account_id=account.id, script_hash=first["source_digest"])
            .one()
        )
        assert row.use_count == 2
        assert row.environment is None and row.runtime_image == first["runtime_image"]


def test_one_changed_space_is_a_miss(run_script):
    first = run_script("print('x')\n")
    second = run_script("print('x') \n")
    assert second["status"] == "succeeded"
    assert second["script_cache_hit"] is False
    assert second["script_hash"] != first["script_hash"]


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_local_script_copy_that_vanished_or_changed_is_fetched_again(
    ctx, run_script, account, damage
):
    """A worker host keeps a verified copy of each script it ran; a copy that is gone or no
    longer matches its hash is fetched from the object store again, never run."""
    first = run_script("print('soon gone')\n")
    local = ctx.settings.blob_cache_dir / cache_keys.script_local_name(
        account.id, first["script_hash"]
    )
    assert local.read_text() == "print('soon gone')\n"
    if damage == "deleted":
        local.unlink()
    else:
        local.write_text("print('tampered')\n")
    second = run_script("print('soon gone')\n")
    assert second["status"] == "succeeded" and second["script_cache_hit"] is True
    assert stored_log(ctx, second["execution_id"], "stdout") == "soon gone\n"
    assert local.read_text() == "print('soon gone')\n"


def test_same_script_in_two_accounts_does_not_share_a_cache_row(ctx, run_script):
    from rgrid.service.accounts import create_account

    with session_scope(ctx.session_factory) as session:
        other = create_account(session, "other-" + HELLO.__hash__().__str__()[-6:]).id
    run_script("print('mine')\n")
    theirs = run_script("print('mine')\n", account_id=other)
    assert theirs["script_cache_hit"] is False


def test_exit_code_3_is_failed_and_keeps_output_and_log(ctx, run_script):
    result = run_script(
        "import sys\nprint('partial')\nopen('outputs/part.txt','w').write('p')\nsys.exit(3)\n"
    )
    assert result["status"] == "failed" and result["exit_code"] == 3
    assert [o["path"] for o in result["outputs"]] == ["part.txt"]
    assert stored_log(ctx, result["execution_id"], "stdout") == "partial\n"


def test_empty_script_runs(run_script):
    result = run_script("")
    assert result["status"] == "succeeded" and result["exit_code"] == 0


def test_timeout_kills_and_removes_the_container(ctx, run_script):
    result = run_script("import time\nprint('started', flush=True)\ntime.sleep(60)\n", timeout_s=2)
    assert result["status"] == "timed_out" and result["exit_code"] is None
    assert result["error"] == "timed out after 2s"
    assert result["run_s"] < 30
    assert stored_log(ctx, result["execution_id"], "stdout") == "started\n"
    assert _leftovers(ctx, result["execution_id"]) == []


def test_stdout_and_stderr_stay_apart_and_args_are_passed(ctx, run_script):
    script = "import sys\nprint(sys.argv[1:])\nprint('oops', file=sys.stderr)\n"
    result = run_script(script, args=["a b", "--flag"])
    chunks = _log(ctx, result["execution_id"])
    assert "".join(t for s, t in chunks if s == "stdout") == "['a b', '--flag']\n"
    assert "".join(t for s, t in chunks if s == "stderr") == "oops\n"


SANDBOX_PROBE = r"""
import json, os, socket
report = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd()}
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=2)
    report["network"] = "reached"
except OSError as exc:
    report["network"] = type(exc).__name__
try:
    open("/usr/rgrid-probe", "w")
    report["root_fs"] = "writable"
except OSError:
    report["root_fs"] = "read-only"
open("/tmp/scratch", "w").write("ok")
report["tmp"] = open("/tmp/scratch").read()
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
report["cap_eff"] = status["CapEff"].strip()
report["no_new_privs"] = status["NoNewPrivs"].strip()
report["interfaces"] = sorted(os.listdir("/sys/class/net"))
report["memory_max"] = open("/sys/fs/cgroup/memory.max").read().strip() \
    if os.path.exists("/sys/fs/cgroup/memory.max") else \
    open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip()
print(json.dumps(report))
"""


def test_sandbox_has_no_network_no_root_no_capabilities(ctx, run_script):
    result = run_script(SANDBOX_PROBE)
    assert result["status"] == "succeeded", result
    report = json.loads(stored_log(ctx, result["execution_id"], "stdout"))
    assert report["uid"] == 1000 and report["gid"] == 1000
    assert report["cwd"] == "/work"
    assert report["network"] != "reached"
    assert report["interfaces"] == ["lo"]
    assert report["root_fs"] == "read-only"
    assert report["tmp"] == "ok"
    assert int(report["cap_eff"], 16) == 0
    assert report["no_new_privs"] == "1"
    assert int(report["memory_max"]) == 1024**3


def test_fork_bomb_is_stopped_by_the_pid_limit(run_script):
    script = (
        "import os, sys\ncount = 0\n"
        "try:\n    while count < 5000:\n        pid = os.fork()\n"
        "        if pid == 0:\n            import time; time.sleep(30); os._exit(0)\n"
        "        count += 1\nexcept OSError:\n    print('limited at', count)\n    sys.exit(7)\n"
    )
    result = run_script(script, timeout_s=60)
    assert result["status"] == "failed" and result["exit_code"] == 7


def test_nested_outputs_come_back_and_links_are_not_followed(ctx, run_script):
    script = (
        "import os\nos.makedirs('outputs/a/b')\nopen('outputs/a/b/deep.txt','w').write('d')\n"
        "os.symlink('/etc/passwd', 'outputs/passwd')\n"
    )
    result = run_script(script)
    assert result["status"] == "succeeded"
    assert [o["path"] for o in result["outputs"]] == ["a/b/deep.txt"]
    system = "".join(t for s, t in _log(ctx, result["execution_id"]) if s == "system")
    assert "skipped outputs/passwd" in system


def test_concurrent_misses_on_one_new_script_build_nothing_and_share_one_row(
    ctx, submit, run_concurrently, account
):
    """Nothing is built for a script: three concurrent first runs all just run, and the
    script cache gets one row that counts all three."""
    rows = run_concurrently([submit("print('never built')\n") for _ in range(3)])
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert [r["deps_build_s"] for r in rows] == [None] * 3
    assert len({r["execution_id"] for r in rows}) == 3
    with session_scope(ctx.session_factory) as session:
        row = (
            session.query(ScriptCache)
            .filter_by(account_id=account.id, script_hash=rows[0]["source_digest"])
            .one()
        )
        assert row.use_count == 3


@pytest.mark.parametrize("runtime", ["python:2.7", ""])
def test_unknown_runtime_is_refused_and_nothing_is_stored(ctx, account, runtime):
    from rgrid.core.errors import BadInput
    from rgrid.service import executions as svc

    with session_scope(ctx.session_factory) as session:
        before = len(svc.list_executions(session, account.id))
        with pytest.raises(BadInput, match="unknown runtime"):
            svc.create_execution(
                session,
                ctx.store,
                ctx.settings,
                account_id=account.id,
                script="pass\n",
                script_name="job.py",
                runtime=runtime,
            )
    with session_scope(ctx.session_factory) as session:
        assert len(svc.list_executions(session, account.id)) == before


def test_every_step_run_twice_runs_the_script_once(ctx, submit):
    """Celery may deliver a task again (acks are late): each step, run a second time, finds
    its work done and leaves the result as it was."""
    from rgrid.pipeline.chain import STEPS

    script = "import secrets\nprint('ran', secrets.token_hex(4))\n"
    execution_id = submit(script, requirements="six\n")
    for step in STEPS:
        step(ctx, execution_id)
        step(ctx, execution_id)
    run_all(ctx, submit(script, requirements="six\n"))
    with session_scope(ctx.session_factory) as session:
        row = session.get(Execution, execution_id)
        assert row.status == "succeeded" and row.exit_code == 0
        cached = session.scalars(
            select(ScriptCache).where(ScriptCache.script_hash == row.source_digest)
        ).one()
        deps = session.scalars(
            select(DependencyCache).where(
                DependencyCache.account_id == row.account_id,
                DependencyCache.dependency_hash == row.dependency_hash,
            )
        ).one()
        # Counted once per execution, not once per delivery.
        assert cached.use_count == 2 and deps.use_count == 2
    printed = stored_log(ctx, execution_id, "stdout")
    assert printed.count("ran ") == 1, printed


def _warm_counts_while_running(ctx, submit, script: str) -> list[int]:
    """How many warm sandboxes of the bare runtime's pool the engine listed, sampled while the
    run's own sandbox was running ``script``."""
    client = docker.from_env()
    env = sandbox.Environment(image=resolve_runtime(DEFAULT_RUNTIME).image)
    key = pool.pool_key(env, ctx.limits, ctx.pool)
    execution_id = submit(script)
    own = {"name": f"{sandbox.RUN_NAME_PREFIX}{execution_id}", "status": "running"}
    counts: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            running = client.api.containers(filters=own)
            warm = len(pool.warm_sandboxes(client, key))
            if running and client.api.containers(filters=own):
                counts.append(warm)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_all(ctx, execution_id)
    finally:
        done.set()
        watcher.join()
    with session_scope(ctx.session_factory) as session:
        assert session.get(Execution, execution_id).status == "succeeded"
    return counts


def test_the_pool_is_refilled_beside_a_run_only_when_the_run_emptied_it(ctx, submit):
    """Starting a container takes the engine ~0.3 s of CPU, which slowed a script beside it.
    With a spare warm sandbox left the refill waits until the result is published; a pool
    the run emptied is refilled at once, so that the next run is warm too."""
    slow = "import time\ntime.sleep(2)\n"
    env = sandbox.Environment(image=resolve_runtime(DEFAULT_RUNTIME).image)
    ctx.join_background()
    pool.retire_all(ctx.docker, env, ctx.limits, ctx.pool)
    pool.fill(ctx.docker, env, ctx.limits, ctx.pool)
    assert ctx.pool.size == 2
    with_spare = _warm_counts_while_running(ctx, submit, slow)
    assert with_spare and set(with_spare) == {1}, with_spare
    ctx.join_background()
    assert len(pool.warm_sandboxes(ctx.docker, pool.pool_key(env, ctx.limits, ctx.pool))) == 2

    pool.retire_all(ctx.docker, env, ctx.limits, ctx.pool)
    emptied = _warm_counts_while_running(ctx, submit, slow)
    assert emptied and emptied[-1] == 2, emptied  # refilled while the script still ran
