"""The object store loses everything (the test S3 endpoint keeps it all in memory, so a
restart does that): the next run re-sends what the store lacks and works, and still hits the
caches whose bytes survived (the worker host's verified copy of the script)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import DEV_ENV
from tests.e2e.conftest import run_json

REPO = Path(__file__).resolve().parents[2]


def _restart_the_store() -> float:
    """Stop the S3 endpoint and start it again through the project's own script; returns how
    long it was away."""
    endpoint = DEV_ENV["RGRID_S3_ENDPOINT_URL"]
    port = endpoint.rsplit(":", 1)[1].strip("/")
    # By its command line, not this checkout's pidfile: another checkout's `make setup` on
    # this machine may have started the endpoint this one uses.
    found = subprocess.run(
        ["pgrep", "-f", f"moto_server -H 127.0.0.1 -p {port}"], capture_output=True, text=True
    )
    pids = [int(pid) for pid in found.stdout.split()]
    assert pids, "no S3 endpoint process found"
    stopped = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while subprocess.run(["curl", "-s", "-o", "/dev/null", endpoint]).returncode == 0:
        assert time.monotonic() < deadline, "the S3 endpoint did not stop"
        time.sleep(0.1)
    subprocess.run([str(REPO / "scripts" / "services.sh"), "start"], check=True)
    return time.monotonic() - stopped


def test_a_store_that_lost_everything_gets_it_again(stack_env, tmp_path):
    (tmp_path / "count.py").write_text(
        "import sys\nprint(len(open(sys.argv[1]).read()))\nopen('outputs/n.txt', 'w').write('n')\n"
    )
    (tmp_path / "data.txt").write_text("x" * 1000)
    first, result = run_json("run", "count.py", "data.txt", env=stack_env, cwd=tmp_path)
    assert first["status"] == "succeeded", result.stderr
    assert first["files_uploaded"] == 1

    away = _restart_the_store()

    second, result = run_json("run", "count.py", "data.txt", env=stack_env, cwd=tmp_path)
    assert second["status"] == "succeeded", result.stderr
    assert "Traceback" not in result.stderr
    # The input was sent again; the script's cache row still holds (the worker host keeps a
    # verified copy of the script), so nothing else was redone.
    assert second["files_uploaded"] == 1 and second["bytes_uploaded"] == 1000
    assert second["script_cache_hit"] is True
    assert (tmp_path / second["outputs_dir"] / "n.txt").read_text() == "n"
    print(f"store away {away:.1f}s; the next run succeeded in {second['duration_s']}s")
