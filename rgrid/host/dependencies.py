"""Resolving and installing a requirements set with uv, on the worker host.

The install happens on the host, into a folder that sandboxes then mount read-only: no
container needs network (the Docker host may have none), and uv's cache on the host is shared
by every set that takes its packages from the host's default index, so each public wheel is
downloaded once per host; a set naming sources of its own gets its account's own cache
(``rgrid/host/indexes.py`` says why). Wheels are chosen for the runtime's
interpreter and platform (``--only-binary :all:``), not the host's, so a package with no
wheel for it fails clearly instead of being built for the wrong platform.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from packaging.utils import canonicalize_name

from rgrid.core.config import Settings
from rgrid.core.errors import BuildError
from rgrid.core.hashing import sha256_bytes
from rgrid.host import indexes
from rgrid.host.runtimes import RuntimeSpec

# pip setting -> the uv environment variable that means the same.
_PIP_TO_UV = {
    "index-url": "UV_DEFAULT_INDEX",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "trusted-host": "UV_INSECURE_HOST",
    "cert": "SSL_CERT_FILE",
    "default-timeout": "UV_HTTP_TIMEOUT",
    "timeout": "UV_HTTP_TIMEOUT",
}


def uv_binary() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def pip_settings() -> dict[str, str]:
    """pip's effective settings, read where pip reads them: its config files (global, user,
    site, then ``PIP_CONFIG_FILE``; ``[global]`` then ``[install]``), then ``PIP_*`` variables.
    Read directly rather than through ``pip config list``, which costs ~0.2 s of interpreter
    start in every process that installs (the embedded default is one per run)."""
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs if d]
    files += [
        Path("/etc/pip.conf"),
        Path.home() / ".pip" / "pip.conf",
        Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "pip" / "pip.conf",
        Path(sys.prefix) / "pip.conf",
    ]
    if os.environ.get("PIP_CONFIG_FILE") and os.environ["PIP_CONFIG_FILE"] != os.devnull:
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    parser = configparser.RawConfigParser()
    parser.read([f for f in files if f.is_file()], encoding="utf-8")
    settings: dict[str, str] = {}
    for section in ("global", "install"):
        if parser.has_section(section):
            settings.update(parser.items(section))
    for key, value in os.environ.items():
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            settings[key[4:].lower().replace("_", "-")] = value
    return settings


@lru_cache(maxsize=1)
def uv_environment() -> dict[str, str]:
    """uv does not read pip's configuration: translate the host's so uv reaches the same index
    with the same certificates. No index host is named in this code; explicit UV_* variables
    win."""
    env: dict[str, str] = {}
    for setting, value in pip_settings().items():
        value = value.strip().strip("'\"")
        target = _PIP_TO_UV.get(setting)
        if not target or not value or target in os.environ:
            continue
        if setting == "find-links":
            value = " ".join(v for v in value.split() if "://" in v or Path(v).exists())
            if not value:
                continue
        env[target] = value
    return env


def default_index() -> str:
    return indexes.default_index_url(uv_environment())


def check_sources(settings: Settings, requirements: str) -> None:
    """Refuse (BadInput) a set naming a package source the operator does not allow."""
    indexes.check_sources(requirements, settings.allowed_indexes, default_index())


def uv_cache_for(settings: Settings, account_id: int, requirements: str, *, embedded: bool) -> Path:
    """The shared cache for sets drawn from the host's default index alone; the account's own
    for any other (the embedded default has one user: always the shared one)."""
    if embedded or not indexes.uses_own_sources(requirements, default_index()):
        return settings.uv_cache_dir
    return settings.account_uv_cache_dir(account_id)


def _run_uv(
    args: list[str],
    cache_dir: Path,
    log: Callable[[str], None],
    deadline_s: float | None = None,
) -> str:
    """Run uv, streaming its progress (stderr) to ``log`` less what tells of the cache
    (``indexes.log_line``); returns stdout. A failure raises BuildError with uv's message in
    the user's terms. Past ``deadline_s`` uv's whole process group is killed (an index that
    trickles bytes would otherwise hold the worker for hours) and BuildError names it."""
    env = {**os.environ, **uv_environment(), "UV_CACHE_DIR": str(cache_dir), "NO_COLOR": "1"}
    process = subprocess.Popen(
        [uv_binary(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stderr is not None and process.stdout is not None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(deadline_s, expire) if deadline_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    messages = []
    reporting_error = False
    try:
        for line in process.stderr:
            # uv's error report goes to the user as one line (``indexes.failure_message``),
            # not raw: its causes tell what listens on a port ("invalid HTTP version parsed").
            reporting_error = reporting_error or line.startswith("error:")
            shown = None if reporting_error else indexes.log_line(line)
            if shown is not None:
                log(shown)
            if line.strip() and not line.startswith("Using CPython"):
                messages.append(line.rstrip())
        stdout = process.stdout.read()
        returncode = process.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if process.poll() is None:
            expire()
            process.wait()
    if expired.is_set():
        raise BuildError(
            f"dependency install stopped: build time limit {_duration(deadline_s or 0)} reached"
        )
    if returncode != 0:
        raise BuildError(indexes.failure_message(messages, returncode))
    return stdout


def _duration(seconds: float) -> str:
    """``10 min``, ``90 s``."""
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


def _target_args(spec: RuntimeSpec) -> list[str]:
    return [
        "--python-version",
        spec.python_version,
        "--python-platform",
        spec.python_platform,
        "--only-binary",
        ":all:",
    ]


#: Options uv takes on its command line, not in a requirements file (from PEP 723's
#: ``[tool.uv]``), kept in the normalised text so they are part of the cache key.
COMMAND_LINE_OPTIONS = ("--exclude-newer", "--locked")
#: The option line that marks a set as a whole resolution (a lock's pins): no resolver runs,
#: uv installs them with --no-deps.
LOCKED = "--locked"


def is_locked(requirements: str) -> bool:
    """Whether the set is a lock's exact pins, installed as they are (``LOCKED``)."""
    return LOCKED in requirements.splitlines()


def option_lines(requirements: str) -> list[str]:
    """The normalised text's option lines (index, find-links, exclude-newer)."""
    return [line for line in requirements.splitlines() if line.startswith("-")]


def _split(requirements: str) -> tuple[list[str], list[str]]:
    """(lines for uv's requirements file, arguments for its command line)."""
    file_lines, arguments = [], []
    for line in requirements.splitlines():
        flag, _, value = line.partition(" ")
        if flag == LOCKED:
            arguments.append("--no-deps")
        elif flag in COMMAND_LINE_OPTIONS:
            arguments += [flag, value]
        else:
            file_lines.append(line)
    return file_lines, arguments


def resolution_hash(spec: RuntimeSpec, requirements: str, pinned: list[str]) -> str:
    """Identifies the installed content: two texts that resolve to the same pins from the same
    indexes share one environment."""
    text = "\n".join([spec.name, *option_lines(requirements), *pinned])
    return sha256_bytes(text.encode())


def install(
    requirements: str,
    spec: RuntimeSpec,
    target: Path,
    cache_dir: Path,
    log: Callable[[str], None],
    *,
    pinned: list[str] | None = None,
    refresh: bool = False,
    deadline_s: float | None = None,
) -> list[str]:
    """Resolve and install ``requirements`` into ``target`` in one uv call, and return what
    was installed as sorted ``name==version`` pins. With ``pinned`` (a set resolved before,
    e.g. on another host) exactly those are installed and nothing is resolved; a set that is
    a lock's pins (``is_locked``) is installed as it is, likewise without resolving.

    Files are hard-linked from uv's cache (``target`` must be on the cache's filesystem):
    measured here, numpy + six install in 0.24 s linked against 0.86 s copied. Bytecode is
    compiled afterwards, off the user's path (``environments.compile_bytecode``): compiling
    numpy took 2 s, eight times the install."""
    file_lines, arguments = _split(requirements)
    if pinned is not None:
        file_lines = [line for line in file_lines if line.startswith("-")] + pinned
    if pinned is not None and "--no-deps" not in arguments:
        arguments.append("--no-deps")
    if refresh:
        arguments.append("--refresh")
    with tempfile.TemporaryDirectory(prefix="rgrid-req-") as tmp:
        path = Path(tmp) / "requirements.txt"
        path.write_text("\n".join(file_lines) + "\n")
        command = ["pip", "install", "--target", str(target), "--link-mode", "hardlink"]
        command += [*_target_args(spec), *arguments, "-r", str(path)]
        # The runtime's version and platform are named (``_target_args``), so which Python
        # uv runs under does not matter; left to find one, it may go through a pyenv shim on
        # PATH, 0.2-0.25 s of every install here (55 ms with the worker's own).
        command += ["--python", sys.executable]
        exact = "--no-deps" in arguments and not refresh
        if not (exact and _installed_offline(command, target, cache_dir, log, deadline_s)):
            _run_uv(command, cache_dir, log, deadline_s)
    return installed_pins(target)


def _installed_offline(
    command: list[str],
    target: Path,
    cache_dir: Path,
    log: Callable[[str], None],
    deadline_s: float | None,
) -> bool:
    """Exact pins (a lock's, or a set resolved before) installed from the uv cache alone,
    asking no index: the pins are already the resolution, and asking again only re-validates
    index pages (0.13-0.27 s of a pandas lock's 0.4-0.55 s install, measured here; `uv run`
    asks nothing either, it has the lock's URLs). Whether it worked; when it did not (a pin
    not in this cache), nothing is said or left in ``target``, and the caller asks the index
    as before. Within ``deadline_s``; the install after it gets its own (this one asks no
    network, so it ends as fast as the cache can be read: a failed one took ~10 ms here)."""
    said: list[str] = []
    try:
        _run_uv([*command, "--offline"], cache_dir, said.append, deadline_s)
    except BuildError:
        shutil.rmtree(target, ignore_errors=True)
        return False
    for line in said:
        log(line)
    return True


def installed_pins(target: Path) -> list[str]:
    """``name==version`` for every distribution in an installed folder, sorted."""
    pins = []
    for metadata in target.glob("*.dist-info/METADATA"):
        fields = {}
        with open(metadata, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
        if "name" in fields and "version" in fields:
            pins.append(f"{canonicalize_name(fields['name'])}=={fields['version']}")
    return sorted(pins)
