"""The output cache's action key: the parts a sandboxed run's result is a function of (the
runtime and its image, the requirements and their resolution, the source tree, the inputs,
the arguments, the ``--env`` values' digests, the working-directory layout and the operator's
salt), stored on each execution for `rgrid why`, and the key over them
(``cache_keys.action_key``).

The key is computed twice: at submission from what the run *will* get (the runtime image the
grid last ran, the resolution the dependency cache holds), to look it up; and when the run
succeeds, from what it *did* get, to record it (rgrid/pipeline/reuse.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.hashing import sha256_bytes
from rgrid.core.models import DependencyCache, Execution

#: The parts of an action key that must all be known for a lookup or a record.
REQUIRED_PARTS = ("runtime_image", "resolution")


def _env_key(settings: Settings) -> bytes:
    """The server-side key the ``--env`` values are hashed with: derived from
    ``RGRID_SECRET_KEY`` (a key of its own, so a digest reveals nothing about the key that
    encrypts the values in Redis); without one (the embedded default), a random key kept in
    the data folder, readable by its user only."""
    if settings.secret_key:
        return hmac.new(
            settings.secret_key.encode(), b"rgrid action-cache env values v1", hashlib.sha256
        ).digest()
    path = Path(settings.data_dir) / "action-cache.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    try:
        os.link(partial, path)  # the first writer wins; a racing one reads its key
    except FileExistsError:
        partial.unlink()
        return bytes.fromhex(path.read_text().strip())
    partial.unlink()
    return key


def env_digests(settings: Settings, env: dict[str, str] | None) -> dict[str, str]:
    """Each ``--env`` name with an HMAC of its value: never the value, never a plain hash of
    it (a short secret's plain hash is one dictionary lookup away)."""
    if not env:
        return {}
    key = _env_key(settings)
    return {
        name: hmac.new(key, f"{name}={value}".encode(), hashlib.sha256).hexdigest()
        for name, value in sorted(env.items())
    }


def _dependency_hash(execution: Execution) -> str:
    from rgrid.host.requirements import dependency_hash, normalise

    return execution.dependency_hash or dependency_hash(normalise(execution.requirements or ""))


def resolution(execution: Execution, resolved: list[str] | None) -> str | None:
    """The installed environment's resolution hash ("" with no dependencies); None: not
    known (never resolved, or --refresh-deps resolves again)."""
    if not cache_keys.has_dependencies(_dependency_hash(execution)):
        return ""
    if resolved is None:
        return None
    from rgrid.host.dependencies import resolution_hash
    from rgrid.host.runtimes import resolve_runtime

    return resolution_hash(resolve_runtime(execution.runtime), execution.requirements, resolved)


def key_parts(
    settings: Settings,
    execution: Execution,
    *,
    runtime_image: str | None,
    resolution: str | None,
    env: dict[str, str],
) -> dict:
    """The action key's parts, as stored on the execution for `rgrid why`: digests and names
    only. ``runtime_image`` or ``resolution`` None: not known yet, so no key."""
    return {
        "runtime": execution.runtime,
        "runtime_image": runtime_image,
        "requirements": _dependency_hash(execution),
        "resolution": resolution,
        "source": cache_keys.source_key(execution.source_digest, execution.script_hash),
        "inputs": execution.input_hash or "",
        "args": sha256_bytes(json.dumps(list(execution.args or [])).encode()),
        "env": env,
        "workdir": f"{cache_keys.WORKDIR_LAYOUT}:{execution.script_name}",
        "salt": sha256_bytes(settings.action_cache_salt.encode())[:16],
    }


def key_of(settings: Settings, account_id: int, parts: dict | None) -> str | None:
    if parts is None or any(parts.get(name) is None for name in REQUIRED_PARTS):
        return None
    return cache_keys.action_key(account_id, settings.action_cache_salt, parts)


def known_resolution(session: Session, execution: Execution) -> tuple[list | None, str | None]:
    """(pins, environment folder) of the dependency cache's entry for the run, if any."""
    dep_hash = _dependency_hash(execution)
    if not cache_keys.has_dependencies(dep_hash) or execution.refresh_deps:
        return None, None
    row = session.execute(
        select(DependencyCache.resolved, DependencyCache.environment).where(
            DependencyCache.account_id == execution.account_id,
            DependencyCache.runtime == execution.runtime,
            DependencyCache.dependency_hash == dep_hash,
        )
    ).first()
    return (list(row.resolved), row.environment) if row else (None, None)
