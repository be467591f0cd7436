"""Each host's disk budget: its environments and its blob cache stay under
``settings.cache_budget``, least recently used evicted first.

- An environment in use is never evicted. A run holds a shared ``flock`` on the
  environment's lock file (``envlocks.using``) from before it checks the folder until its sandbox is
  gone; eviction takes the exclusive lock without waiting and skips the folder if it cannot.
  A lock held by a process dies with it, so a killed run never pins a folder for ever.
  Unclaimed warm sandboxes that mount an evicted folder are retired with it: a script there
  would find no packages. A pool refill holds a second lock (``envlocks.refilling``) while it starts
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
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rgrid.core import metrics
from rgrid.core.config import Settings
from rgrid.host import environments, envlocks, pool

log = logging.getLogger(__name__)

#: A blob-cache file used this recently is never evicted (see the module docstring).
BLOB_GRACE_S = 120.0


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


def remove_environment(settings: Settings, path: Path, client=None) -> bool:
    """Delete an environment unless a run holds it; retire warm sandboxes that mount it.
    Returns whether it was removed."""
    with envlocks.evicting(settings.environments_dir, path.name) as free:
        if not free:
            log.info("keeping environment %s: a run is using it", path.name)
            return False
        if client is not None and not pool.retire_mounting(client, path):
            # A run's sandbox outlived its lock (a killed runner): the reaper's job.
            log.info("keeping environment %s: a sandbox still runs on it", path.name)
            return False
        environments.remove(settings.environments_dir, path.name)
        return True


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
