"""RGrid benchmark: what a run costs through the CLI, next to the bare Docker floor beneath it.

DESIGN.md sets the bar: a warm run costs little more than a bare ``docker run`` of the same image,
and editing one line of a script costs about as much. This measures both, in one invocation, as
ratios against the floor, for scripts without and with dependencies (``-r requirements.txt``),
and RGrid's dependency install next to a bare ``uv pip install``; nothing here passes or fails.
Every measurement is the wall time of a whole process (``time.perf_counter`` around
``subprocess.run``), because that is what a user waits for: interpreter start, imports,
submission, the container, the summary, the download.

Repetitions are interleaved (each round runs every row once, in a rotated order) so that a slow
spell on a shared machine spreads over all rows instead of landing on one.

Run with ``make bench`` or ``.venv/bin/python bench/run.py [--repeat N] [--stack private]``.
Needs the runtime image (``make setup``), the local services and the package index (numpy and
six; pip for the floor's Dockerfile). The stack is the one ``scripts/up.sh`` starts (idempotent),
or with ``--stack private`` an API and a worker of this checkout that the benchmark starts on a
database, Redis database and bucket of their own, and stops at the end. Every image, container
and temporary directory made here (and a private stack's database and bucket) is removed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
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
import time
import urllib.request
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
UP_SCRIPT = REPO / "scripts" / "up.sh"
DEV_ENV_FILE = REPO / "scripts" / "dev.env"
RESULTS_FILE = REPO / "bench" / "results" / "latest.md"

RUNTIME_IMAGE = "rgrid-runtime:python-3.11"
EXEC_REPOSITORY = "rgrid-exec"
DEPS_REPOSITORY = "rgrid-deps"
#: Images the floors build are tagged here, so cleanup can never touch anyone else's.
FLOOR_REPOSITORY = "rgrid-bench-floor"
SCRIPT_PATH = "/app/script.py"

#: The runtime's interpreter, platform and site-packages (rgrid/runtimes.py): the hand-made
#: dependency image below is built for them exactly as RGrid builds its own.
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_36"
SITE_PACKAGES = "/usr/local/lib/python3.11/dist-packages"
#: The host's CA bundle: the package index is reached through a TLS-intercepting proxy, so the
#: floor's ``pip install`` inside a build container needs it too.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: sha256 of no bytes: the dependency hash of a run without requirements.
EMPTY_HASH = hashlib.sha256(b"").hexdigest()

#: The sandbox RGrid applies (rgrid/runner.py), minus the cgroup limits. ``-v /work`` is an
#: anonymous volume (removed with ``--rm``) standing in for RGrid's per-execution volume: with a
#: read-only root the script could not write its output file anywhere else.
SANDBOX_FLAGS = [
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--user",
    "1000:1000",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--network",
    "none",
    "-v",
    "/work",
]

#: The small script: one line on stdout, one file under /work/outputs. It creates the folder
#: itself because the bare floor runs have no RGrid skeleton in /work.
SCRIPT = """\
import os

print("hello from the rgrid benchmark")
os.makedirs("/work/outputs", exist_ok=True)
with open("/work/outputs/result.txt", "w") as fh:
    fh.write("ok\\n")
"""

#: The same with dependencies: it imports numpy and six and uses numpy for its output.
DEPS_SCRIPT = """\
import os

import numpy
import six

print("hello from the rgrid benchmark: numpy", numpy.__version__, "six", six.__version__)
os.makedirs("/work/outputs", exist_ok=True)
with open("/work/outputs/result.txt", "w") as fh:
    fh.write(f"{numpy.arange(10).sum()}\\n")
"""

DOCKERFILE = f"FROM {RUNTIME_IMAGE}\nCOPY script.py {SCRIPT_PATH}\n"

#: A tiny local package, a new version in its own folder for every requirements set (see
#: :func:`new_requirements`).
PAD_PACKAGE = "rgrid-bench-pad"


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed); the numbers would mean nothing."""


class SetupError(BenchError):
    """Retrying cannot help (for example, the stack cannot install dependencies at all)."""


@dataclass
class Row:
    """One line of the table: a way of running the script, timed once per round."""

    key: str
    label: str
    #: The keys of the rows this one is divided by (the ratio columns), if any.
    floor: str | None = None
    sandbox_floor: str | None = None
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


@dataclass
class Env:
    """Everything the rows share: temp folders, the two CLI environments, images to remove."""

    root: Path
    embedded_env: dict[str, str]
    stack_env: dict[str, str]
    stack_kind: str
    #: One warm script per mode, each new to this benchmark run (see :func:`warm_up`).
    warm_embedded: Path = Path()
    warm_stack: Path = Path()
    warm_image: str = ""
    #: One requirements set per mode for the edit loop with dependencies, and what the first
    #: (untimed) run with it built: see :func:`deps_warm_up`.
    edit_req_embedded: Path = Path()
    edit_req_stack: Path = Path()
    deps_warm_image: str = ""
    deps_image: str = ""
    #: pip's wheel, for the floor's Dockerfile (the runtime image has no pip).
    pip_wheel: Path = Path()
    #: The untimed warm-up runs, kept only for their failures (reported with the table).
    warmup: Row = field(default_factory=lambda: Row("warm-up", "warm-up (untimed)"))
    preexisting_tags: set[str] = field(default_factory=set)
    made_exec_images: set[str] = field(default_factory=set)
    made_deps_images: set[str] = field(default_factory=set)
    made_floor_images: set[str] = field(default_factory=set)

    @property
    def embedded_uv_cache(self) -> Path:
        """Where the embedded default keeps uv's cache (rgrid/config.py: data dir/uv-cache)."""
        return Path(self.embedded_env["RGRID_DATA_DIR"]) / "uv-cache"


# --- processes ------------------------------------------------------------------------------


def timed(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion and return (seconds, completed process). Output is captured
    rather than shown, so terminal speed is not part of the measurement."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
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


def image_tags(repository: str) -> set[str]:
    """Every image of ``repository`` present now, so cleanup removes only the ones this run
    made."""
    out = output_of(["docker", "images", repository, "--format", "{{.Repository}}:{{.Tag}}"])
    return set(out.split())


# --- environments ---------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The caller's environment without RGRID_*: each row states its own configuration, so a
    stray RGRID_API_URL in the shell cannot turn the embedded row into a stack row."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RGRID_")}


def stack_exports() -> dict[str, str]:
    """Start (or find running) the stack and read the ``export NAME=value`` lines it prints."""
    proc = subprocess.run([str(UP_SCRIPT)], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"scripts/up.sh failed:\n{proc.stderr.strip()}")
    exports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line.removeprefix("export ").partition("=")
            exports[name.strip()] = value.strip().strip("'\"")
    if "RGRID_API_URL" not in exports:
        raise BenchError(f"scripts/up.sh printed no RGRID_API_URL:\n{proc.stdout}")
    return exports


def dev_env() -> dict[str, str]:
    """The local services' addresses (scripts/dev.env, the file scripts/up.sh sources)."""
    values = {}
    for line in DEV_ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _claim_redis_db(base_url: str) -> int:
    """An empty Redis database (2-15; 0 is the up.sh stack's, 1 the tests'), marked as taken."""
    import redis

    for number in range(15, 1, -1):
        client = redis.Redis.from_url(f"{base_url}/{number}")
        if client.dbsize() == 0 and client.set("rgrid-bench:claimed", "1", nx=True):
            return number
    raise SetupError("no empty Redis database (2-15) for a private stack")


def _wait_healthy(url: str, logs: Path) -> None:
    for _ in range(150):
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    tail = "\n".join((logs / "api.log").read_text().splitlines()[-15:])
    raise SetupError(f"the private stack's API did not start:\n{tail}")


@contextmanager
def private_stack(root: Path) -> Iterator[dict[str, str]]:
    """An API (gunicorn) and a Celery worker of this checkout, as scripts/up.sh starts them but
    on a new database (migrated here), an empty Redis database and a new bucket, so that they
    share nothing with the running stack or the tests. All of it is removed on the way out."""
    import boto3
    from sqlalchemy import create_engine, text

    dev = dev_env()
    token = uuid.uuid4().hex[:8]
    base_db = dev["RGRID_DATABASE_URL"]
    db_name = f"rgrid_bench_{token}"
    db_url = base_db.rsplit("/", 1)[0] + "/" + db_name
    redis_base = dev["RGRID_REDIS_URL"].rsplit("/", 1)[0]
    bucket = f"rgrid-bench-{token}"
    logs = root / "stack-logs"
    logs.mkdir()
    admin = create_engine(base_db, isolation_level="AUTOCOMMIT")
    processes: list[subprocess.Popen] = []
    redis_db: int | None = None
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        redis_db = _claim_redis_db(redis_base)
        server_env = {
            **clean_environ(),
            **dev,
            "RGRID_DATABASE_URL": db_url,
            "RGRID_REDIS_URL": f"{redis_base}/{redis_db}",
            "RGRID_S3_BUCKET": bucket,
            "RGRID_DATA_DIR": str(root / "stack-data"),
        }
        migrate = [str(BIN / "python"), "-c", "import sys, rgrid.db; rgrid.db.upgrade(sys.argv[1])"]
        timed([*migrate, db_url], env=server_env, cwd=REPO)
        port = free_port()
        commands = {
            "api": [
                str(BIN / "gunicorn"),
                *("--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"),
                "rgrid.api:create_app()",
            ],
            "worker": [
                str(BIN / "celery"),
                *("-A", "workers.celery_app", "worker", "--loglevel", "INFO"),
                *("--concurrency", "2", "--hostname", f"rgrid-bench-{token}@%h"),
            ],
        }
        for name, command in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=server_env,
                        cwd=REPO,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, logs)
        account = output_of(
            [str(RGRID), "admin", "create-account", f"bench-{token}", "--with-key", "--json"],
            env=server_env,
        )
        yield {"RGRID_API_URL": url, "RGRID_API_KEY": json.loads(account)["api_key"]}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        finally:
            admin.dispose()
        if redis_db is not None:
            import redis

            redis.Redis.from_url(f"{redis_base}/{redis_db}").flushdb()
        _remove_bucket(boto3, dev, bucket)


def _remove_bucket(boto3, dev: dict[str, str], bucket: str) -> None:
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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def bench_env(stack_kind: str) -> Iterator[Env]:
    """Temp folders and CLI environments; on the way out, every image and folder made here."""
    root = Path(tempfile.mkdtemp(prefix="rgrid-bench-"))
    env = Env(
        root=root,
        embedded_env={**clean_environ(), "RGRID_DATA_DIR": str(root / "embedded-data")},
        stack_env={},
        stack_kind=stack_kind,
    )
    try:
        with ExitStack() as stack:
            (root / "cwd").mkdir()  # the CLI writes ./rgrid-outputs/<id>/ under its cwd
            env.warm_embedded = unique_script(root, "warm-embedded")
            env.warm_stack = unique_script(root, "warm-stack")
            env.edit_req_embedded = new_requirements(root, "edit-embedded")
            env.edit_req_stack = new_requirements(root, "edit-stack")
            env.preexisting_tags = image_tags(EXEC_REPOSITORY) | image_tags(DEPS_REPOSITORY)
            env.pip_wheel = download_pip(root)
            if stack_kind == "private":
                exports = stack.enter_context(private_stack(root))
            else:
                exports = stack_exports()
            env.stack_env = {**clean_environ(), **exports}
            yield env
    finally:
        remove_images(env)
        shutil.rmtree(root, ignore_errors=True)


def remove_images(env: Env) -> None:
    """Floor images are always ours. An rgrid-exec or rgrid-deps image is removed only if it
    appeared during this run; rgrid-runtime is never touched. Images built on a dependency
    image go first: Docker keeps a parent while a child uses it."""
    made = {
        ref
        for ref in env.made_exec_images | env.made_deps_images
        if ref.startswith((f"{EXEC_REPOSITORY}:", f"{DEPS_REPOSITORY}:"))
    } - env.preexisting_tags
    children = sorted({r for r in made if r.startswith(EXEC_REPOSITORY)} | env.made_floor_images)
    parents = sorted(r for r in made if r.startswith(DEPS_REPOSITORY))
    for refs in (children, parents):
        if not refs:
            continue
        proc = subprocess.run(["docker", "rmi", *refs], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"cleanup: docker rmi: {proc.stderr.strip()}", file=sys.stderr)
    print(
        f"cleanup: removed {len(children) + len(parents)} image(s) made by this run",
        file=sys.stderr,
    )


def download_pip(root: Path) -> Path:
    """pip's wheel, once per benchmark run (untimed): the runtime image has no pip, and the
    floor's Dockerfile runs pip straight from the wheel."""
    folder = root / "pip"
    pip = [str(BIN / "pip"), "download", "pip", "--no-deps", "--quiet", "-d", str(folder)]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False)
    raise_for_exit(pip, proc)
    return next(folder.glob("pip-*.whl"))


# --- the things being measured ---------------------------------------------------------------

#: A measurement: wall seconds and whatever timings the measured thing reported about itself.
Sample = tuple[float, dict]


def unique_script(root: Path, tag: str, body: str = SCRIPT) -> Path:
    """The small script plus one comment line nobody has hashed before: the edit loop's one
    changed line, and a guaranteed script-cache miss."""
    folder = root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(f"{body}# bench {uuid.uuid4().hex}\n")
    return path


def new_requirements(root: Path, tag: str) -> Path:
    """A requirements set nobody has installed before: numpy and six, plus a tiny package of a
    new version from a new ``--find-links`` folder.

    The folder alone would make a new dependency key (options are part of it) but the same
    installed files, and Docker's layer cache would then skip the dependency image's COPY: a
    miss for RGrid, a hit for Docker. The new version makes the installed files, hence the
    layer, new as well, so every step of the cold path runs, while numpy stays the bulk."""
    folder = root / f"req-{tag}-{uuid.uuid4().hex[:12]}"
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    pad_wheel(wheels, f"1.{int(uuid.uuid4().hex[:8], 16)}")
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


def cli_run(
    env: Env,
    script: Path,
    cli_env: dict[str, str],
    expect_hit: bool | None,
    requirements: Path | None = None,
    expect_deps_hit: bool | None = None,
) -> Sample:
    """One ``rgrid run --json``: wall time of the whole process and the JSON it printed. A run
    that fails, or hits a cache when it should miss (or the reverse), is not a sample: its
    time would measure something else. The images are recorded first, failed or not, so that
    cleanup still finds them."""
    cmd = [str(RGRID), "run", str(script), "--json"]
    if requirements is not None:
        cmd += ["-r", str(requirements)]
    elapsed, proc = timed(cmd, env=cli_env, cwd=env.root / "cwd", check=False)
    report = last_json_line(proc.stdout)
    env.made_exec_images.add(report.get("image_ref") or "")
    env.made_deps_images.add(report.get("dependency_image") or "")
    raise_for_exit(cmd, proc)
    if report.get("status") != "succeeded" or not report.get("outputs_dir"):
        raise BenchError(f"rgrid run did not succeed with an output: {report}")
    if expect_hit is not None and bool(report.get("script_cache_hit")) != expect_hit:
        raise BenchError(f"expected a script cache {'hit' if expect_hit else 'miss'}: {report}")
    if requirements is None:
        return elapsed, report
    if "deps_build_s" not in report or report.get("dependency_hash") in (None, EMPTY_HASH):
        raise SetupError(
            "the requirements were ignored: this RGrid (the stack's API or worker?) predates "
            "dependency support. Restart the stack (`make down && make up`) or run the "
            f"benchmark with --stack private. Report: {report}"
        )
    if expect_deps_hit is not None:
        if bool(report.get("dependency_cache_hit")) != expect_deps_hit:
            raise BenchError(
                f"expected a dependency cache {'hit' if expect_deps_hit else 'miss'}: {report}"
            )
        if not expect_deps_hit and report.get("deps_build_s") is None:
            raise BenchError(f"a dependency cache miss that installed nothing: {report}")
    return elapsed, {**report, **uv_phases(proc.stderr, report.get("deps_build_s"))}


#: The parts of RGrid's dependency work that :func:`uv_phases` tells apart.
PHASES = ("resolve_s", "install_s", "image_s")

#: uv's own summary lines: "Resolved 3 packages in 162ms", "Installed 3 packages in 1.02s".
_UV_TIMING = re.compile(
    r"\b(?:Resolved|Prepared|Installed|Uninstalled) \d+ packages? in ([\d.]+)(ms|s)\b"
)


def uv_phases(log: str, deps_build_s: float | None) -> dict[str, float]:
    """Split RGrid's dependency work using the log it streams: uv's own timings under the
    pipeline's "resolving dependencies" and "installing N packages" notes, and the dependency
    image build as the rest of ``deps_build_s`` (which starts after the resolve)."""
    phase, spent = None, {"resolve_s": 0.0, "install_s": 0.0}
    for line in log.splitlines():
        if "resolving dependencies" in line:
            phase = "resolve_s"
        elif re.search(r"installing \d+ packages", line):
            phase = "install_s"
        elif "building dependency image" in line:
            phase = None
        match = _UV_TIMING.search(line)
        if phase and match:
            spent[phase] += float(match[1]) / (1000 if match[2] == "ms" else 1)
    found = {name: value for name, value in spent.items() if value > 0}
    if deps_build_s is not None and "install_s" in found:
        found["image_s"] = max(deps_build_s - found["install_s"], 0.0)
    return found


def last_json_line(stdout: str) -> dict:
    """``--json`` prints one object as the last line of stdout; {} if there is none (a crash)."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def bare_run(image: str, sandboxed: bool) -> Sample:
    """The floor: the same image and command through the docker CLI, nothing around it."""
    flags = SANDBOX_FLAGS if sandboxed else ["--network", "none"]
    elapsed, _ = timed(["docker", "run", "--rm", *flags, image, "python3", SCRIPT_PATH])
    return elapsed, {}


def cli_start() -> Sample:
    """Diagnostic: ``rgrid --version`` does no work at all, so its time is the CLI's fixed cost
    (interpreter start and imports), which every ``rgrid run`` pays before submitting."""
    elapsed, _ = timed([str(RGRID), "--version"])
    return elapsed, {}


def bare_build(env: Env, context: Path) -> tuple[float, str]:
    """``docker build`` of ``context`` on the classic builder, as RGrid builds. The tag is
    recorded before the build so that even a half-finished build gets cleaned up."""
    tag = f"{FLOOR_REPOSITORY}:{uuid.uuid4().hex[:12]}"
    env.made_floor_images.add(tag)
    build = ["docker", "build", "-q", "--force-rm", "-t", tag, str(context)]
    build_s, _ = timed(build, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return build_s, tag


def bare_build_and_run(env: Env, base: str = RUNTIME_IMAGE, body: str = SCRIPT) -> Sample:
    """The cold floor: a one-line COPY Dockerfile on ``base``, then one run."""
    script = unique_script(env.root, "floor", body)
    (script.parent / "Dockerfile").write_text(f"FROM {base}\nCOPY script.py {SCRIPT_PATH}\n")
    build_s, tag = bare_build(env, script.parent)
    run_s, _ = bare_run(tag, sandboxed=False)
    return build_s + run_s, {"build_s": build_s, "run_s": run_s}


def bare_deps_build_and_run(env: Env) -> Sample:
    """The cold floor with dependencies: what one would write without RGrid, a Dockerfile that
    pip-installs the same requirements.txt (a new set, as for RGrid) and copies the script, on
    the classic builder, then one run. The CA bundle and pip's wheel are the same bytes every
    time, so their layers come from Docker's cache after the first build; the requirements
    layer is new every time, and with it everything after."""
    requirements = new_requirements(env.root, "floor")
    context = requirements.parent
    wheels = context / "wheels"
    shutil.copy(CA_BUNDLE, context / "ca.crt")
    shutil.copy(env.pip_wheel, context / env.pip_wheel.name)
    shutil.copy(unique_script(env.root, "floor-deps", DEPS_SCRIPT), context / "script.py")
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
        "USER 1000:1000\n"
        f"COPY script.py {SCRIPT_PATH}\n"
    )
    build_s, tag = bare_build(env, context)
    run_s, _ = bare_run(tag, sandboxed=False)
    return build_s + run_s, {"build_s": build_s, "run_s": run_s}


def uv_env(cache_dir: Path) -> dict[str, str]:
    return {**clean_environ(), "UV_CACHE_DIR": str(cache_dir), "NO_COLOR": "1"}


def bare_uv_install(env: Env, cache_dir: Path) -> Sample:
    """The install floor: ``uv venv`` + ``uv pip install -r`` of a new requirements set on the
    host (resolve and install; uv's default link mode), with the given uv cache."""
    requirements = new_requirements(env.root, "uv")
    folder, venv = requirements.parent, requirements.parent / "venv"
    uv = uv_env(cache_dir)
    venv_s, _ = timed([str(UV), "venv", "--python", PYTHON_VERSION, str(venv)], env=uv, cwd=folder)
    install = [str(UV), "pip", "install", "--python", str(venv / "bin" / "python")]
    install_s, _ = timed([*install, "-r", str(requirements)], env=uv, cwd=folder)
    return venv_s + install_s, {"venv_s": venv_s, "install_s": install_s}


def steps_by_hand(env: Env) -> Sample:
    """Diagnostic: RGrid's three dependency steps as bare commands with its arguments
    (rgrid/dependencies.py, rgrid/builder.py) and the embedded default's warm uv cache:
    ``uv pip compile``, ``uv pip install --target``, ``docker build`` of one COPY layer."""
    requirements = new_requirements(env.root, "hand")
    folder = requirements.parent
    uv = uv_env(env.embedded_uv_cache)
    target = ["--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM]
    target += ["--only-binary", ":all:"]
    compile_ = [str(UV), "pip", "compile", str(requirements), "--no-header", "--no-annotate"]
    resolve_s, proc = timed([*compile_, *target], env=uv, cwd=folder)
    pinned = [line.strip() for line in proc.stdout.splitlines()]
    pinned = [line for line in pinned if line and not line.startswith(("#", "-"))]
    options = [line for line in requirements.read_text().splitlines() if line.startswith("-")]
    (folder / "pinned.txt").write_text("\n".join([*options, *pinned]) + "\n")
    context = folder / "image"
    install = [str(UV), "pip", "install", "--target", str(context / "deps"), "--no-deps"]
    install += ["--link-mode", "copy", "--no-compile", *target, "-r", str(folder / "pinned.txt")]
    install_s, _ = timed(install, env=uv, cwd=folder)
    (context / "deps" / ".lock").unlink(missing_ok=True)  # RGrid leaves uv's lock file out
    (context / "Dockerfile").write_text(f"FROM {RUNTIME_IMAGE}\nCOPY deps/ {SITE_PACKAGES}/\n")
    image_s, _ = bare_build(env, context)
    return resolve_s + install_s + image_s, {
        "resolve_s": resolve_s,
        "install_s": install_s,
        "image_s": image_s,
    }


def warm_up(env: Env) -> None:
    """One untimed pass over the warm rows (a build for each CLI row), so that every timed warm
    run is a cache hit on an engine with the image's layers in the page cache.

    Each mode gets its own script, new to this run: the embedded account and the stack's account
    can have the same id, hence the same image tag for the same script, and a second build would
    leave the first image dangling where cleanup cannot see it. A new script also means every
    rgrid-exec image this run reports is one it made, and can remove."""
    row = env.warmup
    _, report = measure_with_retries(
        row, lambda: cli_run(env, env.warm_embedded, env.embedded_env, expect_hit=None)
    )
    env.warm_image = report["image_ref"]
    _, report = measure_with_retries(
        row, lambda: cli_run(env, env.warm_stack, env.stack_env, expect_hit=None)
    )
    if "deps_build_s" not in report:
        raise SetupError(
            "the stack predates dependency support (its executions have no deps_build_s): "
            "restart it (`make down && make up`) or run the benchmark with --stack private"
        )
    measure_with_retries(row, lambda: bare_run(env.warm_image, sandboxed=False))
    measure_with_retries(row, lambda: bare_run(env.warm_image, sandboxed=True))


def deps_warm_up(env: Env, first: Row) -> None:
    """Untimed: per mode, the edit loop's requirements set is installed (the embedded one on a
    fresh data dir, so uv's cache is cold: kept in ``first`` as context) and one edited script
    runs on it, so the timed edit loop only ever hits the dependency cache. This also fills each
    mode's uv cache, so that the timed cold runs find numpy's wheel there, as on any host that
    has installed it once."""
    row = env.warmup

    def deps_run(cli_env: dict[str, str], requirements: Path, hit: bool | None) -> Measure:
        script = unique_script(env.root, "deps-warm", DEPS_SCRIPT)
        return lambda: cli_run(env, script, cli_env, None, requirements, expect_deps_hit=hit)

    elapsed, report = measure_with_retries(
        row, deps_run(env.embedded_env, env.edit_req_embedded, False)
    )
    first.times.append(report["deps_build_s"])
    first.reports.append({k: report[k] for k in PHASES if k in report})
    env.deps_warm_image = report["image_ref"]
    env.deps_image = report["dependency_image"]
    measure_with_retries(row, deps_run(env.stack_env, env.edit_req_stack, None))
    measure_with_retries(row, deps_run(env.embedded_env, env.edit_req_embedded, True))
    measure_with_retries(row, deps_run(env.stack_env, env.edit_req_stack, True))
    measure_with_retries(row, lambda: bare_run(env.deps_warm_image, sandboxed=False))
    if not env.embedded_uv_cache.is_dir():
        raise SetupError(f"the embedded default's uv cache is not at {env.embedded_uv_cache}")


# --- rows and rounds -------------------------------------------------------------------------

Measure = Callable[[], Sample]

#: Attempts per sample before the benchmark gives up (see :func:`measure_with_retries`).
MAX_ATTEMPTS = 3

FLOOR = "floor"
SANDBOX_FLOOR = "sandbox-floor"
COLD_FLOOR = "cold-floor"
DEPS_COLD_FLOOR = "deps-cold-floor"
EDIT_FLOOR = "deps-edit-floor"
UV_FLOOR = "uv-floor"


def warm_rows(env: Env) -> list[tuple[Row, Measure]]:
    image = env.warm_image

    def row(key: str, label: str) -> Row:
        return Row(key, label, floor=FLOOR, sandbox_floor=SANDBOX_FLOOR)

    return [
        (
            row(FLOOR, "floor: `docker run --rm --network none` IMAGE"),
            lambda: bare_run(image, sandboxed=False),
        ),
        (
            row(SANDBOX_FLOOR, "floor: `docker run --rm` + RGrid's sandbox flags"),
            lambda: bare_run(image, sandboxed=True),
        ),
        (
            row("warm-embedded", "`rgrid run`, embedded default"),
            lambda: cli_run(env, env.warm_embedded, env.embedded_env, expect_hit=True),
        ),
        (
            row("warm-stack", "`rgrid run`, against the stack"),
            lambda: cli_run(env, env.warm_stack, env.stack_env, expect_hit=True),
        ),
        (row("cli-start", "diagnostic: `rgrid --version` (CLI start-up only)"), cli_start),
    ]


def cold_rows(env: Env) -> list[tuple[Row, Measure]]:
    def cold(cli_env: dict[str, str], tag: str) -> Measure:
        return lambda: cli_run(env, unique_script(env.root, tag), cli_env, expect_hit=False)

    return [
        (
            Row(
                COLD_FLOOR,
                "floor: `DOCKER_BUILDKIT=0 docker build` + `docker run --rm`",
                floor=COLD_FLOOR,
            ),
            lambda: bare_build_and_run(env),
        ),
        (
            Row("cold-embedded", "`rgrid run` new script, embedded default", floor=COLD_FLOOR),
            cold(env.embedded_env, "emb"),
        ),
        (
            Row("cold-stack", "`rgrid run` new script, against the stack", floor=COLD_FLOOR),
            cold(env.stack_env, "stack"),
        ),
    ]


def deps_cold_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 4 (a new requirements set every time), and section 6's two bare rows, timed in
    the same rounds so that they see the same machine."""

    def cold(cli_env: dict[str, str], tag: str) -> Measure:
        def measure() -> Sample:
            script = unique_script(env.root, tag, DEPS_SCRIPT)
            requirements = new_requirements(env.root, tag)
            return cli_run(env, script, cli_env, False, requirements, expect_deps_hit=False)

        return measure

    return [
        (
            Row(
                DEPS_COLD_FLOOR,
                "floor: `docker build` (`RUN pip install -r requirements.txt`) + `docker run`",
                floor=DEPS_COLD_FLOOR,
            ),
            lambda: bare_deps_build_and_run(env),
        ),
        (
            Row(
                "deps-cold-embedded",
                "`rgrid run -r` new requirements, embedded default",
                floor=DEPS_COLD_FLOOR,
            ),
            cold(env.embedded_env, "deps-emb"),
        ),
        (
            Row(
                "deps-cold-stack",
                "`rgrid run -r` new requirements, against the stack",
                floor=DEPS_COLD_FLOOR,
            ),
            cold(env.stack_env, "deps-stack"),
        ),
        (
            Row(
                UV_FLOOR,
                "floor: `uv venv` + `uv pip install -r` on the host, uv cache warm",
                floor=UV_FLOOR,
            ),
            lambda: bare_uv_install(env, env.embedded_uv_cache),
        ),
        (
            Row(
                "deps-by-hand",
                "diagnostic: RGrid's steps by hand: `uv pip compile` + "
                "`uv pip install --target` + `docker build` (COPY)",
                floor=UV_FLOOR,
            ),
            lambda: steps_by_hand(env),
        ),
    ]


def edit_rows(env: Env) -> list[tuple[Row, Measure]]:
    def edit(cli_env: dict[str, str], requirements: Path, tag: str) -> Measure:
        def measure() -> Sample:
            script = unique_script(env.root, tag, DEPS_SCRIPT)
            return cli_run(env, script, cli_env, False, requirements, expect_deps_hit=True)

        return measure

    return [
        (
            Row(
                EDIT_FLOOR,
                "floor: `docker run --rm --network none` IMAGE (with numpy)",
                floor=EDIT_FLOOR,
            ),
            lambda: bare_run(env.deps_warm_image, sandboxed=False),
        ),
        (
            Row(
                "deps-edit-floor-build",
                "floor + build: `docker build` (COPY script onto the rgrid-deps image) + run",
                floor=EDIT_FLOOR,
            ),
            lambda: bare_build_and_run(env, base=env.deps_image, body=DEPS_SCRIPT),
        ),
        (
            Row(
                "deps-edit-embedded",
                "`rgrid run -r` edited script, embedded default",
                floor=EDIT_FLOOR,
            ),
            edit(env.embedded_env, env.edit_req_embedded, "edit-emb"),
        ),
        (
            Row(
                "deps-edit-stack",
                "`rgrid run -r` edited script, against the stack",
                floor=EDIT_FLOOR,
            ),
            edit(env.stack_env, env.edit_req_stack, "edit-stack"),
        ),
    ]


def install_rows(deps_cold: list[Row], first: Row, uv_cold: Row) -> list[Row]:
    """Section 6: RGrid's ``deps_build_s`` (install + dependency image) from section 4's runs,
    next to section 4's bare uv rows, with the log-derived split of each run's time."""
    by_key = {row.key: row for row in deps_cold}
    rows = [by_key[UV_FLOOR]]
    for mode, label in (("embedded", "embedded default"), ("stack", "against the stack")):
        source = by_key[f"deps-cold-{mode}"]
        rows.append(
            Row(
                f"deps-install-{mode}",
                f"RGrid `deps_build_s` (install + dependency image), {label}",
                floor=UV_FLOOR,
                times=[r["deps_build_s"] for r in source.reports],
                reports=[{k: r[k] for k in PHASES if k in r} for r in source.reports],
            )
        )
    return [*rows, by_key["deps-by-hand"], uv_cold, first]


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
    ("resolve_s", "resolve"),
    ("install_s", "install"),
    ("image_s", "dep image"),
    ("venv_s", "venv"),
    ("deps_build_s", "deps"),
    ("build_s", "build"),
    ("run_s", "run"),
    ("duration_s", "pipeline"),
)


def _median_of(row: Row, name: str) -> float | None:
    values = [r[name] for r in row.reports if isinstance(r.get(name), int | float)]
    return statistics.median(values) if values else None


def own_timings(row: Row) -> str:
    """What rgrid (or the bare build) said about itself, and the wall time outside the
    pipeline: process start, imports, submission, polling, the download, exit."""
    parts = []
    for name, label in OWN_TIMINGS:
        value = _median_of(row, name)
        if value is not None:
            parts.append(f"{label} {value:.2f}")
    durations = [r.get("duration_s") for r in row.reports]
    if durations and all(isinstance(d, int | float) for d in durations):
        outside = statistics.median(t - d for t, d in zip(row.times, durations, strict=True))
        parts.append(f"**outside pipeline {outside:.2f}**")
    if row.failures:
        parts.append(f"⚠ {len(row.failures)} failed run(s) retried")
    return ", ".join(parts)


def failure_notes(rows: list[Row]) -> str:
    """The failed (and retried) runs under the table: a number with a hidden retry is a lie."""
    lines = [f"- {row.label}: {msg}" for row in rows for msg in row.failures]
    return "Failed runs (retried, not timed):\n\n" + "\n".join(lines) if lines else ""


def ratio(row: Row, floor: Row | None) -> str:
    return f"{row.median / floor.median:.2f}×" if floor else ""


def table(sections: list[tuple[str, list[Row]]]) -> str:
    """Markdown: median and min per row, median ÷ floor median, rgrid's own timings."""
    lines = [
        "| row | median s | min s | ÷ floor | ÷ sandboxed floor | own timings, median s |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    by_key = {row.key: row for _, rows in sections for row in rows}
    for title, rows in sections:
        lines.append(f"| **{title}** | | | | | |")
        for row in rows:
            floor = by_key.get(row.floor) if row.floor else None
            sandbox = by_key.get(row.sandbox_floor) if row.sandbox_floor else None
            lines.append(
                f"| {row.label} | {row.median:.3f} | {row.best:.3f} | {ratio(row, floor)} "
                f"| {ratio(row, sandbox)} | {own_timings(row)} |"
            )
    return "\n".join(lines)


def machine_facts(stack_kind: str) -> list[str]:
    """Enough to tell two result files apart: ratios move with the host, not only the code."""
    now = dt.datetime.now(dt.UTC).astimezone()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    uv_version = output_of([str(UV), "--version"])
    stack = {
        "up": "the one `scripts/up.sh` runs",
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
the row's floor (warm rows: the bare run; cold rows: the bare build + run; section 5: the bare \
run of an image with numpy; section 6: the bare `uv venv` + `uv pip install`). Cold rows run a \
script that was never seen before (one unique comment line): that is also the edit loop, \
one changed line, since these scripts have no dependencies. Section 4 installs a requirements \
set never seen before (numpy, six and a tiny local package of a new version from a new \
`--find-links` folder), with the wheel caches warm: uv's for RGrid, none for the floor's pip \
(a `docker build` has no cache between builds). "pipeline" is rgrid's own `duration_s` \
(submission to final status); "outside pipeline" is wall time minus that: interpreter start, \
imports, client setup, polling, the download and exit. "deps" is rgrid's `deps_build_s`; it \
starts after the resolve. "resolve" and "install" on RGrid rows are uv's own timings from the \
streamed log ("Resolved/Prepared/Installed N packages in …", excluding uv's start-up); \
"dep image" there is `deps_build_s` minus "install", so it includes uv's start-up and the tar; \
on the by-hand row all three are whole processes.
"""


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument(
        "--stack",
        choices=("up", "private"),
        default="up",
        help="the stack from scripts/up.sh (default), or a private one started for this run",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable, REPO), "bench/run.py", *sys.argv[1:]])
    facts = machine_facts(args.stack)
    first = Row(
        "deps-first",
        "context: RGrid `deps_build_s`, first run on a fresh data dir (uv cache cold), once",
        floor=UV_FLOOR,
    )
    uv_cold = Row(
        "uv-cold",
        "context: `uv venv` + `uv pip install -r`, empty uv cache, once",
        floor=UV_FLOOR,
    )
    try:
        with bench_env(args.stack) as env:
            print("warming up (embedded default and stack)…", file=sys.stderr)
            warm_up(env)
            warm = warm_rows(env)
            run_rounds(warm, args.repeat, "warm")
            cold = cold_rows(env)
            run_rounds(cold, args.repeat, "cold")
            print("warming up with dependencies…", file=sys.stderr)
            deps_warm_up(env, first)
            deps_cold = deps_cold_rows(env)
            run_rounds(deps_cold, args.repeat, "cold with dependencies")
            edit = edit_rows(env)
            run_rounds(edit, args.repeat, "edit loop with dependencies")
            cold_cache = env.root / f"uv-cold-cache-{uuid.uuid4().hex[:8]}"
            elapsed, report = measure_with_retries(
                uv_cold, lambda: bare_uv_install(env, cold_cache)
            )
            uv_cold.times.append(elapsed)
            uv_cold.reports.append(report)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    cold_deps_rows = [row for row, _ in deps_cold]
    sections = [
        ("1. Warm run (script cache hit)", [row for row, _ in warm]),
        (
            "2. Cold run (new script → build) = 3. Edit loop (one changed line), no dependencies",
            [row for row, _ in cold],
        ),
        (
            "4. Cold run with dependencies (new requirements set: resolve, install, "
            "dependency image, script layer)",
            [row for row in cold_deps_rows if row.key.startswith("deps-cold")],
        ),
        (
            "5. Edit loop with dependencies (dependency cache hit, one changed line)",
            [row for row, _ in edit],
        ),
        (
            "6. Dependency install: RGrid vs bare uv (RGrid rows from section 4's runs)",
            install_rows(cold_deps_rows, first, uv_cold),
        ),
    ]
    all_rows = [env.warmup, *(row for _, rows in sections for row in rows)]
    body = "\n\n".join(part for part in (table(sections), failure_notes(all_rows)) if part)
    print(body)
    write_results(command, facts, body, args.repeat)
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
