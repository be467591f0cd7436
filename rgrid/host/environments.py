"""Environments on a worker host: a runtime image plus, when a script has requirements, one
installed dependency set in a folder named by what it holds, mounted read-only into sandboxes.

Nothing is built for a script, and no image layer is built for a dependency set: creating an
image layer costs seconds on any Docker host (a ``COPY`` of numpy measured 8-14 s here), while
uv fills a folder from its cache in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker

from rgrid.core import cache_keys
from rgrid.core.cache_keys import MANAGED_LABEL
from rgrid.host import bytecode, dependencies
from rgrid.host.runtimes import RuntimeSpec
from rgrid.host.sandbox import DEPS_MOUNT

#: Written into a folder once its bytecode is compiled, so it is compiled once.
COMPILED_MARKER = ".rgrid-compiled"


@dataclass(frozen=True)
class Installed:
    #: The folder's name, or None when the set installs nothing (the runtime alone will do).
    name: str | None
    pinned: list[str]
    install_s: float


def present(root: Path, name: str | None) -> bool:
    """Whether this host has the environment (no dependencies: always). An empty folder is
    not one: Docker creates a bind mount's missing source as an empty folder (a warm sandbox
    started for an environment evicted meanwhile), and an install renames over it."""
    if name is None:
        return True
    try:
        with os.scandir(root / name) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def install(
    root: Path,
    *,
    account_id: int,
    spec: RuntimeSpec,
    requirements: str,
    uv_cache_dir: Path,
    log: Callable[[str], None],
    pinned: list[str] | None = None,
    refresh: bool = False,
    deadline_s: float | None = None,
) -> Installed:
    """Install a requirements set into its folder under ``root``.

    uv fills a temporary folder beside the final one, which is then renamed into place: a
    folder under its final name is always complete, and of two hosts processes installing the
    same set the second simply keeps the first one's folder. The caller holds the build lock
    for the requirements text; two texts resolving to the same set meet here."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scratch = root / f".tmp-{secrets.token_hex(6)}"
    try:
        pins = dependencies.install(
            requirements,
            spec,
            scratch,
            uv_cache_dir,
            log,
            pinned=pinned,
            refresh=refresh,
            deadline_s=deadline_s,
        )
        if not pins:
            return Installed(None, [], round(time.monotonic() - started, 3))
        name = cache_keys.environment_name(
            account_id, dependencies.resolution_hash(spec, requirements, pins)
        )
        (scratch / ".lock").unlink(missing_ok=True)  # uv's lock for the target folder
        _take_bytecode(root, scratch, account_id, log)
        with contextlib.suppress(OSError):  # already there: identical content
            os.rename(scratch, root / name)
        return Installed(name, pins, round(time.monotonic() - started, 3))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _take_bytecode(root: Path, folder: Path, account_id: int, log: Callable[[str], None]) -> None:
    """Before its first run, a new folder takes the bytecode of the package files it shares
    with the account's compiled folders (rgrid/host/bytecode.py): a first run of pandas in a
    new set then imports it compiled."""
    bytecode.drop_shipped(folder)
    bytecode.mark_account(folder, account_id)
    givers = bytecode.givers(root, folder, account_id, COMPILED_MARKER)
    if givers and (linked := bytecode.share(folder, givers)):
        log(f"bytecode of {linked} module(s) taken from {len(givers)} earlier environment(s)")


def compile_bytecode(client: docker.DockerClient, image: str, path: Path) -> None:
    """Compile the folder's bytecode in a detached container of the runtime itself (the right
    interpreter, whatever the host runs), at the lowest CPU weight, so it never slows a run.

    Why at all: the sandbox's root is read-only and scripts run with PYTHONDONTWRITEBYTECODE,
    so without it every run compiles what it imports (``import numpy`` 347 ms against 168 ms
    measured here). Why afterwards: it took 2 s for numpy, eight times the install, and the
    first run should not wait for it. Two of these on one folder are harmless: pyc files are
    written atomically."""
    if not path.is_dir() or (path / COMPILED_MARKER).exists():
        return  # gone (a bind mount would create it empty), or done
    uid, gid = os.geteuid(), os.getegid()
    host_config = client.api.create_host_config(
        network_mode="none",
        read_only=True,
        auto_remove=True,
        binds={str(path): {"bind": DEPS_MOUNT, "mode": "rw"}},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        cpu_shares=2,
        mem_limit="1g",
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},
    )
    script = (
        f"python3 -m compileall -q -j 0 {DEPS_MOUNT} >/dev/null; : > {DEPS_MOUNT}/{COMPILED_MARKER}"
    )
    container = client.api.create_container(
        image,
        command=["sh", "-c", script],
        user=f"{uid}:{gid}",
        labels={MANAGED_LABEL: "1"},
        host_config=host_config,
        network_disabled=True,
    )
    client.api.start(container["Id"])


def remove(root: Path, name: str) -> None:
    """Delete an environment's folder (purge, eviction). Renamed away first, so no new sandbox
    mounts a half-deleted folder."""
    path = root / name
    doomed = root / f".del-{secrets.token_hex(6)}"
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
