"""Compiled bytecode shared between one account's environments on a host.

A new environment's first run imports its packages from source: the folder is read-only in
the sandbox, and its bytecode is compiled only after that run (``environments.
compile_bytecode``). For pandas that is most of a first run (1.9 s of 2.3 s measured here).
Yet a package file an earlier environment of the same account holds too is very often the
same file: uv hardlinks both from its cache. A ``.pyc`` is valid for exactly the source it
was compiled from (Python checks it against the source's mtime and size, which a hardlink
shares), so the new folder gets the earlier one's ``.pyc`` as a hardlink too, before its
first run, and the first run of a new set imports pandas as a repeat does.

What is shared is only what RGrid compiled: a wheel's own ``__pycache__`` is removed from a
new folder (``drop_shipped``: Python never needs it, and a crafted one must not travel), and
a ``.pyc`` is linked only beside a source that is the very inode the giver compiled it from.
Only the same account's folders give (``.rgrid-account``), so no account can time another's
installs, as environment folders are per account (``cache_keys.environment_name``). A
folder gives from the moment its compile starts (``givers``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

#: In each environment folder: the account it was installed for (whose folders may give it
#: bytecode, and take its own).
ACCOUNT_FILE = ".rgrid-account"
#: How many earlier folders a new one takes bytecode from: those sharing the most packages.
MAX_GIVERS = 3


def drop_shipped(folder: Path) -> None:
    """Remove every ``__pycache__`` a fresh install holds: bytecode a wheel shipped, which
    Python ignores unless it matches its source and which RGrid would otherwise pass on."""
    for path, dirs, _ in os.walk(folder):
        if "__pycache__" in dirs:
            dirs.remove("__pycache__")
            shutil.rmtree(Path(path) / "__pycache__", ignore_errors=True)


def mark_account(folder: Path, account_id: int) -> None:
    (folder / ACCOUNT_FILE).write_text(f"{account_id}\n")


def givers(root: Path, folder: Path, account_id: int, compiled_marker: str) -> list[Path]:
    """The account's folders under ``root`` that share the most installed packages
    (``*.dist-info`` names: name and version) with ``folder``, at most ``MAX_GIVERS``; of
    two sharing as many, the compiled one (``compiled_marker``) first.

    A folder whose compile is still running gives what it has so far: each ``.pyc`` is
    written whole under a temporary name and then renamed (``py_compile``), and only names
    ending ``.pyc`` are taken. Waiting for the marker gave nothing to a set installed within
    the previous one's compile (pandas: 5-28 s at the compile's low CPU weight, measured
    here), which is when new sets come: a lock edited and run again."""
    wanted = _dists(folder)
    if not wanted:
        return []
    scored = []
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            giver = Path(entry.path)
            if _owner(giver) != account_id:
                continue
            if shared := len(wanted & _dists(giver)):
                compiled = (giver / compiled_marker).exists()
                scored.append((-shared, not compiled, giver.name, giver))
    scored.sort()
    return [giver for *_, giver in scored[:MAX_GIVERS]]


def share(folder: Path, givers: list[Path]) -> int:
    """Hardlink into ``folder`` each ``.pyc`` a giver compiled from a source that is the same
    file (device and inode) as ``folder``'s; returns how many sources got theirs. A link that
    fails (another filesystem, a name taken) is skipped: that module is compiled as before.
    Plain strings and one ``scandir`` per folder: pathlib made this 0.35 s for pandas."""
    linked, pending = 0, [""]
    while pending:
        relative = pending.pop()
        taker = os.path.join(folder, relative)
        sources: dict[str, int] = {}
        with contextlib.suppress(OSError), os.scandir(taker) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        pending.append(os.path.join(relative, entry.name))
                elif entry.name.endswith(".py"):
                    sources[entry.name] = entry.inode()
        if sources:
            linked += _share_folder(taker, sources, [os.path.join(g, relative) for g in givers])
    return linked


def _share_folder(taker: str, sources: dict[str, int], giver_dirs: list[str]) -> int:
    """One folder of :func:`share`: ``sources`` (name: inode) that find their bytecode in
    the first giver whose same-named file is the same inode."""
    linked, cache = 0, os.path.join(taker, "__pycache__")
    for giver in giver_dirs:
        if not sources:
            break
        try:
            with os.scandir(giver) as entries:
                same = {e.name for e in entries if sources.get(e.name) == e.inode()}
            compiled = _compiled(os.path.join(giver, "__pycache__"))
        except OSError:
            continue
        for name in [n for n in same if n[: -len(".py")] in compiled]:
            try:
                theirs = os.stat(os.path.join(giver, name))
                mine = os.stat(os.path.join(taker, name))
                if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                    continue
                if not linked:
                    os.makedirs(cache, exist_ok=True)
                for pyc in compiled[name[: -len(".py")]]:
                    os.link(os.path.join(giver, "__pycache__", pyc), os.path.join(cache, pyc))
            except OSError:
                continue
            del sources[name]
            linked += 1
    return linked


def _compiled(cache: str) -> dict[str, list[str]]:
    """The ``.pyc`` names in a ``__pycache__``, by module (every tag and level)."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(cache) as entries:
        for entry in entries:
            if entry.name.endswith(".pyc"):
                found.setdefault(entry.name.split(".", 1)[0], []).append(entry.name)
    return found


def _dists(folder: Path) -> set[str]:
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        return {e.name for e in entries if e.name.endswith(".dist-info")}
    return set()


def _owner(folder: Path) -> int | None:
    try:
        return int((folder / ACCOUNT_FILE).read_text())
    except (OSError, ValueError):
        return None
