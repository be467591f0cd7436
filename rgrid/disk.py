"""Each host's disk budget: its environments and its blob cache stay under
``settings.cache_budget``, least recently used evicted first.

- An environment in use is never evicted. A run holds a shared ``flock`` on the
  environment's lock file (``using``) from before it checks the folder until its sandbox is
  gone; eviction takes the exclusive lock without waiting and skips the folder if it cannot.
  A lock held by a process dies with it, so a killed run never pins a folder for ever.
  Unclaimed warm sandboxes that mount an evicted folder are retired with it: a script there
  would find no packages. A pool refill holds a second lock (``refilling``) while it starts
  sandboxes on a folder; eviction waits for it (a container start), so a refill that began
  before the eviction cannot leave a warm sandbox on the removed folder behind it.
- A blob-cache file (a verified input or script copy) used within ``BLOB_GRACE_S`` is kept:
  a run on this host may be between fetching it and placing it in its sandbox.
- Recency is the folder's or file's modification time, set on each use (``touch``).
- What was evicted is a miss next time, never an error: the lookup finds no folder and the
  build step installs the pins again; the blob is downloaded again.

Runtime images are not under the budget: they are few, shared by every environment, and
built by the operator (``rgrid runtime build``); evicting one would break every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rgrid import environments, metrics
from rgrid.config import Settings

log = logging.getLogger(__name__)

#: A blob-cache file used this recently is never evicted (see the module docstring).
BLOB_GRACE_S = 120.0
#: Lock files of environments in use, beside them (dot-names are never environments).
LOCKS_FOLDER = ".using"


@dataclass(frozen=True)
class Entry:
    kind: str  # "environment" or "blob"
    path: Path
    size: int
    last_used: float


@dataclass
class Removed:
    """What an eviction or a purge removed from this host, by kind."""

    counts: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, size: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + size

    def as_dict(self) -> dict[str, int]:
        flat = {f"{kind}s": n for kind, n in self.counts.items()}
        flat.update({f"{kind}_bytes": n for kind, n in self.bytes.items()})
        return flat


def _lock_path(environments_dir: Path, name: str, suffix: str = ".lock") -> Path:
    folder = environments_dir / LOCKS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (hashlib.sha256(name.encode()).hexdigest()[:32] + suffix)


def _refill_lock_path(environments_dir: Path, name: str) -> Path:
    return _lock_path(environments_dir, name, ".refill")


@contextmanager
def using(settings: Settings, name: str | None) -> Iterator[None]:
    """Hold environment ``name`` (None: nothing to hold) against eviction, and mark it used
    now. Waits only while an eviction of that folder is under way (milliseconds)."""
    if not name:
        yield
        return
    with open(_lock_path(settings.environments_dir, name), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            touch(settings.environments_dir / name)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def refilling(deps_dir: Path | None) -> Iterator[bool]:
    """Hold environment folder ``deps_dir`` (None: the bare runtime) while warm sandboxes are
    started on it; yields whether the folder is still there to start them on. Unlike a run's
    hold (``using``) this does not keep the folder from eviction, which waits for it instead:
    warm sandboxes are only a guess at the next run, and must not keep a host over budget."""
    if deps_dir is None:
        yield True
        return
    with open(_refill_lock_path(deps_dir.parent, deps_dir.name), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            yield deps_dir.is_dir()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def touch(path: Path) -> None:
    """Mark a cache entry as used now (its place in the least-recently-used order)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _tree_size(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks; hard links counted once)."""
    total, seen = 0, set()
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _environments(settings: Settings) -> Iterator[Entry]:
    root = settings.environments_dir
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue  # lock files, installs in progress, folders being deleted
        with contextlib.suppress(OSError):
            yield Entry("environment", child, _tree_size(child), child.stat().st_mtime)


def _blobs(settings: Settings) -> Iterator[Entry]:
    root = settings.blob_cache_dir
    if not root.is_dir():
        return
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".part"):
                continue  # a download in progress
            path = Path(folder, name)
            with contextlib.suppress(OSError):
                st = path.stat()
                yield Entry("blob", path, st.st_blocks * 512, st.st_mtime)


def entries(settings: Settings) -> list[Entry]:
    return [*_environments(settings), *_blobs(settings)]


def usage(settings: Settings) -> dict[str, tuple[int, int]]:
    """(entries, bytes) per kind on this host: the exporter's gauges, ``rgrid cache stats``."""
    found = {"environment": (0, 0), "blob": (0, 0)}
    for entry in entries(settings):
        count, size = found[entry.kind]
        found[entry.kind] = (count + 1, size + entry.size)
    return found


def _warm_sandboxes_mounting(client, path: Path) -> tuple[list[dict], bool]:
    """(unclaimed pool sandboxes that mount ``path``, whether any execution sandbox does)."""
    from rgrid import sandbox

    pool_boxes, running = [], False
    for container in client.api.containers(all=True, filters={"label": sandbox.HOST_DIR_LABEL}):
        if not any(m.get("Source") == str(path) for m in container.get("Mounts") or []):
            continue
        names = [n.lstrip("/") for n in container.get("Names") or []]
        if any(n.startswith(sandbox.POOL_NAME_PREFIX) for n in names):
            pool_boxes.append(container)
        elif container.get("State") == "running" and any(
            n.startswith(sandbox.RUN_NAME_PREFIX) for n in names
        ):
            running = True
    return pool_boxes, running


def remove_environment(settings: Settings, path: Path, client=None) -> bool:
    """Delete an environment unless a run holds it; retire warm sandboxes that mount it.
    Returns whether it was removed."""
    root = settings.environments_dir
    with (
        open(_lock_path(root, path.name), "a") as fh,
        open(_refill_lock_path(root, path.name), "a") as refill,
    ):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("keeping environment %s: a run is using it", path.name)
            return False
        # Wait out a refill under way; one that starts after this sees no folder.
        fcntl.flock(refill, fcntl.LOCK_EX)
        try:
            if client is not None:
                from rgrid import pool

                warm, running = _warm_sandboxes_mounting(client, path)
                if running:
                    # A run's sandbox outlived its lock (a killed runner): the reaper's job.
                    log.info("keeping environment %s: a sandbox still runs on it", path.name)
                    return False
                for container in warm:
                    pool.retire(client, pool._box(container))
            environments.remove(settings.environments_dir, path.name)
            return True
        finally:
            fcntl.flock(refill, fcntl.LOCK_UN)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _evict(settings: Settings, entry: Entry, client, now: float) -> bool:
    if entry.kind == "environment":
        return remove_environment(settings, entry.path, client)
    if now - entry.last_used < BLOB_GRACE_S:
        return False
    with contextlib.suppress(FileNotFoundError):
        entry.path.unlink()
    return True


#: Installs in progress (``.tmp-``) older than this are abandoned; deletions (``.del-``) left
#: behind (a file written while the folder was deleted) are finished after a minute.
LEFTOVER_AGE_S = {".tmp-": 6 * 3600.0, ".del-": 60.0}


def _sweep_leftovers(settings: Settings, now: float) -> None:
    root = settings.environments_dir
    if not root.is_dir():
        return
    for child in root.iterdir():
        age = next((a for p, a in LEFTOVER_AGE_S.items() if child.name.startswith(p)), None)
        with contextlib.suppress(OSError):
            if age is not None and now - child.stat().st_mtime > age:
                shutil.rmtree(child, ignore_errors=True)


def enforce_budget(
    settings: Settings, client=None, budget: int | None = None, now: float | None = None
) -> Removed:
    """Evict least recently used entries until this host is within its budget (see the module
    docstring for what is never evicted). ``client``: the Docker engine, to retire warm
    sandboxes of an evicted environment."""
    budget = settings.cache_budget_bytes if budget is None else budget
    now = time.time() if now is None else now
    _sweep_leftovers(settings, now)
    found = sorted(entries(settings), key=lambda e: e.last_used)
    total = sum(e.size for e in found)
    removed = Removed()
    for entry in found:
        if total <= budget:
            break
        if _evict(settings, entry, client, now):
            total -= entry.size
            removed.add(entry.kind, entry.size)
    for kind, n in removed.counts.items():
        metrics.count_removed(metrics.EVICTED, metrics.EVICTED_BYTES, kind, n, removed.bytes[kind])
    if removed.counts:
        log.info("disk budget %d bytes: evicted %s", budget, removed.as_dict())
    return removed


def after_run(settings: Settings, client=None) -> None:
    """Keep the budget after a run (off the user's path: the result is already published).
    Never raises: a full disk is the next run's problem, not this one's result."""
    try:
        enforce_budget(settings, client)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("could not keep the disk budget", exc_info=True)


def touch_all(paths: Iterable[Path]) -> None:
    for path in paths:
        touch(path)
