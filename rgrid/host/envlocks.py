"""The locks that keep an environment folder in place on a worker host while something needs it.

Three holders, all ``flock`` on files beside the environments (so a killed process never pins
a folder for ever: its locks die with it):

- a run holds its environment shared (``using``) from before it checks the folder until its
  sandbox is gone;
- a warm-pool refill holds a second lock shared (``refilling``) while it starts sandboxes on
  the folder;
- an eviction (``evicting``) takes the first lock exclusively without waiting, so a folder
  in use is skipped, then waits out a refill under way (a container start), so a refill that
  began before it cannot leave a warm sandbox on a removed folder.

A module of its own because the disk budget (which evicts) and the warm pool (which refills)
both need it, and the disk budget also retires the pool's sandboxes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Lock files of environments in use, beside them (dot-names are never environments).
LOCKS_FOLDER = ".using"


def _lock_path(environments_dir: Path, name: str, suffix: str = ".lock") -> Path:
    folder = environments_dir / LOCKS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (hashlib.sha256(name.encode()).hexdigest()[:32] + suffix)


def _refill_lock_path(environments_dir: Path, name: str) -> Path:
    return _lock_path(environments_dir, name, ".refill")


@contextmanager
def using(environments_dir: Path, name: str | None) -> Iterator[None]:
    """Hold environment ``name`` (None: nothing to hold) against eviction, and mark it used
    now. Waits only while an eviction of that folder is under way (milliseconds)."""
    if not name:
        yield
        return
    with open(_lock_path(environments_dir, name), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            with contextlib.suppress(OSError):
                os.utime(environments_dir / name)  # its place in the least-recently-used order
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


@contextmanager
def evicting(environments_dir: Path, name: str) -> Iterator[bool]:
    """Hold environment ``name`` for removal; yields False (and holds nothing) when a run is
    using it. Waits out a refill under way; one that starts later sees no folder."""
    with (
        open(_lock_path(environments_dir, name), "a") as fh,
        open(_refill_lock_path(environments_dir, name), "a") as refill,
    ):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        fcntl.flock(refill, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(refill, fcntl.LOCK_UN)
            fcntl.flock(fh, fcntl.LOCK_UN)
