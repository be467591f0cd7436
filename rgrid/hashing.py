"""Content hashes. A hash here is always sha256 of exact bytes, as lowercase hex."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK_SIZE = 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    """Hash a stream in constant memory; returns (digest, size)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def script_hash(script: bytes) -> str:
    """The script cache's script hash: the exact bytes, so whitespace and line endings matter."""
    return sha256_bytes(script)
