"""RGrid benchmark: what a run costs through the CLI, next to the bare floor beneath it.

The bar: a warm run costs no more than a bare ``docker run`` of the same script on the same
host, editing one line costs the same as a warm run, and a new requirements set costs about
what ``uv pip install`` of it costs on the host. This measures each of those in one
invocation, as ratios against its floor, plus a first run of a PEP 723 pandas script against
``uv run`` of it; nothing here passes or fails. Every measurement is the wall time of a whole
process (``time.perf_counter`` around ``subprocess.run``), because that is what a user waits
for: interpreter start, imports, submission, the sandbox, the summary, the download.

Repetitions are interleaved (each round runs every row of a section once, in a rotated order)
so that a slow spell on a shared machine spreads over all rows instead of landing on one.

Run with ``make bench`` or ``.venv/bin/python bench/run.py [--repeat N] [--stack private]``.
Needs the runtime image (``make setup``), the local services and the package index (numpy,
six, pandas; pip for the ``docker build`` floor's Dockerfile). The stack is the one ``make up``
starts (idempotent), or with ``--stack private`` an API and a worker of this checkout that the
benchmark starts (with the same launcher, scripts/stack.py) on a database, Redis database and
bucket of their own, and stops at the end. Every image, container, environment folder and
temporary directory made here (and a private stack's database and bucket) is removed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import hashlib
import http.server
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
RGRID = BIN / "rgrid"
UV = BIN / "uv"
RESULTS_FILE = REPO / "bench" / "results" / "latest.md"

sys.path.insert(0, str(REPO))
from rgrid.core import cache_keys  # noqa: E402
from rgrid.core.config import DEFAULT_RUNTIME, Settings  # noqa: E402
from rgrid.host.runtimes import CONTAINER_GID, CONTAINER_UID, WORK_DIR, resolve_runtime  # noqa: E402
from rgrid.host.sandbox import DEPS_MOUNT  # noqa: E402
from rgrid.host.sandbox_run import thread_environment  # noqa: E402
from scripts import stack  # noqa: E402 - the one stack launcher, found through REPO

#: The runtime every row runs on; the floors use its image, interpreter and platform (their
#: dependency folder is installed for them exactly as RGrid installs its own), its work folder
#: (where RGrid's sandbox has the script too) and its uid (the floors' output folders must be
#: writable by it). The edit floor mounts its dependency set where RGrid mounts one.
RUNTIME = resolve_runtime(DEFAULT_RUNTIME)
RUNTIME_IMAGE = RUNTIME.image
PYTHON_VERSION = RUNTIME.python_version
PYTHON_PLATFORM = RUNTIME.python_platform
SCRIPT_IN_WORK = f"{WORK_DIR}/script.py"
#: Images the floors build are tagged here, so cleanup can never touch anyone else's.
FLOOR_REPOSITORY = "rgrid-bench-floor"
#: Where the ``docker build`` floor COPYs the script (it is part of that image).
SCRIPT_IN_IMAGE = "/app/script.py"
#: The host's CA bundle: the package index is reached through a TLS-intercepting proxy, so the
#: floor's ``pip install`` inside a build container needs it too.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Longest any one measured command may take (the ``docker build`` floor takes ~30 s here).
COMMAND_TIMEOUT_S = 900

#: RGrid's sandbox (rgrid/host/sandbox.py, with the default limits of rgrid/core/config.py)
#: as ``docker run`` flags, for the "+ sandbox flags" floors: read-only root, /tmp tmpfs, the
#: runtime's
#: user, no capabilities, no new privileges, the memory/CPU/PID limits, no network, and the
#: thread counts that fit the CPU limit. (RGrid's home tmpfs is left out: the scripts never
#: write there.)
_LIMITS = Settings()
SANDBOX_FLAGS = [
    *(f"-e{name}={value}" for name, value in thread_environment(_LIMITS.cpu_limit).items()),
    "--read-only",
    *("--tmpfs", "/tmp"),
    *("--user", f"{CONTAINER_UID}:{CONTAINER_GID}"),
    *("--cap-drop", "ALL"),
    *("--security-opt", "no-new-privileges"),
    *("--memory", _LIMITS.memory_limit, "--memory-swap", _LIMITS.memory_limit),
    *("--cpus", f"{_LIMITS.cpu_limit:g}", "--pids-limit", str(_LIMITS.pids_limit)),
    *("--network", "none"),
]

#: The small script: one line on stdout, one file under outputs/ (relative: the working
#: directory is /work in RGrid's sandbox and in the runtime image, a folder of its own for
#: ``uv run``).
SCRIPT = """\
import os

print("hello from the rgrid benchmark")
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write("ok\\n")
"""

#: The same with dependencies: it imports numpy and six and uses numpy for its output.
DEPS_SCRIPT = """\
import os

import numpy
import six

print("hello from the rgrid benchmark: numpy", numpy.__version__, "six", six.__version__)
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{numpy.arange(10).sum()}\\n")
"""

#: The small script for the piped-stdin rows: it reads all of stdin (EOF is the pipe's own end)
#: and writes what it counted.
STDIN_SCRIPT = """\
import os
import sys
data = sys.stdin.read()
print("hello from the rgrid benchmark:", len(data.splitlines()), "lines on stdin")
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{len(data)}\\n")
"""
#: What the piped-stdin rows pipe in: real bytes, 64 KiB of lines.
STDIN_DATA = "".join(f"record {i:06d} of the benchmark's piped input\n" for i in range(1430))
#: A small pandas script whose dependencies are PEP 723 inline metadata: pandas from the
#: package index, and the pad package (a new version every time, see :func:`pad_url`) so
#: that each run is the first run of a new set, for RGrid and for ``uv run`` alike.
PANDAS_SCRIPT = """\
# /// script
# dependencies = [
#   "pandas",
#   "{pad} @ {url}",
# ]
# ///
import os

import pandas as pd

frame = pd.DataFrame({{"a": range(100), "b": range(100)}})
total = int(frame.to_numpy().sum())
print("hello from the rgrid benchmark: pandas", pd.__version__, "sum", total)
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{{total}}\\n")
"""

#: A tiny local package, a new version for every requirements set (see :func:`pad_wheel`).
PAD_PACKAGE = "rgrid-bench-pad"

#: The benchmark's sections, in the order they run (``--only`` picks some).
SECTIONS = ("warm", "stdin", "reuse", "edit", "new-set", "pep723")


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed); the numbers would mean nothing."""


class SetupError(BenchError):
    """Retrying cannot help (for example, the stack runs code from before environments)."""


@dataclass
class Row:
    """One line of the table: a way of running the script, timed once per round."""

    key: str
    label: str
    #: The keys of the rows this one is divided by (the ratio columns), if any.
    floor: str | None = None
    sandbox_floor: str | None = None
    #: Issue 7's target for this row's ratio to its floor, shown beside it.
    target: str = ""
    times: list[float] = field(default_factory=list)
    #: What rgrid itself reported for each run (--json), to show where the wall time goes.
    reports: list[dict] = field(default_factory=list)
    #: Runs that failed and were retried (their time is not in ``times``), one line each.
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass(frozen=True)
class Mode:
    """A way the CLI runs: against the stack, or the embedded default."""

    name: str  # "stack" or "embedded"
    label: str  # "against the stack" / "embedded default"
    env: dict[str, str]


@dataclass
class Env:
    """Everything the rows share: temp folders, the two CLI modes, what to clean up."""

    root: Path
    embedded_env: dict[str, str]
    stack_env: dict[str, str]
    stack_kind: str
    #: The stack worker's environments folder (its data dir + environments), if known.
    stack_environments: Path | None = None
    #: The base URL of the local HTTP server that serves pad wheels (see :func:`pad_url`).
    pad_base_url: str = ""
    #: One warm script per mode, new to this benchmark run; the floors run the stack's file.
    warm_script: dict[str, Path] = field(default_factory=dict)
    #: The same for the piped-stdin section (``STDIN_SCRIPT``).
    stdin_script: dict[str, Path] = field(default_factory=dict)
    #: One requirements set per mode for the edit loop, installed by the warm-up.
    edit_requirements: dict[str, Path] = field(default_factory=dict)
    #: The edit floor's dependency folder: the same packages, installed by uv with RGrid's
    #: flags, bytecode compiled (see :func:`install_floor_deps`).
    floor_deps: Path = Path()
    #: pip's wheel, for the ``docker build`` floor's Dockerfile (the runtime image has no pip).
    pip_wheel: Path = Path()
    #: The untimed warm-up runs, kept only for their failures (reported with the table).
    warmup: Row = field(default_factory=lambda: Row("warm-up", "warm-up (untimed)"))
    made_floor_images: set[str] = field(default_factory=set)
    #: Environment folders this run's stack runs installed (removed at the end).
    made_stack_environments: set[str] = field(default_factory=set)

    @property
    def modes(self) -> list[Mode]:
        """The stack first: its rows are the headline."""
        return [
            Mode("stack", "against the stack", self.stack_env),
            Mode("embedded", "embedded default", self.embedded_env),
        ]

    @property
    def embedded_uv_cache(self) -> Path:
        """Where the embedded default keeps uv's cache (rgrid/core/config.py: data dir/uv-cache).
        The bare uv floors use it too, so both sides find the same wheels."""
        return Path(self.embedded_env["RGRID_DATA_DIR"]) / "uv-cache"


# --- processes ------------------------------------------------------------------------------


def timed(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    stdin_data: str | None = None,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion and return (seconds, completed process). Output is captured
    rather than shown, so terminal speed is not part of the measurement. A command that hangs
    for ``COMMAND_TIMEOUT_S`` is a failed run, not a benchmark that never ends. Its stdin is
    ``stdin_data`` piped in, else /dev/null: never the benchmark's own stdin, which would make
    every row's path depend on how the benchmark was started (a terminal or a pipe)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            input=stdin_data,
            stdin=subprocess.DEVNULL if stdin_data is None else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"`{shlex.join(cmd)}` still running after {COMMAND_TIMEOUT_S}s") from exc
    elapsed = time.perf_counter() - started
    if check:
        raise_for_exit(cmd, proc)
    return elapsed, proc


def raise_for_exit(cmd: list[str], proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BenchError(f"`{shlex.join(cmd)}` exited {proc.returncode}:\n{tail}")


def output_of(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Stdout of a quick helper command (not timed)."""
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def docker_server_version() -> str:
    return output_of(["docker", "version", "--format", "{{.Server.Version}}"])


@functools.cache
def docker_client():
    """docker-py, for untimed bookkeeping only (waiting for RGrid's background work, cleanup):
    every timed Docker command goes through the docker CLI, as a user would type it."""
    import docker

    return docker.from_env(timeout=120)


# --- environments ---------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The caller's environment without RGRID_*: each row states its own configuration, so a
    stray RGRID_API_URL in the shell cannot turn the embedded row into a stack row."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RGRID_")}


def _claim_redis_db(base_url: str) -> int:
    """An empty Redis database (2-15; 0 is `make up`'s stack's, 1 the tests'), marked as taken."""
    import redis

    for number in range(15, 1, -1):
        client = redis.Redis.from_url(f"{base_url}/{number}")
        if client.dbsize() == 0 and client.set("rgrid-bench:claimed", "1", nx=True):
            return number
    raise SetupError("no empty Redis database (2-15) for a private stack")


@contextmanager
def private_stack(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """An API (gunicorn) and a Celery worker of this checkout, started by the stack launcher
    as `make up` starts them but on a new database (migrated here), an empty Redis database and
    a new bucket, so that they share nothing with the running stack or the tests. All of it is
    removed on the way out."""
    import boto3

    from rgrid.core.db import upgrade

    dev = stack.dev_env()
    token = uuid.uuid4().hex[:8]
    redis_base = dev["RGRID_REDIS_URL"].rsplit("/", 1)[0]
    bucket = f"rgrid-bench-{token}"
    redis_db: int | None = None
    try:
        with stack.fresh_database("rgrid_bench") as db_url:
            redis_db = _claim_redis_db(redis_base)
            server_env = {
                **clean_environ(),
                **dev,
                "RGRID_DATABASE_URL": db_url,
                "RGRID_REDIS_URL": f"{redis_base}/{redis_db}",
                "RGRID_S3_BUCKET": bucket,
                "RGRID_DATA_DIR": str(root / "stack-data"),
                **BENCH_STACK_ENV,
                **(extra_env or {}),
            }
            upgrade(db_url)
            config = stack.StackConfig(
                env=server_env,
                log_dir=root / "stack-logs",
                name=f"rgrid-bench-{token}",
                api_port=stack.free_port(),
                roles=("api", "worker"),
                supervised=False,
            )
            try:
                with stack.Stack(config):
                    key = stack.create_account_key(server_env, f"bench-{token}")
                    yield {"RGRID_API_URL": config.api_url, "RGRID_API_KEY": key}
            except RuntimeError as exc:  # the API did not start
                raise SetupError(str(exc)) from exc
    finally:
        if redis_db is not None:
            import redis

            redis.Redis.from_url(f"{redis_base}/{redis_db}").flushdb()
        _remove_bucket(boto3, dev, bucket)


def _remove_bucket(boto3, dev: dict[str, str], bucket: str) -> None:
    """Best effort, on the way out: when the object store is what failed, its error (already
    reported) must not be followed by a second traceback from this tidy-up."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=dev["RGRID_S3_ENDPOINT_URL"],
        aws_access_key_id=dev["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=dev["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.NoSuchBucket:
        pass
    except (BotoCoreError, ClientError) as exc:
        print(f"bench: could not remove bucket {bucket}: {exc}", file=sys.stderr)


#: What the bench's stack must allow that the development stack does not: wheels from local
#: folders (the edited-requirements rows) and from the pad server on loopback (PEP 723 rows).
BENCH_STACK_ENV = {"RGRID_ALLOW_LOCAL_FIND_LINKS": "1", "RGRID_ALLOWED_INDEXES": "127.0.0.1"}


def _worker_environ() -> dict[str, str]:
    """The running `make up` worker's environment ({} when it cannot be read)."""
    values = {}
    try:
        pid = stack.running_pid("worker")
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            name, _, value = item.partition(b"=")
            values[name.decode(errors="replace")] = value.decode(errors="replace")
    except (OSError, ValueError, TypeError):
        pass
    return values


def check_up_stack_allows_local_wheels() -> None:
    """A stack `make up` started before without the bench's settings refuses the local wheels:
    say so, rather than fail rows one by one."""
    environ = _worker_environ()
    if environ and any(environ.get(k) != v for k, v in BENCH_STACK_ENV.items()):
        raise BenchError(
            "the running stack does not allow local wheels (it was started without "
            + " ".join(f"{k}={v}" for k, v in BENCH_STACK_ENV.items())
            + "): `make down` and run the bench again (it starts the stack), or use --stack private"
        )


def up_stack_environments() -> Path:
    """The environments folder of the stack `make up` started: its worker's RGRID_DATA_DIR
    (read from the running worker's environment), else the default data dir of this user, which
    is what the worker uses when the variable is unset (scripts/dev.env does not set it)."""
    from rgrid.core.config import Settings

    data_dir = None
    try:
        pid = stack.running_pid("worker")
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            name, _, value = item.partition(b"=")
            if name == b"RGRID_DATA_DIR" and value:
                data_dir = Path(value.decode())
    except (OSError, ValueError):
        pass
    if data_dir is None:
        return Settings().environments_dir
    return data_dir / "environments"


def start_pad_server(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server on loopback for the pad wheels of the PEP 723 rows: a PEP 723 block can
    only name a package index or a URL (RGrid takes http(s) URLs, no local paths), and RGrid's
    installs and ``uv run`` both run on this host, so both fetch the same tiny wheel from here.
    """

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="pad-server", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextmanager
def bench_env(stack_kind: str) -> Iterator[Env]:
    """Temp folders, CLI environments and the pad server; on the way out, everything made here
    (see :func:`cleanup`)."""
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-"))
    env = Env(
        root=root,
        embedded_env={**clean_environ(), "RGRID_DATA_DIR": str(root / "embedded-data")},
        stack_env={},
        stack_kind=stack_kind,
    )
    try:
        with ExitStack() as exits:
            (root / "cwd").mkdir()  # the CLI writes ./rgrid-outputs/<id>/ under its cwd
            (root / "pad-http").mkdir()
            server, env.pad_base_url = start_pad_server(root / "pad-http")
            exits.callback(server.server_close)
            exits.callback(server.shutdown)
            for mode in ("stack", "embedded"):
                env.warm_script[mode] = unique_script(root, f"warm-{mode}")
                env.stdin_script[mode] = unique_script(root, f"stdin-{mode}", STDIN_SCRIPT)
                env.edit_requirements[mode] = new_requirements(root, f"edit-{mode}")
            env.pip_wheel = download_pip(root)
            if stack_kind == "private":
                exports = exits.enter_context(private_stack(root))
                env.stack_environments = root / "stack-data" / "environments"
            else:
                try:
                    exports = stack.up(extra_env=BENCH_STACK_ENV)
                except RuntimeError as exc:
                    raise BenchError(f"the stack did not start: {exc}") from exc
                check_up_stack_allows_local_wheels()
                env.stack_environments = up_stack_environments()
            env.stack_env = {**clean_environ(), **exports}
            yield env
    finally:
        cleanup(env)


def cleanup(env: Env) -> None:
    """Remove what this run made: the floor images; every container that mounts something
    under the temp root (the embedded default's and a private stack's warm sandboxes, bytecode
    compiles); the environment folders this run's stack runs installed, with the stack's warm
    sandboxes for them (sets nobody will run again); then the temp root. ``rgrid-runtime:*``
    is never touched, nor any other container or folder of the stack."""
    if env.made_floor_images:
        refs = sorted(env.made_floor_images)
        proc = subprocess.run(["docker", "rmi", *refs], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"cleanup: docker rmi: {proc.stderr.strip()}", file=sys.stderr)
    from rgrid.client.agent_client import stop_agents
    from rgrid.core.config import Settings

    agents = stop_agents(Settings(data_dir=Path(env.embedded_env["RGRID_DATA_DIR"])))
    doomed = [env.root]
    made = sorted(env.made_stack_environments)
    if env.stack_environments is not None and env.stack_kind == "up":
        doomed += [env.stack_environments / name for name in made]
    containers = removed_envs = 0
    try:
        containers = remove_containers_mounting(doomed)
        if env.stack_kind == "up" and env.stack_environments is not None:
            from rgrid.host import environments

            for name in made:
                if (env.stack_environments / name).is_dir():
                    environments.remove(env.stack_environments, name)
                    removed_envs += 1
    except Exception as exc:  # noqa: BLE001 - the temp root goes anyway; say what was left
        print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(env.root, ignore_errors=True)
    print(
        f"cleanup: stopped {agents} embedded agent(s), removed"
        f" {len(env.made_floor_images)} floor image(s), {containers} "
        f"container(s), {removed_envs} stack environment folder(s) and {env.root}",
        file=sys.stderr,
    )


def remove_containers_mounting(paths: list[Path]) -> int:
    """End every container (RGrid's, by its label) with a mount at or under one of ``paths``.
    A warm sandbox is retired as RGrid retires it (claimed under a throwaway name first, so no
    execution can be claiming it at that moment); anything else is removed by force."""
    from rgrid.core.cache_keys import HOST_DIR_LABEL, MANAGED_LABEL
    from rgrid.host import pool, sandbox

    client = docker_client()
    prefixes = [str(p).rstrip("/") for p in paths]

    def ours(container: dict) -> bool:
        sources = [m.get("Source", "") for m in container.get("Mounts", [])]
        return any(s == p or s.startswith(p + "/") for s in sources for p in prefixes)

    count = 0
    for container in client.api.containers(all=True, filters={"label": MANAGED_LABEL}):
        if not ours(container):
            continue
        name = container["Names"][0].lstrip("/")
        host_dir = container["Labels"].get(HOST_DIR_LABEL)
        try:
            if name.startswith(sandbox.POOL_NAME_PREFIX) and host_dir:
                pool.retire(client, sandbox.Box(name, container["Id"], Path(host_dir)))
            else:
                client.api.remove_container(container["Id"], force=True)
            count += 1
        except Exception as exc:  # noqa: BLE001 - cleanup goes on; say what was left
            print(f"cleanup: container {name}: {exc}", file=sys.stderr)
    return count


def wait_for_compile(environment: str, timeout_s: float = 600) -> float:
    """Wait (untimed) until RGrid's background bytecode compile of ``environment`` has ended
    (rgrid/host/environments.py ``compile_bytecode``: a container that mounts the environment's
    folder and runs compileall). A first run leaves one behind, and it must not land on the
    next row's time. Compiles of other environments (tests, other users) are not waited for.
    Returns the seconds waited."""
    from rgrid.core.cache_keys import MANAGED_LABEL

    filters = {"label": MANAGED_LABEL, "status": "running"}
    started = time.perf_counter()
    deadline = started + timeout_s

    def compiling(container: dict) -> bool:
        sources = [m.get("Source", "") for m in container.get("Mounts", [])]
        return "compileall" in container.get("Command", "") and any(
            Path(source).name == environment for source in sources
        )

    while time.perf_counter() < deadline:
        if not any(compiling(c) for c in docker_client().api.containers(filters=filters)):
            return time.perf_counter() - started
        time.sleep(0.2)
    print(f"  the bytecode compile of {environment} is still running; going on", file=sys.stderr)
    return time.perf_counter() - started


def download_pip(root: Path) -> Path:
    """pip's wheel, once per benchmark run (untimed): the runtime image has no pip, and the
    ``docker build`` floor's Dockerfile runs pip straight from the wheel."""
    folder = root / "pip"
    pip = [str(BIN / "pip"), "download", "pip", "--no-deps", "--quiet", "-d", str(folder)]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False)
    raise_for_exit(pip, proc)
    return next(folder.glob("pip-*.whl"))


# --- the things being measured ---------------------------------------------------------------

#: A measurement: wall seconds and whatever timings the measured thing reported about itself.
Sample = tuple[float, dict]


def unique_script(root: Path, tag: str, body: str = SCRIPT) -> Path:
    """The script plus one comment line nobody has hashed before: the edit loop's one changed
    line, and a guaranteed script-cache miss. Each in a folder of its own (``script.py``)."""
    folder = root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(f"{body}# bench {uuid.uuid4().hex}\n")
    return path


def new_version() -> str:
    return f"1.{int(uuid.uuid4().hex[:8], 16)}"


def new_requirements(root: Path, tag: str) -> Path:
    """A requirements set nobody has installed before: numpy and six, plus the pad package of a
    new version from a new ``--find-links`` folder. The new version changes what is installed,
    so no step anywhere (RGrid's environment folder, Docker's layer cache for the floor's pip
    layer) can reuse an earlier set's work, while numpy stays the bulk."""
    folder = root / f"req-{tag}-{uuid.uuid4().hex[:12]}"
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    pad_wheel(wheels, new_version())
    path = folder / "requirements.txt"
    path.write_text(f"numpy\nsix\n{PAD_PACKAGE}\n--find-links {wheels}\n")
    return path


def pad_wheel(folder: Path, version: str) -> Path:
    """A valid pure-Python wheel of ``rgrid-bench-pad`` (one small module), written by hand."""
    dist = PAD_PACKAGE.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}.py": f'"""Padding for the RGrid benchmark."""\nVERSION = "{version}"\n'.encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PAD_PACKAGE}\nVersion: {version}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: rgrid-bench\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,", ""]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def pad_url(env: Env) -> str:
    """A new version of the pad wheel on the local HTTP server: its URL, for a PEP 723 block."""
    wheel = pad_wheel(env.root / "pad-http", new_version())
    return f"{env.pad_base_url}/{wheel.name}"


def pandas_script(env: Env, tag: str) -> Path:
    """The PEP 723 pandas script with a new pad version: a set nobody has installed before."""
    folder = env.root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(PANDAS_SCRIPT.format(pad=PAD_PACKAGE, url=pad_url(env)))
    return path


def cli_run(
    env: Env,
    mode: Mode,
    script: Path,
    *,
    requirements: Path | None = None,
    script_hit: bool | None = None,
    deps_hit: bool | None = None,
    with_deps: bool = False,
    stdin_data: str | None = None,
    reuse: bool = False,
    reused: bool | None = None,
) -> Sample:
    """One ``rgrid run --json``: wall time of the whole process and the JSON it printed.

    A run that fails, or hits a cache it should miss (or the reverse), is not a sample: its
    time would measure something else. ``deps_hit`` None: no dependencies, or (``with_deps``)
    some, hit or miss.
    After a run that installed a set, untimed: the environment folder is recorded for cleanup,
    RGrid's background bytecode compile is waited for (so it lands on no other row), and uv's
    own timings are read from the execution's stored log. ``stdin_data``: piped to the
    CLI (else its stdin is /dev/null). ``reuse``: run with ``--reuse``; ``reused``: expect the
    run to be answered from the output cache (True) or to run (False)."""
    cmd = [str(RGRID), "run", str(script), "--json"]
    if requirements is not None:
        cmd += ["-r", str(requirements)]
    if reuse:
        cmd.append("--reuse")
    elapsed, proc = timed(
        cmd, env=mode.env, cwd=env.root / "cwd", check=False, stdin_data=stdin_data
    )
    report = last_json_line(proc.stdout)
    installed = report.get("deps_build_s") is not None
    if installed and mode.name == "stack" and report.get("environment"):
        env.made_stack_environments.add(report["environment"])
    compile_wait = None
    if installed and report.get("environment"):
        compile_wait = wait_for_compile(report["environment"])
    raise_for_exit(cmd, proc)
    if "image_ref" in report or "environment" not in report:
        raise SetupError(
            f"the {mode.label} runs RGrid from before environments (issue 7): its --json has "
            "image_ref or lacks environment. Restart the stack (`make down && make up`) or run "
            f"the benchmark with --stack private. Report: {report}"
        )
    if report.get("status") != "succeeded" or not report.get("outputs_dir"):
        raise BenchError(f"rgrid run did not succeed with an output: {report}")
    if reused is not None and bool(report.get("reused_from")) != reused:
        raise BenchError(f"expected the run {'reused' if reused else 'to run'}: {report}")
    if reused:
        return elapsed, report
    if script_hit is not None and bool(report.get("script_cache_hit")) != script_hit:
        raise BenchError(f"expected a script cache {'hit' if script_hit else 'miss'}: {report}")
    has_deps = cache_keys.has_dependencies(report.get("dependency_hash"))
    if deps_hit is None and not with_deps:
        if has_deps:
            raise BenchError(f"a script without dependencies had some: {report}")
        return elapsed, report
    if not has_deps:
        raise SetupError(f"the {mode.label} ignored the script's dependencies: {report}")
    if deps_hit is not None and bool(report.get("dependency_cache_hit")) != deps_hit:
        raise BenchError(f"expected a dependency cache {'hit' if deps_hit else 'miss'}: {report}")
    if deps_hit is False and not installed:
        raise BenchError(f"a dependency cache miss that installed nothing: {report}")
    if installed:
        report = {**report, **uv_timings(mode, report["execution_id"])}
        if compile_wait is not None:
            report["compile_after_s"] = compile_wait
    return elapsed, report


#: uv's own summary lines: "Resolved 3 packages in 162ms", "Installed 3 packages in 1.02s".
_UV_TIMING = re.compile(r"\b(Resolved|Prepared|Installed) \d+ packages? in ([\d.]+)(ms|s)\b")
_UV_KEYS = {"Resolved": "uv_resolved_s", "Prepared": "uv_prepared_s", "Installed": "uv_installed_s"}


def uv_timings(mode: Mode, execution_id: str) -> dict[str, float]:
    """uv's own timings of RGrid's one install command, from the execution's stored log (the
    ``detail`` stream, which ``rgrid logs`` prints): read after the run, untimed."""
    cmd = [str(RGRID), "logs", execution_id, "--no-follow"]
    proc = subprocess.run(cmd, env=mode.env, capture_output=True, text=True, check=False)
    return parse_uv_timings(proc.stdout + proc.stderr)


def parse_uv_timings(log: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in _UV_TIMING.finditer(log):
        key = _UV_KEYS[match[1]]
        found[key] = found.get(key, 0.0) + float(match[2]) / (1000 if match[3] == "ms" else 1)
    return found


def last_json_line(stdout: str) -> dict:
    """``--json`` prints one object as the last line of stdout; {} if there is none (a crash)."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def writable_outputs(folder: Path) -> Path:
    """An ``outputs`` folder the runtime image's user can write, for a floor's bind mount."""
    outputs = folder / "outputs"
    outputs.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(outputs, CONTAINER_UID, CONTAINER_GID)
    else:
        outputs.chmod(0o777)
    return outputs


def bare_run(
    script: Path,
    *,
    image: str = RUNTIME_IMAGE,
    deps: Path | None = None,
    sandboxed: bool = False,
    in_image: bool = False,
    stdin_data: str | None = None,
) -> Sample:
    """The floor: ``docker run --rm --network none`` of the runtime image with the script
    bind-mounted read-only at /work/script.py and a writable /work/outputs (RGrid's sandbox has
    both at the same paths), optionally with a dependency folder mounted read-only at RGrid's
    path and put on PYTHONPATH, as RGrid does. ``in_image``: the script is already in the image
    (the ``docker build`` floor), so only the outputs folder is mounted. ``stdin_data``:
    piped in, with ``docker run -i`` (else stdin is /dev/null and not attached)."""
    flags = SANDBOX_FLAGS if sandboxed else ["--network", "none"]
    if stdin_data is not None:
        flags = ["-i", *flags]
    mounts = ["-v", f"{writable_outputs(script.parent)}:{WORK_DIR}/outputs"]
    if not in_image:
        mounts += ["-v", f"{script}:{SCRIPT_IN_WORK}:ro"]
    if deps is not None:
        mounts += ["-v", f"{deps}:{DEPS_MOUNT}:ro", "-e", f"PYTHONPATH={DEPS_MOUNT}"]
    target = SCRIPT_IN_IMAGE if in_image else SCRIPT_IN_WORK
    elapsed, _ = timed(
        ["docker", "run", "--rm", *flags, *mounts, image, "python3", target], stdin_data=stdin_data
    )
    return elapsed, {}


def cli_start() -> Sample:
    """Diagnostic: ``rgrid --version`` does no work at all, so its time is the CLI's fixed cost
    (interpreter start and imports), which every ``rgrid run`` pays before submitting."""
    elapsed, _ = timed([str(RGRID), "--version"])
    return elapsed, {}


def bare_build(env: Env, context: Path) -> tuple[float, str]:
    """``docker build`` of ``context`` on the classic builder. The tag is recorded before the
    build so that even a half-finished build gets cleaned up."""
    tag = f"{FLOOR_REPOSITORY}:{uuid.uuid4().hex[:12]}"
    env.made_floor_images.add(tag)
    build = ["docker", "build", "-q", "--force-rm", "-t", tag, str(context)]
    build_s, _ = timed(build, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return build_s, tag


def bare_deps_build_and_run(env: Env) -> Sample:
    """The new-set floor: what one would write without RGrid, a Dockerfile that pip-installs
    the same requirements.txt (a new set, as for RGrid) and copies the script, on the classic
    builder, then one run. The CA bundle and pip's wheel are the same bytes every time, so
    their layers come from Docker's cache after the first build; the requirements layer is new
    every time, and with it everything after."""
    requirements = new_requirements(env.root, "floor")
    context = requirements.parent
    wheels = context / "wheels"
    shutil.copy(CA_BUNDLE, context / "ca.crt")
    shutil.copy(env.pip_wheel, context / env.pip_wheel.name)
    script = context / "script.py"
    shutil.copy(unique_script(env.root, "floor-deps", DEPS_SCRIPT), script)
    pip = f"/tmp/{env.pip_wheel.name}/pip"
    (context / "Dockerfile").write_text(
        f"FROM {RUNTIME_IMAGE}\n"
        "USER root\n"
        "COPY ca.crt /tmp/ca.crt\n"
        f"COPY {env.pip_wheel.name} /tmp/{env.pip_wheel.name}\n"
        # The same absolute path as on the host, so the same --find-links line works.
        f"COPY wheels/ {wheels}/\n"
        "COPY requirements.txt /tmp/requirements.txt\n"
        "RUN PIP_CERT=/tmp/ca.crt SSL_CERT_FILE=/tmp/ca.crt python3 "
        f"{pip} install --no-cache-dir --break-system-packages --root-user-action=ignore "
        "--disable-pip-version-check -r /tmp/requirements.txt\n"
        f"USER {CONTAINER_UID}:{CONTAINER_GID}\n"
        f"COPY script.py {SCRIPT_IN_IMAGE}\n"
    )
    build_s, tag = bare_build(env, context)
    run_s, _ = bare_run(script, image=tag, in_image=True)
    return build_s + run_s, {"docker_build_s": build_s, "docker_run_s": run_s}


@functools.cache
def rgrid_uv_settings() -> dict[str, str]:
    """The settings RGrid gives uv (the host's pip configuration translated,
    rgrid/host/dependencies.py): the bare uv floors get exactly the same."""
    from rgrid.host.dependencies import uv_environment

    return dict(uv_environment())


def uv_env(cache_dir: Path) -> dict[str, str]:
    return {
        **clean_environ(),
        **rgrid_uv_settings(),
        "UV_CACHE_DIR": str(cache_dir),
        "NO_COLOR": "1",
    }


def bare_uv_install(env: Env, cache_dir: Path) -> Sample:
    """The install floor: ``uv venv`` + ``uv pip install -r`` of a new requirements set on the
    host (resolve and install; uv's defaults), with the given uv cache."""
    requirements = new_requirements(env.root, "uv")
    folder, venv = requirements.parent, requirements.parent / "venv"
    uv = uv_env(cache_dir)
    venv_s, _ = timed([str(UV), "venv", "--python", PYTHON_VERSION, str(venv)], env=uv, cwd=folder)
    install = [str(UV), "pip", "install", "--python", str(venv / "bin" / "python")]
    install_s, _ = timed([*install, "-r", str(requirements)], env=uv, cwd=folder)
    return venv_s + install_s, {"venv_s": venv_s, "uv_install_s": install_s}


def bare_uv_run(env: Env) -> Sample:
    """The PEP 723 floor: ``uv run script.py`` on the host, in the script's own folder, with
    the embedded default's (warm) uv cache. The block names a new pad version, so uv creates
    and fills a new environment every time, as RGrid installs a new set."""
    script = pandas_script(env, "uv-run")
    cmd = [str(UV), "run", "--python", PYTHON_VERSION, str(script)]
    elapsed, _ = timed(cmd, env=uv_env(env.embedded_uv_cache), cwd=script.parent)
    if not (script.parent / "outputs" / "result.txt").is_file():
        raise BenchError(f"`uv run` of {script} wrote no output")
    return elapsed, {}


def install_floor_deps(env: Env) -> Path:
    """The edit floor's dependency folder, once (untimed): the same packages as the edit loop's
    set, installed by uv with RGrid's command line (rgrid/host/dependencies.py) from the embedded
    default's warm cache, then compiled to bytecode with the runtime's interpreter, as RGrid
    compiles its folders in the background. Without the bytecode the floor would compile numpy
    on every import (read-only mount) and flatter RGrid."""
    requirements = new_requirements(env.root, "edit-floor")
    target = requirements.parent / "deps"
    install = [str(UV), "pip", "install", "--target", str(target), "--link-mode", "hardlink"]
    install += ["--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM]
    install += ["--only-binary", ":all:", "-r", str(requirements)]
    timed(install, env=uv_env(env.embedded_uv_cache), cwd=requirements.parent)
    (target / ".lock").unlink(missing_ok=True)
    compile_ = ["docker", "run", "--rm", "--network", "none", "--user", "0:0"]
    compile_ += ["-v", f"{target}:{DEPS_MOUNT}", RUNTIME_IMAGE]
    timed([*compile_, "python3", "-m", "compileall", "-q", "-j", "0", DEPS_MOUNT])
    return target


# --- warm-ups ---------------------------------------------------------------------------------


def warm_up(env: Env) -> None:
    """Untimed, before section 1: each mode's warm script once (a script cache miss, which
    also starts the warm pool's sandbox for the runtime), and both floors once, so every timed
    run is a cache hit on an engine with the image's layers in the page cache. Each mode has a
    script of its own, new to this run."""
    row = env.warmup
    for mode in env.modes:
        script = env.warm_script[mode.name]
        measure_with_retries(row, lambda m=mode, s=script: cli_run(env, m, s))
    floor_script = env.warm_script["stack"]
    measure_with_retries(row, lambda: bare_run(floor_script))
    measure_with_retries(row, lambda: bare_run(floor_script, sandboxed=True))


def stdin_warm_up(env: Env) -> None:
    """Untimed, before the piped-stdin section: each mode's stdin script once (its script
    cache miss) and the piped floor once."""
    row = env.warmup
    for mode in env.modes:
        script = env.stdin_script[mode.name]
        measure_with_retries(
            row, lambda m=mode, s=script: cli_run(env, m, s, stdin_data=STDIN_DATA)
        )
    measure_with_retries(row, lambda: bare_run(env.stdin_script["stack"], stdin_data=STDIN_DATA))


def edit_warm_up(env: Env, first: Row) -> None:
    """Untimed, before section 2: each mode installs its edit-loop set (the embedded one on
    its fresh data dir, so with uv's cache empty: kept in ``first`` as context), then runs one
    more edited script on it, so the timed edit loop only ever hits the dependency cache with
    the bytecode compiled and a warm sandbox waiting. This also fills each mode's uv cache with
    numpy and six, as on any host that has installed them once. Then the floor's folder."""
    row = env.warmup
    for mode in reversed(env.modes):  # the embedded default first: its uv cache is empty
        requirements = env.edit_requirements[mode.name]
        # The first run installs the set (a retry after a failed run may find it installed);
        # the second must find it.
        for hit in (None, True):
            script = unique_script(env.root, f"edit-warm-{mode.name}", DEPS_SCRIPT)
            _, report = measure_with_retries(
                row,
                lambda m=mode, s=script, r=requirements, h=hit: cli_run(
                    env, m, s, requirements=r, deps_hit=h, with_deps=True
                ),
            )
            if (
                mode.name == "embedded"
                and report.get("deps_build_s") is not None
                and not first.times
            ):
                first.times.append(report["deps_build_s"])
                first.reports.append(report)
    if not env.embedded_uv_cache.is_dir():
        raise SetupError(f"the embedded default's uv cache is not at {env.embedded_uv_cache}")
    env.floor_deps = install_floor_deps(env)
    script = unique_script(env.root, "edit-warm-floor", DEPS_SCRIPT)
    measure_with_retries(row, lambda: bare_run(script, deps=env.floor_deps))


def pep723_warm_up(env: Env) -> None:
    """Untimed, before section 5: one first run per side, which downloads pandas into each uv
    cache (the stack's, and the embedded default's that ``uv run`` shares), so that the timed
    runs find every wheel there, as on a host that has installed pandas once."""
    row = env.warmup
    for mode in env.modes:
        measure_with_retries(
            row,
            lambda m=mode: cli_run(
                env, m, pandas_script(env, f"pep723-warm-{m.name}"), deps_hit=False
            ),
        )
    measure_with_retries(row, lambda: bare_uv_run(env))


# --- rows and rounds -------------------------------------------------------------------------

Measure = Callable[[], Sample]

#: Attempts per sample before the benchmark gives up (see :func:`measure_with_retries`).
MAX_ATTEMPTS = 3

FLOOR = "warm-floor"
SANDBOX_FLOOR = "warm-sandbox-floor"
EDIT_FLOOR = "edit-floor"
EDIT_SANDBOX_FLOOR = "edit-sandbox-floor"
NEW_SET_FLOOR = "new-set-floor"
UV_FLOOR = "uv-floor"
UV_RUN_FLOOR = "uv-run-floor"
STDIN_FLOOR = "stdin-floor"

#: Issue 7's targets (ratio of the median to the floor's median), by row key.
TARGETS = {
    "warm-stack": "≤ 1.0×",
    "warm-embedded": "≤ 1.2×",
    "stdin-embedded": "≤ 1.2×",
    "reuse-stack": "≤ 0.5×",
    "reuse-embedded": "≤ 0.5×",
    "edit-stack": "≤ 1.1×",
    "new-set-stack": "≤ 0.1×",
    "install-stack": "≤ 1.5×",
    "pep723-stack": "≤ 1.5×",
}


def rgrid_row(key: str, label: str, floor: str, sandbox_floor: str | None = None) -> Row:
    return Row(key, label, floor=floor, sandbox_floor=sandbox_floor, target=TARGETS.get(key, ""))


def warm_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1: the same script, every cache hit, next to a bare ``docker run`` of it."""
    floor_script = env.warm_script["stack"]
    rows: list[tuple[Row, Measure]] = [
        (
            Row(FLOOR, "floor: `docker run --rm --network none`, script bind-mounted", FLOOR),
            lambda: bare_run(floor_script),
        ),
        (
            Row(SANDBOX_FLOOR, "floor + RGrid's sandbox flags", FLOOR, SANDBOX_FLOOR),
            lambda: bare_run(floor_script, sandboxed=True),
        ),
    ]
    for mode in env.modes:
        script = env.warm_script[mode.name]
        rows.append(
            (
                rgrid_row(f"warm-{mode.name}", f"`rgrid run`, {mode.label}", FLOOR, SANDBOX_FLOOR),
                lambda m=mode, s=script: cli_run(env, m, s, script_hit=True),
            )
        )
    rows.append(
        (Row("cli-start", "diagnostic: `rgrid --version` (CLI start-up only)", FLOOR), cli_start)
    )
    return rows


def stdin_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1b: a warm script that reads stdin, fed 64 KiB through a pipe (as from a
    Python ``subprocess.run``, a heredoc or CI), next to ``docker run -i`` fed the same; and
    the same script with stdin at /dev/null (as from a terminal), to see both paths at once."""
    floor_script = env.stdin_script["stack"]
    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                STDIN_FLOOR, "floor: `docker run -i --rm --network none`, stdin piped", STDIN_FLOOR
            ),
            lambda: bare_run(floor_script, stdin_data=STDIN_DATA),
        ),
    ]
    for mode in env.modes:
        script = env.stdin_script[mode.name]
        rows.append(
            (
                rgrid_row(
                    f"stdin-{mode.name}", f"`rgrid run`, {mode.label}, stdin piped", STDIN_FLOOR
                ),
                lambda m=mode, s=script: cli_run(env, m, s, script_hit=True, stdin_data=STDIN_DATA),
            )
        )
    embedded = next(mode for mode in env.modes if mode.name == "embedded")
    rows.append(
        (
            Row(
                "stdin-embedded-devnull",
                "`rgrid run`, embedded default, stdin /dev/null",
                STDIN_FLOOR,
            ),
            lambda: cli_run(env, embedded, env.stdin_script["embedded"], script_hit=True),
        )
    )
    return rows


def reuse_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1c: a repeat of an identical succeeded run with ``--reuse``, answered from the
    output cache (no sandbox, no script run), next to a bare ``docker run`` of the script.
    Untimed first, each mode's warm script once with ``--reuse``: every succeeded run records
    its entry, so this one is answered from the warm-up's run, or runs and records it."""
    for mode in env.modes:
        script = env.warm_script[mode.name]
        measure_with_retries(env.warmup, lambda m=mode, s=script: cli_run(env, m, s, reuse=True))
    floor_script = env.warm_script["stack"]
    rows: list[tuple[Row, Measure]] = [
        (
            Row(FLOOR, "floor: `docker run --rm --network none`, script bind-mounted", FLOOR),
            lambda: bare_run(floor_script),
        ),
    ]
    for mode in env.modes:
        script = env.warm_script[mode.name]
        rows.append(
            (
                rgrid_row(f"reuse-{mode.name}", f"`rgrid run --reuse`, {mode.label}", FLOOR),
                lambda m=mode, s=script: cli_run(env, m, s, reuse=True, reused=True),
            )
        )
    return rows


def _new_deps_script(
    env: Env, mode: Mode, tag: str, requirements: Callable[[Mode], Path], deps_hit: bool
) -> Measure:
    """A measure that runs a new copy of DEPS_SCRIPT (a script cache miss every time) with
    ``requirements(mode)``, by ``mode``."""

    def measure() -> Sample:
        script = unique_script(env.root, f"{tag}-{mode.name}", DEPS_SCRIPT)
        return cli_run(
            env,
            mode,
            script,
            requirements=requirements(mode),
            script_hit=False,
            deps_hit=deps_hit,
        )

    return measure


def edit_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 2: numpy + six cached, the script changed by one line every run; the floor runs
    the same kind of new script with the same packages mounted the same way."""

    def floor(sandboxed: bool) -> Measure:
        def measure() -> Sample:
            script = unique_script(env.root, "edit-floor", DEPS_SCRIPT)
            return bare_run(script, deps=env.floor_deps, sandboxed=sandboxed)

        return measure

    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                EDIT_FLOOR,
                f"floor: `docker run --rm --network none -v DEPS:{DEPS_MOUNT}:ro "
                f"-e PYTHONPATH={DEPS_MOUNT}`, new script",
                EDIT_FLOOR,
            ),
            floor(False),
        ),
        (
            Row(
                EDIT_SANDBOX_FLOOR, "floor + RGrid's sandbox flags", EDIT_FLOOR, EDIT_SANDBOX_FLOOR
            ),
            floor(True),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run -r` edited script, {mode.label}"
        row = rgrid_row(f"edit-{mode.name}", label, EDIT_FLOOR, EDIT_SANDBOX_FLOOR)
        edited = _new_deps_script(env, mode, "edit", lambda m: env.edit_requirements[m.name], True)
        rows.append((row, edited))
    return rows


def new_set_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 3 (a new requirements set every time), and section 4's bare uv row, timed in
    the same rounds so that they see the same machine."""

    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                NEW_SET_FLOOR,
                "floor: `DOCKER_BUILDKIT=0 docker build` (`RUN pip install -r "
                "requirements.txt`) + `docker run`",
                NEW_SET_FLOOR,
            ),
            lambda: bare_deps_build_and_run(env),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run -r` new requirements, {mode.label}"
        new_set = _new_deps_script(
            env, mode, "new-set", lambda m: new_requirements(env.root, f"new-set-{m.name}"), False
        )
        rows.append((rgrid_row(f"new-set-{mode.name}", label, NEW_SET_FLOOR), new_set))
    rows.append(
        (
            Row(
                UV_FLOOR,
                "floor: `uv venv` + `uv pip install -r` on the host, uv cache warm",
                UV_FLOOR,
            ),
            lambda: bare_uv_install(env, env.embedded_uv_cache),
        )
    )
    return rows


def install_rows(env: Env, new_set: list[Row], first: Row, uv_cold: Row) -> list[Row]:
    """Section 4: RGrid's ``deps_build_s`` from section 3's runs next to section 3's bare uv
    row, with uv's own timings from each run's log; then the cold-cache context rows."""
    by_key = {row.key: row for row in new_set}
    rows = [by_key[UV_FLOOR]]
    for mode in env.modes:
        source = by_key.get(f"new-set-{mode.name}")
        if source is None:
            continue
        key = f"install-{mode.name}"
        row = rgrid_row(key, f"RGrid `deps_build_s`, {mode.label}", UV_FLOOR)
        row.times = [r["deps_build_s"] for r in source.reports]
        row.reports = [{k: v for k, v in r.items() if k.startswith("uv_")} for r in source.reports]
        rows.append(row)
    return [*rows, *(row for row in (uv_cold, first) if row.times)]


def pep723_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 5: the first run of a PEP 723 pandas script (a new set every time, for both)."""
    rows: list[tuple[Row, Measure]] = [
        (
            Row(UV_RUN_FLOOR, "floor: `uv run script.py` on the host, uv cache warm", UV_RUN_FLOOR),
            lambda: bare_uv_run(env),
        ),
    ]
    for mode in env.modes:
        label = f"`rgrid run` PEP 723 script, first run, {mode.label}"
        rows.append(
            (
                rgrid_row(f"pep723-{mode.name}", label, UV_RUN_FLOOR),
                lambda m=mode: cli_run(
                    env, m, pandas_script(env, f"pep723-{m.name}"), script_hit=False, deps_hit=False
                ),
            )
        )
    return rows


def run_rounds(cases: list[tuple[Row, Measure]], repeat: int, title: str) -> None:
    """``repeat`` rounds, each timing every case once; the order rotates by one each round so
    that no row always follows (or precedes) the same other row."""
    for i in range(repeat):
        shift = i % len(cases)
        for row, measure in cases[shift:] + cases[:shift]:
            elapsed, report = measure_with_retries(row, measure)
            row.times.append(elapsed)
            row.reports.append(report)
        print(f"  {title}: round {i + 1}/{repeat} done", file=sys.stderr)


def measure_with_retries(row: Row, measure: Measure) -> Sample:
    """One sample; a failed run is retried (and reported with the table) rather than ending the
    benchmark: on a shared Docker host, someone else's reaper or test can kill a container."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return measure()
        except SetupError:
            raise
        except BenchError as exc:
            row.failures.append(str(exc).strip().splitlines()[-1])
            print(f"  {row.key}: run failed (attempt {attempt}): {exc}", file=sys.stderr)
    raise BenchError(f"{row.label}: {MAX_ATTEMPTS} attempts in a row failed")


# --- the report ------------------------------------------------------------------------------

#: Self-reported timings shown in the last column, in this order: (report key, label).
OWN_TIMINGS = (
    ("docker_build_s", "docker build"),
    ("docker_run_s", "docker run"),
    ("venv_s", "uv venv"),
    ("uv_install_s", "uv pip install"),
    ("uv_resolved_s", "uv: resolved"),
    ("uv_prepared_s", "uv: prepared"),
    ("uv_installed_s", "uv: installed"),
    ("deps_build_s", "deps"),
    ("run_s", "run"),
    ("duration_s", "pipeline"),
    ("compile_after_s", "bytecode compile left after exit"),
)


def _median_of(row: Row, name: str) -> float | None:
    values = [r[name] for r in row.reports if isinstance(r.get(name), int | float)]
    return statistics.median(values) if values else None


def own_timings(row: Row) -> str:
    """What rgrid (or the bare commands) said about itself, how many runs found a warm
    sandbox, and the wall time outside the pipeline: process start, imports, submission,
    polling, the download, exit."""
    parts = []
    for name, label in OWN_TIMINGS:
        value = _median_of(row, name)
        if value is not None:
            parts.append(f"{label} {value:.2f}")
    durations = [r.get("duration_s") for r in row.reports]
    if durations and all(isinstance(d, int | float) for d in durations):
        outside = statistics.median(t - d for t, d in zip(row.times, durations, strict=True))
        parts.append(f"**outside pipeline {outside:.2f}**")
    warm = [r["sandbox_warm"] for r in row.reports if "sandbox_warm" in r]
    if warm:
        parts.append(f"warm sandbox {sum(1 for w in warm if w)}/{len(warm)}")
    if row.failures:
        parts.append(f"⚠ {len(row.failures)} failed run(s) retried")
    return ", ".join(parts)


def failure_notes(rows: list[Row]) -> str:
    """The failed (and retried) runs under the table: a number with a hidden retry is a lie."""
    lines = [f"- {row.label}: {msg}" for row in rows for msg in row.failures]
    return "Failed runs (retried, not timed):\n\n" + "\n".join(lines) if lines else ""


def ratio(row: Row, floor: Row | None) -> str:
    if floor is None or not floor.times or not row.times:
        return ""
    return f"{row.median / floor.median:.2f}×"


def table(sections: list[tuple[str, list[Row]]]) -> str:
    """Markdown: median and min per row, median ÷ floor median (and issue 7's target for it),
    median ÷ the sandboxed floor's median, rgrid's own timings."""
    lines = [
        "| row | median s | min s | ÷ floor | target | ÷ sandboxed floor | own timings, median s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_key = {row.key: row for _, rows in sections for row in rows}
    for title, rows in sections:
        lines.append(f"| **{title}** | | | | | | |")
        for row in rows:
            floor = by_key.get(row.floor) if row.floor else None
            sandbox = by_key.get(row.sandbox_floor) if row.sandbox_floor else None
            lines.append(
                f"| {row.label} | {row.median:.3f} | {row.best:.3f} | {ratio(row, floor)} "
                f"| {row.target} | {ratio(row, sandbox)} | {own_timings(row)} |"
            )
    return "\n".join(lines)


def machine_facts(stack_kind: str) -> list[str]:
    """Enough to tell two result files apart: ratios move with the host, not only the code."""
    now = dt.datetime.now(dt.UTC).astimezone()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    uv_version = output_of([str(UV), "--version"])
    stack = {
        "up": "the one `make up` runs",
        "private": "private (`--stack private`: API + worker of this checkout, fresh database)",
    }[stack_kind]
    return [
        f"- date: {now.isoformat(timespec='seconds')}",
        f"- nproc: {output_of(['nproc'])}",
        f"- docker server: {docker_server_version()}; {uv_version}",
        f"- kernel: {platform.release()}; python (CLI): {platform.python_version()}",
        f"- stack: {stack}",
        f"- load average before the run: {load}",
    ]


def write_results(command: str, facts: list[str], body: str, repeat: int) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(
        "# RGrid benchmark\n\n"
        f"Command: `{command}`\n\n"
        + "\n".join(facts)
        + f"\n- repetitions per row: {repeat} (interleaved rounds)\n\n"
        + body
        + "\n\n"
        + LEGEND
    )


LEGEND = """\
Times are wall seconds of the whole process, from start to exit. Ratios are median ÷ median of \
the row's floor; "target" is issue 7's bound for that ratio. Floors run the same script on the \
same runtime image (`rgrid-runtime:python-3.11`) with the script bind-mounted read-only at \
`/work/script.py` and a writable `/work/outputs`, as in RGrid's sandbox; the edit floor also \
mounts a dependency folder installed once by uv with RGrid's flags (bytecode compiled) at \
`/opt/rgrid/deps`, read-only, on `PYTHONPATH`. Section 3 installs a requirements set never \
seen before (numpy, six and a tiny local package of a new version from a new `--find-links` \
folder) with uv's cache warm for RGrid and for the bare uv row, none for the floor's pip (a \
`docker build` has no cache between builds). Section 5's script names pandas and a new version \
of the tiny package (a URL on a local HTTP server) in its PEP 723 block, so every run, RGrid's \
and `uv run`'s, is the first run of a new set; both use a warm uv cache. After every RGrid run \
that installed a set, the benchmark waits (untimed) for RGrid's background bytecode compile, so \
it lands on no other row. "deps" is rgrid's `deps_build_s` (the one uv install, into a new \
folder); "uv: resolved/prepared/installed" are uv's own figures from the execution's log \
(excluding uv's start-up); "run" is `run_s`, "pipeline" `duration_s` (submission to final \
status); "outside pipeline" is wall time minus that: interpreter start, imports, client setup, \
polling, the download and exit. "warm sandbox k/n": runs that claimed a pre-started sandbox. \
"bytecode compile left after exit": how long RGrid's background compile of the new set still \
ran after the CLI exited (the benchmark's untimed wait; the run itself imported without it). \
On the floors, "docker build"/"docker run" and "uv venv"/"uv pip install" are whole processes.
"""


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument(
        "--stack",
        choices=("up", "private"),
        default="up",
        help="the stack from `make up` (default), or a private one started for this run",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only these sections (repeatable; default: all). new-set includes the "
        "dependency-install section",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    only = set(args.only or SECTIONS)
    command = shlex.join([os.path.relpath(sys.executable, REPO), "bench/run.py", *sys.argv[1:]])
    facts = machine_facts(args.stack)
    first = Row(
        "deps-first",
        "context: RGrid `deps_build_s`, first install on a fresh data dir (uv cache empty), once",
        floor=UV_FLOOR,
    )
    uv_cold = Row(
        "uv-cold",
        "context: `uv venv` + `uv pip install -r`, empty uv cache, once",
        floor=UV_FLOOR,
    )
    sections: list[tuple[str, list[Row]]] = []
    try:
        with bench_env(args.stack) as env:
            print("warming up (stack and embedded default)…", file=sys.stderr)
            warm_up(env)
            if "warm" in only:
                warm = warm_rows(env)
                run_rounds(warm, args.repeat, "warm")
                sections.append(("1. Warm run (all caches hit), no dependencies", rows_of(warm)))
            if "stdin" in only:
                stdin_warm_up(env)
                piped = stdin_rows(env)
                run_rounds(piped, args.repeat, "piped stdin")
                sections.append(
                    ("1b. Warm run with 64 KiB piped to stdin (all caches hit)", rows_of(piped))
                )
            if "reuse" in only:
                reuse = reuse_rows(env)
                run_rounds(reuse, args.repeat, "reused repeat")
                sections.append(
                    ("1c. Identical repeat answered from its outputs (`--reuse`)", rows_of(reuse))
                )
            if only & {"edit", "new-set"}:
                print("warming up with dependencies…", file=sys.stderr)
                edit_warm_up(env, first)
            if "edit" in only:
                edit = edit_rows(env)
                run_rounds(edit, args.repeat, "edit loop")
                sections.append(
                    (
                        "2. One-line edit, dependencies cached (numpy + six; a new script "
                        "every run)",
                        rows_of(edit),
                    )
                )
            if "new-set" in only:
                new_set = new_set_rows(env)
                run_rounds(new_set, args.repeat, "new requirements set")
                cold_cache = env.root / f"uv-cold-cache-{uuid.uuid4().hex[:8]}"
                elapsed, report = measure_with_retries(
                    uv_cold, lambda: bare_uv_install(env, cold_cache)
                )
                uv_cold.times.append(elapsed)
                uv_cold.reports.append(report)
                first.reports = [
                    {k: v for k, v in r.items() if k.startswith("uv_")} for r in first.reports
                ]
                sections += [
                    (
                        "3. New requirements set (numpy + six + a new pad version): whole run",
                        [row for row in rows_of(new_set) if row.key != UV_FLOOR],
                    ),
                    (
                        "4. Dependency install for a new set: RGrid vs bare uv (RGrid rows "
                        "from section 3's runs)",
                        install_rows(env, rows_of(new_set), first, uv_cold),
                    ),
                ]
            if "pep723" in only:
                print("warming up for PEP 723 (pandas)…", file=sys.stderr)
                pep723_warm_up(env)
                pep723 = pep723_rows(env)
                run_rounds(pep723, args.repeat, "PEP 723 first run")
                sections.append(
                    (
                        "5. First run of a pandas script with a PEP 723 block (a new set "
                        "every run, for both)",
                        rows_of(pep723),
                    )
                )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    all_rows = [env.warmup, *(row for _, rows in sections for row in rows)]
    body = "\n\n".join(part for part in (table(sections), failure_notes(all_rows)) if part)
    print(body)
    write_results(command, facts, body, args.repeat)
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO)}", file=sys.stderr)
    return 0


def rows_of(cases: list[tuple[Row, Measure]]) -> list[Row]:
    return [row for row, _ in cases]


if __name__ == "__main__":
    sys.exit(main())
