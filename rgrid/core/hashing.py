"""Content hashes. A hash here is always sha256 of exact bytes, as lowercase hex."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

CHUNK_SIZE = 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_chunks(
    chunks: Iterable[bytes], sink: Callable[[bytes], object] | None = None
) -> tuple[str, int]:
    """Hash bytes as they pass, in constant memory, handing each chunk on to ``sink`` (a
    file's ``write``, a progress bar): one read serves both the copy and its digest. Returns
    (digest, size)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink(chunk)
    return digest.hexdigest(), size


def sha256_stream(
    stream: BinaryIO, sink: Callable[[bytes], object] | None = None
) -> tuple[str, int]:
    """:func:`sha256_chunks` of a stream, read in ``CHUNK_SIZE`` pieces."""
    return sha256_chunks(iter(lambda: stream.read(CHUNK_SIZE), b""), sink)


def sha256_file(path: Path, sink: Callable[[bytes], object] | None = None) -> tuple[str, int]:
    with open(path, "rb") as fh:
        return sha256_stream(fh, sink)


def script_hash(script: bytes) -> str:
    """The script cache's script hash: the exact bytes, so whitespace and line endings matter."""
    return sha256_bytes(script)
