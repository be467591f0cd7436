"""Saving an execution's outputs into a local folder, as the remote and the embedded client
both do: each file verified against its digest, many fetched at once, packed outputs fetched
by span and split, names this file system cannot hold skipped with a line saying so.

A module of its own so that the embedded client need not import the remote one (which
imports it lazily to build it: the two imported each other)."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from rgrid.core.errors import (
    BadInput,
    RGridError,
)


def verified_copy(chunks, target: Path, expected_sha256: str) -> None:
    """Write chunks to ``target`` and refuse the file unless its digest is the promised one."""
    partial = fetch_verified(chunks, target, expected_sha256)
    partial.replace(target)


def fetch_verified(chunks, target: Path, expected_sha256: str) -> Path:
    """Write chunks beside ``target`` and return that file, unless its digest is not the
    promised one. Its name is short (the output's own may be as long as a name can be) and
    unique (outputs of the same bytes may be fetched at once into the same folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".rgrid-{expected_sha256[:12]}-{os.urandom(4).hex()}.part")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != expected_sha256:
        partial.unlink(missing_ok=True)
        raise RGridError(f"output {target.name} failed verification (digest mismatch)")
    return partial


def _verified_file(data: bytes, target: Path, expected_sha256: str) -> Path:
    """``fetch_verified`` for a packed output's bytes, already in memory (64 KiB at most) and
    verified, in a folder already made."""
    partial = target.with_name(f".rgrid-{expected_sha256[:12]}-{os.urandom(4).hex()}.part")
    try:
        with open(partial, "wb") as fh:
            fh.write(data)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


#: Outputs (or spans of packs) fetched at once: many small files are bound by the store's
#: round trip, not by bandwidth (10,000 one-KiB outputs; bench/many_outputs.py).
FETCH_THREADS = 16
#: Packed outputs (store/output_blobs.py) are fetched by span: one ranged GET for neighbours in a
#: pack, split here. A gap up to this many bytes is read through rather than asked again,
SPAN_GAP_BYTES = 256 * 1024
#: and a span stops growing at this many bytes, so that a pack's spans arrive (and are split
#: into files) side by side.
SPAN_MAX_BYTES = 1024**2

#: ``fetch_span(pack, offset, length, paths)``: ``length`` bytes of the pack from ``offset``
#: on; ``paths``, the outputs they hold, are named if the pack is lost.
SpanFetcher = Callable[[dict, int, int, list[str]], AbstractContextManager[Iterable[bytes]]]


def _glob(pattern: str) -> re.Pattern[str]:
    """A shell glob over output paths: ``*`` and ``?`` stay within a folder, ``**`` does not."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
            continue
        parts.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
        i += 1
    return re.compile("".join(parts) + r"\Z")


def select_outputs(listing: dict, patterns: Iterable[str] | None) -> dict:
    """Only the outputs named (a path, a folder, or a glob such as ``tiles/*.png``); all
    without ``patterns``. A pattern that matches nothing is refused, naming it."""
    patterns = [pattern.strip("/") for pattern in patterns or []]
    if not patterns:
        return listing
    globs = [_glob(pattern) for pattern in patterns]

    def matches(path: str, index: int) -> bool:
        pattern = patterns[index]
        return path == pattern or path.startswith(pattern + "/") or bool(globs[index].match(path))

    for index, pattern in enumerate(patterns):
        if not any(matches(o["path"], index) for o in listing["outputs"]):
            raise BadInput(f"no output matches {pattern!r}")
    chosen = [
        o for o in listing["outputs"] if any(matches(o["path"], i) for i in range(len(patterns)))
    ]
    return {**listing, "outputs": chosen}


def _spans(members: list[dict]) -> list[list[dict]]:
    """One pack's wanted outputs (each with ``offset`` and ``size``) as spans to fetch: sorted
    by offset, neighbours together (``SPAN_GAP_BYTES``, ``SPAN_MAX_BYTES``)."""
    spans: list[list[dict]] = []
    start = end = 0
    for output in sorted(members, key=lambda o: (o["offset"], o["path"])):
        begin, stop = output["offset"], output["offset"] + output["size"]
        if spans and begin - end <= SPAN_GAP_BYTES and max(end, stop) - start <= SPAN_MAX_BYTES:
            spans[-1].append(output)
            end = max(end, stop)
            continue
        spans.append([output])
        start, end = begin, stop
    return spans


class _Reader:
    """Exact reads over an iterator of chunks (a span's body)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""

    def read(self, count: int) -> bytes:
        parts, need = [], count
        while need > 0:
            if not self._buffer:
                self._buffer = next(self._chunks, b"")
                if not self._buffer:
                    break
            part, self._buffer = self._buffer[:need], self._buffer[need:]
            parts.append(part)
            need -= len(part)
        return b"".join(parts)


def save_outputs(
    listing: dict,
    dest: Path,
    fetch: Callable[[dict], AbstractContextManager[Iterable[bytes]]],
    advance: Callable[[int], None],
    fetch_span: SpanFetcher | None = None,
) -> list[Path]:
    """Fetch and verify each output of ``listing`` (``output_listing``'s ``outputs`` and
    ``packs``) into ``dest``, ``FETCH_THREADS`` requests at a time (``fetch`` and
    ``fetch_span`` are called from several threads): an output of its own object with one GET
    (``fetch``), packed ones by span of their pack (``fetch_span``), one ranged GET split into
    files. One this filesystem cannot hold (a name too long or invalid here, or the same as
    another's once case is folded) is skipped with a line saying so; the others still arrive.
    The first failure of the store stops the rest."""
    return _Download(listing, dest, fetch, advance, fetch_span).run()


class _Download:
    """One ``save_outputs``: its jobs (an output or a span of a pack each), run on a pool of
    threads, and what they share: the files written so far, the progress and whether one
    has failed (which stops the others)."""

    def __init__(
        self,
        listing: dict,
        dest: Path,
        fetch: Callable[[dict], AbstractContextManager[Iterable[bytes]]],
        advance: Callable[[int], None],
        fetch_span: SpanFetcher | None,
    ):
        self.listing, self.fetch, self.advance, self.fetch_span = (
            listing,
            fetch,
            advance,
            fetch_span,
        )
        self.outputs = listing["outputs"]
        self.resolve = _Targets(dest)
        self.targets = {id(output): self.resolve(output["path"]) for output in self.outputs}
        self.order = {self.targets[id(output)]: i for i, output in enumerate(self.outputs)}
        self.placed = threading.Lock()
        self.written: list[Path] = []
        self.files: set[tuple[int, int]] = set()  # (device, inode) of each file written
        self.progress_lock = threading.Lock()
        self.failed = threading.Event()

    def counted(self, n: int) -> None:
        if self.failed.is_set():  # Ctrl-C, or the store failed for another output: stop here
            raise RGridError("output download stopped")
        with self.progress_lock:
            self.advance(n)

    def place(self, partial: Path, target: Path) -> None:
        # Placing is one at a time: two names that are one file here (case folded) must not
        # both count as written.
        with self.placed:
            try:
                try:
                    seen = os.stat(target)
                except FileNotFoundError:
                    pass
                else:  # a file of a former download, or one just written under another name
                    if (seen.st_dev, seen.st_ino) in self.files:
                        raise OSError(
                            errno.EEXIST, "another output has this name on this filesystem"
                        )
                partial.replace(target)
                now = os.stat(target)
            except OSError:
                partial.unlink(missing_ok=True)
                raise
            self.written.append(target)
            self.files.add((now.st_dev, now.st_ino))

    def create(self, data: bytes, target: Path, expected_sha256: str) -> bool:
        """A packed output's verified bytes (in memory) written as a new file, in one write,
        without a temporary name and a rename (10,000 files: the time is the file system's,
        per call). False if a file (or link) of that name is there already: ``place`` then
        replaces it by a rename, and tells a case-folded twin of another output apart."""
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise RGridError(f"output {target.name} failed verification (digest mismatch)")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o666)
        except FileExistsError:
            return False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            target.unlink(missing_ok=True)  # never a half-written file under its name
            raise
        os.close(fd)
        with self.placed:
            self.written.append(target)
            self.files.add((info.st_dev, info.st_ino))
        return True

    @staticmethod
    def skipped(output: dict, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        print(f"rgrid: skipped output {output['path']!r}: {reason}", file=sys.stderr)

    def one(self, output: dict) -> None:
        """An output of its own object: one GET, verified, then renamed into place."""
        if self.failed.is_set():
            return
        target = self.targets[id(output)]
        try:
            with self.fetch(output) as chunks:
                partial = fetch_verified(_counted(chunks, self.counted), target, output["sha256"])
            self.place(partial, target)
        except OSError as exc:
            self.skipped(output, exc)
        except BaseException:
            self.failed.set()
            raise

    def span(self, pack: dict, members: list[dict], pack_paths: list[str]) -> None:
        """Packed outputs that lie together: one ranged GET of their pack, split into files."""
        if self.failed.is_set():
            return
        start = members[0]["offset"]
        length = max(o["offset"] + o["size"] for o in members) - start
        try:
            assert self.fetch_span is not None
            with self.fetch_span(pack, start, length, pack_paths) as chunks:
                reader, position = _Reader(chunks), start
                for output in members:
                    if output["offset"] > position:
                        reader.read(output["offset"] - position)  # a gap: read through
                        position = output["offset"]
                    if output["offset"] == position:
                        data = reader.read(output["size"])
                        position += len(data)
                    # else: the same bytes as the output before it (one blob, two names)
                    self.counted(len(data))
                    target = self.targets[id(output)]
                    try:
                        if not self.create(data, target, output["sha256"]):
                            self.place(_verified_file(data, target, output["sha256"]), target)
                    except OSError as exc:
                        self.skipped(output, exc)
        except BaseException:
            self.failed.set()
            raise

    def jobs(self) -> list[Callable[[], None]]:
        """The spans of packs first (each holds many outputs), then each output of its own."""
        jobs: list[Callable[[], None]] = []
        by_pack: dict[int, list[dict]] = {}
        for output in self.outputs:
            if "pack" in output:
                by_pack.setdefault(output["pack"], []).append(output)
            else:
                jobs.append(functools.partial(self.one, output))
        for index, members in by_pack.items():
            pack, paths = self.listing["packs"][index], [o["path"] for o in members]
            # The spans first: each holds many outputs.
            jobs[:0] = [functools.partial(self.span, pack, part, paths) for part in _spans(members)]
        if by_pack:
            self.resolve.make_folders()
        return jobs

    def run(self) -> list[Path]:
        jobs = self.jobs()
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return self.written
        # Imported only for more than one job: it costs as much as a small output's GET.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(FETCH_THREADS, len(jobs))) as pool:
            futures = [pool.submit(job) for job in jobs]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                self.failed.set()
                for future in futures:
                    future.cancel()
                raise
        return sorted(self.written, key=self.order.__getitem__)


def _counted(chunks: Iterable[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


def safe_target(dest: Path, relpath: str) -> Path:
    target = (dest / relpath).resolve()
    if target == dest.resolve() or not target.is_relative_to(dest.resolve()):
        raise RGridError(f"refusing output path {relpath!r} outside the outputs folder")
    return target


class _Targets:
    """``safe_target`` for many outputs: each folder resolved once, not each file (resolving
    10,000 paths took seconds). The file's own name is never resolved: it is replaced by a
    rename, which replaces a symlink of that name rather than following it."""

    def __init__(self, dest: Path):
        self.dest, self.root = dest, dest.resolve()
        self._folders: dict[str, Path] = {"": self.root}

    def __call__(self, relpath: str) -> Path:
        folder, _, name = relpath.rpartition("/")
        if relpath.startswith("/") or name in ("", ".", "..") or "\0" in relpath:
            return safe_target(self.dest, relpath)
        parent = self._folders.get(folder)
        if parent is None:
            parent = (self.root / folder).resolve()
            if parent != self.root and not parent.is_relative_to(self.root):
                raise RGridError(f"refusing output path {relpath!r} outside the outputs folder")
            self._folders[folder] = parent
        return parent / name

    def make_folders(self) -> None:
        """Every folder the outputs go to, once: not a mkdir per file."""
        for folder in self._folders.values():
            folder.mkdir(parents=True, exist_ok=True)
