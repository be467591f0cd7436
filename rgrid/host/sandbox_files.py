"""What goes into a sandbox's ``/work`` and what comes out of it, as plain files on the host.

The script and its inputs are copied in before the job is sent (``place_files``); once the
container is gone, every regular file under ``/work/outputs`` is listed, checked against the
output limits and hashed (``collect_outputs``). Both run on the host, through the bind mount,
never through the engine's archive calls (~0.1 s each).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from rgrid.core.units import human_limit
from rgrid.host.sandbox import Box, Limits, OutputLimitExceeded, sandbox_uid_gid
from rgrid.store.inputs import OUTPUTS_DIR


def place_files(box: Box, files: list[tuple[str, Path | bytes]], limits: Limits) -> None:
    """Write the script and inputs into the sandbox's ``/work`` (and an empty ``outputs/``),
    owned by the sandbox user. Inputs are copied, not linked: the script may change them, and
    the blob cache they come from must not change."""
    uid, gid = sandbox_uid_gid(limits)
    work = box.work
    for rel, source in [(OUTPUTS_DIR + "/", b""), *files]:
        target = work / rel
        parents = [p for p in Path(rel).parents if str(p) != "."]
        for parent in reversed(parents):
            folder = work / parent
            if not folder.exists():
                folder.mkdir()
                if os.geteuid() == 0:
                    os.chown(folder, uid, gid)
        if rel.endswith("/"):
            target.mkdir(exist_ok=True)
        elif isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        if os.geteuid() == 0:
            os.chown(target, uid, gid)


#: Files read (and hashed) at once when outputs are collected: each small file costs a few
#: system calls, which threads overlap (10,000 outputs of 1 KiB).
COLLECT_THREADS = 8

#: One output as listed: relative path, path on the host, size.
_Listed = tuple[str, str, int]


def collect_outputs(
    box: Box,
    limits: Limits,
    notes: list[str],
    keep: dict[str, bytes] | None = None,
    keep_at_most: int = 0,
    keep_bytes: int = 0,
) -> list[dict]:
    """Every regular file under ``/work/outputs``: relative path, size, sha256.

    Runs on the host after the container is gone, so nothing can change the folder while it is
    read; links are reported and never followed (one could point anywhere on the host). The
    limits on their count and total size are checked on the listing alone, before any file is
    read, so a run over either is refused at once (5,000 files used to take minutes).
    ``keep``: filled with the bytes of files of at most ``keep_at_most`` bytes, up to
    ``keep_bytes`` in all, by relative path, so that storing them (packed) reads none again."""
    root = box.work / OUTPUTS_DIR
    if not _outputs_folder_kept(root, notes):
        return []
    found = _list_outputs(str(root), limits, notes)
    if keep is not None:
        kept_total = sum(size for _, _, size in found if size <= keep_at_most)
        if kept_total > keep_bytes:
            keep = None  # too much to hold: storing reads the files again

    def one(item: _Listed) -> dict:
        return _read_output(item, keep, keep_at_most)

    if len(found) < 2 * COLLECT_THREADS:
        return [one(item) for item in found]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(COLLECT_THREADS, thread_name_prefix="rgrid-collect") as pool:
        return list(pool.map(one, found, chunksize=64))


def _outputs_folder_kept(root: Path, notes: list[str]) -> bool:
    """Whether ``/work/outputs`` is still the folder it was made as (the script may have
    replaced or removed it); a note says so when not."""
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            notes.append("the script replaced /work/outputs; no outputs collected")
            return False
    except FileNotFoundError:
        notes.append("the script removed /work/outputs; no outputs collected")
        return False
    return True


def _list_outputs(top: str, limits: Limits, notes: list[str]) -> list[_Listed]:
    """The regular files under ``top``, in order, refused (``OutputLimitExceeded``) as soon as
    their count or total size goes over the limits."""
    found: list[_Listed] = []
    total = 0
    # Strings, not Path objects: 10,000 outputs are 10,000 of each step below.
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        prefix = "" if folder == top else os.path.relpath(folder, top).replace(os.sep, "/") + "/"
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            relpath = prefix + name
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                notes.append(f"skipped outputs/{relpath}: not a regular file (links not followed)")
                continue
            total += info.st_size
            if total > limits.max_output_bytes:
                raise OutputLimitExceeded(
                    f"output limit {human_limit(limits.max_output_bytes)} reached "
                    f"(at outputs/{relpath})"
                )
            if len(found) >= limits.max_output_files:
                raise OutputLimitExceeded(
                    f"output file limit reached: more than {limits.max_output_files} files "
                    "in /work/outputs"
                )
            found.append((relpath, path, info.st_size))
    return found


def _read_output(item: _Listed, keep: dict[str, bytes] | None, keep_at_most: int) -> dict:
    """One output's entry (path, size, sha256), its bytes put in ``keep`` when it is small
    enough to hold. Opened without following links."""
    relpath, path, size = item
    digest = hashlib.sha256()
    held = keep is not None and size <= keep_at_most
    parts = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, 1024 * 1024):
            digest.update(chunk)
            if held:
                parts.append(chunk)
    finally:
        os.close(fd)
    if held:
        keep[relpath] = b"".join(parts)  # type: ignore[index]
    return {"path": relpath, "size": size, "sha256": digest.hexdigest()}


def output_path(box: Box, relpath: str) -> Path:
    return box.work / OUTPUTS_DIR / relpath
