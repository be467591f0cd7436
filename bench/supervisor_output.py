"""The sandbox supervisor's output copy, side by side with its floor: the same supervisor
letting the script write straight to the container's streams (as before issue 26, when
nothing of the output was kept in the sandbox's folder for a runner that dies).

    .venv/bin/python bench/supervisor_output.py --repeat 5

Two scripts, each run through ``sandbox_run.run`` in a fresh sandbox, rounds interleaved: a hello
line, and a 64 MiB flood of 1 KiB lines. Reports medians and the ratio to the floor. Cleans up
its sandboxes and their folder.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import docker

from rgrid.core.config import DEFAULT_RUNTIME, Settings
from rgrid.host import sandbox, sandbox_container, sandbox_files, sandbox_run, sandbox_supervisor
from rgrid.host.runtimes import resolve_runtime

# The supervisor as it was (git e070a1a), for the floor: the script's output goes straight
# to the container's stdout and stderr.
DIRECT_SUPERVISOR = r"""
import json, os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if not select.select([0], [], [], float(sys.argv[1]))[0]:
    sys.exit(0)
line = b""
while not line.endswith(b"\n"):
    byte = os.read(0, 1)
    if not byte:
        sys.exit(0)
    line += byte
job = json.loads(line)
def oom_kills():
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as fh:
                for entry in fh:
                    name, _, value = entry.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
    return 0
ooms = oom_kills()
# The status file is written in place over bytes allocated now: the script shares this
# filesystem and may fill it, after which no new block could be had.
status_fd = os.open(job["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(status_fd, b" " * 512)
open(job["status"] + ".started", "w").close()
pid = os.fork()
if pid == 0:
    os.setsid()
    os.chdir(job["cwd"])
    os.execvpe(job["argv"][0], job["argv"], job["env"])
class Deadline(Exception):
    pass
def on_alarm(*_):
    raise Deadline
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, job["timeout"])
timed_out = False
try:
    _, wait_status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    code = os.waitstatus_to_exitcode(wait_status)
except Deadline:
    timed_out = True
    os.killpg(pid, signal.SIGKILL)
    code = -signal.SIGKILL
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
code = code if code >= 0 else 128 - code
oom = oom_kills() > ooms
def full(path):
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    margin = max(job["full_below"] // fs.f_frsize, fs.f_blocks // 500)
    return fs.f_bavail < margin or (fs.f_files and not fs.f_favail)
filled = [path for path in job["writable"] if full(path)]
status = json.dumps(
    {"exit_code": code, "timed_out": timed_out, "oom_killed": oom, "full": filled}
)
os.pwrite(status_fd, status.encode()[:512].ljust(512), 0)
os.close(status_fd)
# Every process of the script is gone and the status is written: say so on both streams, so
# the runner stops reading now instead of when the engine has wound the container down.
end = job["end"].encode()
os.write(1, end)
os.write(2, end)
sys.exit(code)
"""


SCRIPTS = {
    "hello": "print('hello')\n",
    "64 MiB of 1 KiB lines": (
        "import sys\nline = 'x' * 1023 + '\\n'\n"
        "for _ in range(65536):\n    sys.stdout.write(line)\n"
    ),
}


def once(client, root: Path, supervisor: str, script: str) -> float:
    """One run in a fresh sandbox started with ``supervisor``; the seconds ``run`` took."""
    kept, sandbox_supervisor.SUPERVISOR = sandbox_supervisor.SUPERVISOR, supervisor
    try:
        env = sandbox.Environment(resolve_runtime(DEFAULT_RUNTIME).image)
        limits = sandbox.Limits.from_settings(Settings())
        name = f"rgrid-bench-sup-{secrets.token_hex(4)}"
        box = sandbox_container.start_box(client, env, limits, root=root, idle_s=120, name=name)
    finally:
        sandbox_supervisor.SUPERVISOR = kept
    try:
        assert sandbox_container.claim(client, box, name)
        sandbox_files.place_files(box, [("job.py", script.encode())], limits)
        started = time.perf_counter()
        result = sandbox_run.run(
            client,
            box,
            env,
            argv=["python3", "/work/job.py"],
            timeout_s=120,
            on_output=lambda stream, text: None,
        )
        took = time.perf_counter() - started
        assert result.exit_code == 0, result
        return took
    finally:
        sandbox_container.discard(client, box)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    client = docker.from_env()
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-sup-"))
    try:
        print(
            "| script | floor: output straight to the streams, median s"
            " | kept copy, median s | ÷ floor |"
        )
        print("| --- | ---: | ---: | ---: |")
        for label, script in SCRIPTS.items():
            times: dict[str, list[float]] = {"floor": [], "kept": []}
            for round_ in range(args.repeat):
                order = [("floor", DIRECT_SUPERVISOR), ("kept", sandbox_supervisor.SUPERVISOR)]
                for key, supervisor in order if round_ % 2 == 0 else reversed(order):
                    times[key].append(once(client, root, supervisor, script))
            floor, kept = (statistics.median(times[k]) for k in ("floor", "kept"))
            print(f"| {label} | {floor:.3f} | {kept:.3f} | {kept / floor:.2f}× |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
