"""The warm pool: sandboxes started before anyone needs them, one execution each.

The pool's state is the Docker engine itself (containers labelled with their pool key), not a
process's memory: every Celery child on a host, and the next ``rgrid run`` of the embedded
default, sees the same pool, and a restarted worker finds what its predecessor started. A
claim is an atomic rename (``sandbox_container.claim``), so no sandbox is ever handed out twice.
Sandboxes nobody claims end themselves after the idle timeout; nothing here has to stop them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker

from rgrid.core import cache_keys
from rgrid.host import envlocks, sandbox, sandbox_container, sandbox_fs, sandbox_reattach
from rgrid.host.sandbox import Box, Environment, Limits

log = logging.getLogger(__name__)

#: A sandbox this close to its idle deadline is left alone: it may exit mid-claim.
CLAIM_MARGIN_S = 15


@dataclass(frozen=True)
class PoolSettings:
    root: Path
    #: Warm sandboxes kept per environment.
    size: int = 2
    #: Warm sandboxes kept on the host in all; the least recently started go first.
    max_total: int = 6
    idle_s: float = 600.0


def installation_id(pool: PoolSettings) -> str:
    return hashlib.sha256(str(pool.root).encode()).hexdigest()[:16]


def pool_key(env: Environment, limits: Limits, pool: PoolSettings) -> str:
    """Interchangeable sandboxes: same environment, same limits, same installation. Two
    installations sharing a Docker host (a test session, a stack, the embedded default) never
    hand each other sandboxes whose host folders the other may delete."""
    text = f"{env.pool_key(limits)}\x1f{installation_id(pool)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def warm_sandboxes(
    client: docker.DockerClient, key: str | None = None, installation: str | None = None
) -> list[dict]:
    """Unclaimed running sandboxes (of one pool, or of one installation), newest first."""
    if key:
        label = f"{cache_keys.POOL_LABEL}={key}"
    elif installation:
        label = f"{cache_keys.INSTALLATION_LABEL}={installation}"
    else:
        label = cache_keys.POOL_LABEL
    found = client.api.containers(filters={"label": label, "status": "running"})
    warm = [
        c
        for c in found
        if any(n.lstrip("/").startswith(sandbox.POOL_NAME_PREFIX) for n in c.get("Names", []))
    ]
    return sorted(warm, key=lambda c: c.get("Created", 0), reverse=True)


def box_of(container: dict) -> Box:
    name = container["Names"][0].lstrip("/")
    return Box(
        name=name,
        container_id=container["Id"],
        host_dir=Path(container["Labels"][cache_keys.HOST_DIR_LABEL]),
    )


def claim(
    client: docker.DockerClient,
    env: Environment,
    limits: Limits,
    pool: PoolSettings,
    execution_id: str,
) -> Box | None:
    """A warm sandbox for ``env``, now belonging to ``execution_id``; None when none is free."""
    return claim_counting_spares(client, env, limits, pool, execution_id)[0]


def claim_counting_spares(
    client: docker.DockerClient,
    env: Environment,
    limits: Limits,
    pool: PoolSettings,
    execution_id: str,
) -> tuple[Box | None, int]:
    """``claim``, and how many other warm sandboxes of ``env`` were left when it claimed (as
    the engine listed them: another execution may take one meanwhile). With a spare left,
    the refill can wait until the run is over instead of starting a container beside it."""
    now = time.time()
    warm = warm_sandboxes(client, pool_key(env, limits, pool))
    for index, container in enumerate(warm):
        try:
            idle_until = int(container["Labels"].get(cache_keys.IDLE_UNTIL_LABEL, "0"))
        except ValueError:
            continue
        if idle_until - now < CLAIM_MARGIN_S:
            continue
        box = box_of(container)
        if not box.work.is_dir():
            # Its host folder was deleted under it (a data folder wiped while it waited):
            # files written now would never reach it.
            retire(client, box)
            continue
        if sandbox_container.claim(client, box, execution_id):
            return box, len(warm) - index - 1
    return None, 0


def start(client: docker.DockerClient, env: Environment, limits: Limits, pool: PoolSettings) -> Box:
    key = pool_key(env, limits, pool)
    name = f"{sandbox.POOL_NAME_PREFIX}{key[:12]}-{secrets.token_hex(4)}"
    labels = {cache_keys.POOL_LABEL: key, cache_keys.INSTALLATION_LABEL: installation_id(pool)}
    return sandbox_container.start_box(
        client, env, limits, root=pool.root, idle_s=pool.idle_s, name=name, labels=labels
    )


def fill(client: docker.DockerClient, env: Environment, limits: Limits, pool: PoolSettings) -> int:
    """Start sandboxes until ``env`` has ``pool.size`` warm ones, making room under
    ``pool.max_total`` by retiring the oldest sandboxes of other environments. Returns how
    many were started (none when the environment's folder has just been evicted)."""
    key = pool_key(env, limits, pool)
    started = 0
    with envlocks.refilling(env.deps_dir) as present:
        missing = pool.size - len(warm_sandboxes(client, key)) if present else 0
        while started < missing:
            everyone = warm_sandboxes(client, installation=installation_id(pool))
            others = [c for c in everyone if c["Labels"].get(cache_keys.POOL_LABEL) != key]
            while len(everyone) >= pool.max_total and others:
                oldest = others.pop()
                retire(client, box_of(oldest))
                everyone.remove(oldest)
            if len(everyone) >= pool.max_total:
                break
            start(client, env, limits, pool)
            started += 1
    return started


def retire(client: docker.DockerClient, box: Box) -> None:
    """End an unclaimed sandbox: claim it under a throwaway name first, so that no execution
    can be claiming it at the same moment."""
    if sandbox_container.claim(client, box, f"retired-{secrets.token_hex(4)}"):
        sandbox_container.discard(client, box)


def retire_mounting(client: docker.DockerClient, path: Path) -> bool:
    """Retire the unclaimed warm sandboxes that mount ``path`` (an environment about to be
    removed: a script there would find no packages). False, retiring nothing, when a claimed
    sandbox still runs on it."""
    warm, running = [], False
    for container in client.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL}):
        if not any(m.get("Source") == str(path) for m in container.get("Mounts") or []):
            continue
        names = [n.lstrip("/") for n in container.get("Names") or []]
        if any(n.startswith(sandbox.POOL_NAME_PREFIX) for n in names):
            warm.append(container)
        elif container.get("State") == "running" and any(
            n.startswith(sandbox.RUN_NAME_PREFIX) for n in names
        ):
            running = True
    if running:
        return False
    for container in warm:
        retire(client, box_of(container))
    return True


def retire_all(
    client: docker.DockerClient, env: Environment, limits: Limits, pool: PoolSettings
) -> int:
    """End every unclaimed sandbox of ``env``. Needed when its dependency folder has just been
    installed again under the same name (evicted or purged, then a miss): sandboxes started
    before still mount the removed folder, and a script there would find no packages."""
    boxes = [box_of(container) for container in warm_sandboxes(client, pool_key(env, limits, pool))]
    for box in boxes:
        retire(client, box)
    return len(boxes)


def retire_installation(client: docker.DockerClient, root: Path) -> int:
    """End every sandbox whose host folder is under ``root`` (an installation's sandboxes
    folder), claimed or not: for a test session or a benchmark tidying up. Also removes those
    that were created and never started (a process killed between the two): nothing else
    would end them, and they keep their folders' filesystems counted as in use. Returns how
    many."""
    ended = 0
    for container in warm_sandboxes(client):
        box = box_of(container)
        if box.host_dir.is_relative_to(root):
            retire(client, box)
            ended += 1
    created = client.api.containers(
        all=True, filters={"label": cache_keys.HOST_DIR_LABEL, "status": "created"}
    )
    for container in created:
        if Path(container["Labels"][cache_keys.HOST_DIR_LABEL]).is_relative_to(root):
            with contextlib.suppress(docker.errors.APIError):
                client.api.remove_container(container["Id"], force=True)
                ended += 1
    # Claimed ones too: a worker stopped between a claim and its job leaves its sandbox
    # waiting for a job that never comes (it would end itself only when idle).
    claimed = client.api.containers(
        filters={"label": cache_keys.HOST_DIR_LABEL, "name": sandbox.RUN_NAME_PREFIX}
    )
    for container in claimed:
        box = box_of(container)
        if box.host_dir.is_relative_to(root):
            sandbox_container.discard(client, box)
            ended += 1
    return ended


def fill_in_background(
    client: docker.DockerClient, env: Environment, limits: Limits, pool: PoolSettings
) -> threading.Thread:
    """Refill off the user's path (after a claim), and tidy the folders of sandboxes that are
    gone. Failures are logged, never raised: a pool that cannot be refilled only makes the
    next run a cold one."""

    def work() -> None:
        try:
            fill(client, env, limits, pool)
            # Folders of sandboxes that idled out: the embedded default has no reaper.
            sweep_folders(client, pool.root)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("could not refill the warm pool")

    thread = threading.Thread(target=work, name="rgrid-pool-fill", daemon=True)
    thread.start()
    return thread


#: Another installation's sandbox filesystem is left alone for at least this long.
FOREIGN_MIN_AGE_S = 60.0


def sweep_folders(client: docker.DockerClient, root: Path, min_age_s: float = 60) -> int:
    """Delete host folders, with their filesystems, whose sandbox no longer exists (it idled
    out and removed itself, or its runner died). Folders younger than ``min_age_s`` are
    left: their sandbox may be starting."""
    alive = {
        c["Labels"].get(cache_keys.HOST_DIR_LABEL)
        for c in client.api.containers(all=True, filters={"label": cache_keys.HOST_DIR_LABEL})
    }
    removed = 0
    for folder in root.iterdir() if root.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if str(folder) in alive or time.time() - folder.stat().st_mtime < min_age_s:
                continue
            if sandbox_reattach.holds_result(folder):
                continue  # its runner died: the one coming back reads its result here
            # Its filesystem is unmounted first: deleting through the mount would leave
            # the mount (and its loop device) behind.
            sandbox_fs.remove_folder(folder)
            removed += 1
    # Then other installations' (this one's are gone by now), never younger than a minute
    # whatever ``min_age_s`` says: another installation may be storing an ended sandbox's
    # outputs (it renews the folder's mtime meanwhile: rgrid.pipeline.outputs.holding), or
    # be between its script's end and its runner reading the status (a test session tidying its own
    # folders with 0 unmounted another's sandbox there: its status.json gone, seen here).
    return removed + release_orphaned_disks(alive, max(min_age_s, FOREIGN_MIN_AGE_S))


def release_orphaned_disks(alive: set[str], min_age_s: float = 60) -> int:
    """Unmount every sandbox filesystem on this host whose sandbox is gone, and delete its
    image, whichever installation made it: a test session's or an embedded user's data
    folder may never run again to sweep its own, and a mount outlives its folder's
    deletion. Its folder is left to its owner (it holds nothing then). Returns how many."""
    # The mount table names real paths; a label may name one through a symbolic link.
    alive = {os.path.realpath(path) for path in alive if path}
    released = 0
    for host_dir in sandbox_fs.sandbox_disks():
        with contextlib.suppress(OSError):
            young = time.time() - host_dir.stat().st_mtime < min_age_s
            if (
                young
                or os.path.realpath(host_dir) in alive
                or sandbox_reattach.holds_result(host_dir)
            ):
                continue
            sandbox_fs.release_disk(host_dir)
            (host_dir / sandbox.DISK_IMAGE).unlink(missing_ok=True)
            released += 1
    return released
