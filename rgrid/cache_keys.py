"""Every cache key and every name derived from one, in one place (DESIGN.md, "Cache keys").

Keys include the account so that no account can learn whether another ran a script, and the
script key includes the dependency hash so that a script never gets an image built with
another requirements set.
"""

from __future__ import annotations

from rgrid.hashing import sha256_bytes

SCRIPT_IMAGE_REPOSITORY = "rgrid-exec"
DEPENDENCY_IMAGE_REPOSITORY = "rgrid-deps"
KEY_SEPARATOR = "\x1f"

#: The dependency hash of a script with no requirements (the normalised empty set).
EMPTY_DEPENDENCY_HASH = sha256_bytes(b"")


def has_dependencies(dependency_hash: str | None) -> bool:
    return dependency_hash not in (None, EMPTY_DEPENDENCY_HASH)


def script_cache_key(account_id: int, runtime: str, dependency_hash: str, script_hash: str) -> str:
    parts = ("script", str(account_id), runtime, dependency_hash, script_hash)
    return sha256_bytes(KEY_SEPARATOR.join(parts).encode())


def script_image_ref(cache_key: str) -> str:
    """The tag a script image is built under: ``rgrid-exec:<first 12 of the key>``."""
    return f"{SCRIPT_IMAGE_REPOSITORY}:{cache_key[:12]}"


def dependency_cache_key(account_id: int, runtime: str, dependency_hash: str) -> str:
    return sha256_bytes(
        KEY_SEPARATOR.join(("deps", str(account_id), runtime, dependency_hash)).encode()
    )


def dependency_image_ref(account_id: int, resolution_hash: str) -> str:
    """Named by what is installed, not by the requirements text: two texts that resolve to the
    same pins share one image. Still per account, so no account can time another's cache."""
    key = sha256_bytes(
        KEY_SEPARATOR.join(("deps-image", str(account_id), resolution_hash)).encode()
    )
    return f"{DEPENDENCY_IMAGE_REPOSITORY}:{key[:12]}"


def build_lock_name(cache_key: str) -> str:
    """Single-flight lock: one build per key at a time across the grid."""
    return f"rgrid:build-lock:{cache_key}"


def script_object_key(account_id: int, script_hash: str) -> str:
    return f"scripts/{account_id}/{script_hash}.py"


def blob_object_key(account_id: int, name: str) -> str:
    """Where a blob's bytes live. ``name`` is an upload's id, not the digest: the bytes are
    only trusted through the Blob row written after their digest was checked."""
    return f"blobs/{account_id}/{name}"


def input_hash(manifest: list[dict]) -> str:
    """The hash of the sorted manifest: renamed files are a new manifest but no new upload."""
    pairs = sorted((item["path"], item["sha256"]) for item in manifest)
    return sha256_bytes("\n".join(f"{path}\t{digest}" for path, digest in pairs).encode())


def log_object_key(execution_id: str) -> str:
    return f"logs/{execution_id}.jsonl"
