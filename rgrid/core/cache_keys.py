"""Every cache key and every name derived from one, in one place (docs/design.md, "Cache keys").

Keys include the account so that no account can learn whether another ran a script, and the
script cache's key (its table's unique columns: account, runtime, dependency hash, script hash)
includes the dependency hash so that a script never gets another requirements set's
environment.

Besides the cache keys: every Redis key RGrid writes (see "Redis keys") and every Docker label
it puts on a container or image (see "Docker labels"). They are here for the same reason: a
running grid finds its state by these exact strings, so each is spelled once and a change to
one is seen as what it is, a change of what every host and the API agree on.
"""

from __future__ import annotations

import hashlib
import json

from rgrid.core.hashing import sha256_bytes

KEY_SEPARATOR = "\x1f"

#: The dependency hash of a script with no requirements (the normalised empty set).
EMPTY_DEPENDENCY_HASH = sha256_bytes(b"")


def has_dependencies(dependency_hash: str | None) -> bool:
    return dependency_hash not in (None, EMPTY_DEPENDENCY_HASH)


def dependency_cache_key(account_id: int, runtime: str, dependency_hash: str) -> str:
    return sha256_bytes(
        KEY_SEPARATOR.join(("deps", str(account_id), runtime, dependency_hash)).encode()
    )


def environment_name(account_id: int, resolution_hash: str) -> str:
    """The folder an installed dependency set lives in on a worker host. Named by what is
    installed, not by the requirements text: two texts that resolve to the same pins share
    one folder. Still per account, so no account can time another's cache."""
    key = sha256_bytes(KEY_SEPARATOR.join(("env", str(account_id), resolution_hash)).encode())
    return key[:32]


def script_local_name(account_id: int, script_hash: str) -> str:
    """A verified script in a worker host's local cache: a script cache hit fetches nothing."""
    return f"scripts/{account_id}/{script_hash}.py"


def build_lock_name(cache_key: str) -> str:
    """Single-flight lock: one build per key at a time across the grid."""
    return f"rgrid:build-lock:{cache_key}"


def host_build_lock_name(cache_key: str, host: str) -> str:
    """Installing an already resolved set: one install per key at a time on each host."""
    return f"rgrid:build-lock:{cache_key}:host:{host}"


def script_object_key(account_id: int, script_hash: str) -> str:
    return f"scripts/{account_id}/{script_hash}.py"


def blob_object_key(account_id: int, name: str) -> str:
    """Where a blob's bytes live. ``name`` is an upload's id, not the digest: the bytes are
    only trusted through the Blob row written after their digest was checked."""
    return f"blobs/{account_id}/{name}"


#: Where packs of small outputs live (rgrid/store/output_blobs.py).
PACK_PREFIX = "packs/"


def pack_object_key(account_id: int, name: str) -> str:
    """A pack: many small blobs of one account back to back, each found by its row's offset
    and size. ``name`` is random: only the rows written after the pack's PUT say what it
    holds."""
    return f"{PACK_PREFIX}{account_id}/{name}"


def blob_content_key(account_id: int, digest: str) -> str:
    """Where an uploaded blob's bytes live once the server has checked them against their
    digest. Only the server writes here (a server-side copy): no presigned URL names it."""
    return f"blobs/{account_id}/{digest}"


#: Where presigned uploads land, and the only keys a presigned URL ever names.
UPLOAD_STAGING_PREFIX = "uploads/"


def upload_staging_key(account_id: int, upload_id: str) -> str:
    """Where a presigned upload sends its bytes: checked and copied from here to
    ``blob_content_key``, then deleted. A URL reused later writes only here."""
    return f"{UPLOAD_STAGING_PREFIX}{account_id}/{upload_id}"


def input_hash(manifest: list[dict]) -> str:
    """The hash of the sorted manifest: renamed files are a new manifest but no new upload."""
    pairs = sorted((item["path"], item["sha256"]) for item in manifest)
    return sha256_bytes("\n".join(f"{path}\t{digest}" for path, digest in pairs).encode())


def source_tree_digest(manifest: list[dict], module: str | None = None) -> str:
    """The digest of a script's source tree (the entry script and the local modules it
    imports): sha256 over the sorted (relative path, file sha256) pairs, as a REAPI input root
    is a digest of its files. It is the script part of the script cache's key: editing any one
    module changes it, moving nothing changes it. A single script is the one-file tree."""
    pairs = sorted((item["path"], item["sha256"]) for item in manifest)
    lines = [f"source\t{path}\t{digest}" for path, digest in pairs]
    if module:  # run as `python -m`: another __main__, other relative imports
        lines.append(f"module\t{module}")
    return sha256_bytes("\n".join(lines).encode())


def source_key(source_digest: str | None, script_hash: str) -> str:
    """An execution's source part of the script cache's and the output cache's keys: its
    source-tree digest (a row written before source trees existed has only its script's
    hash)."""
    return source_digest or script_hash


def log_object_key(execution_id: str) -> str:
    return f"logs/{execution_id}.jsonl"


def purge_lock_name(queue: str) -> str:
    """One purge at a time per deployment (its queue names it: deployments and test sessions
    may share a Redis)."""
    return f"rgrid:purge:{queue}"


def upload_purge_lock_name(queue: str) -> str:
    """One purge of abandoned uploads at a time per deployment."""
    return f"rgrid:purge-uploads:{queue}"


def last_purge_key(queue: str) -> str:
    """Where the last purge's result waits for `rgrid cache stats` (Redis)."""
    return f"rgrid:last-purge:{queue}"


#: PostgreSQL advisory lock held by `rgrid admin migrate` (rgrid/core/db.py ``upgrade``): every
#: host may run it at once during an upgrade, and exactly one migrates while the others wait
#: and then find the schema current. A fixed 64-bit number (advisory locks are keyed by
#: integers, per database): the first 8 bytes of sha256("rgrid:migrate"), as a signed int.
MIGRATION_LOCK_ID = int.from_bytes(
    hashlib.sha256(b"rgrid:migrate").digest()[:8], "big", signed=True
)


def host_drained_key(queue: str, host: str) -> str:
    """Set while an operator drains ``host`` (`rgrid admin drain`): its worker stops taking
    from the shared queue and stops its heartbeat, so nothing new is sent its way, until
    `rgrid admin undrain`. Kept in Redis without expiry: it must outlive a worker restart."""
    return f"rgrid:{queue}:host-drained:{host}"


#: The working-directory layout a script runs in: /work/<script name>, its inputs at their
#: paths beside it, its outputs collected from /work/outputs. A new layout gets a new name,
#: which makes every earlier action key a miss.
WORKDIR_LAYOUT = "work-v1"


def action_key(account_id: int, salt: str, parts: dict) -> str:
    """The output cache's key (rgrid/pipeline/reuse.py): everything a sandboxed run's result is a
    function of. A sandbox has no network, so that is the account, the runtime image, the
    installed environment's resolution, the source, the inputs (paths and digests), the
    arguments, the ``--env`` names with a keyed hash of each value, and the working-directory
    layout; ``parts`` holds them (``reuse_key.key_parts``), ``salt`` is the operator's. Memory
    and CPU limits are not in it: a run they cut short never succeeded, so is never kept."""
    body = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(KEY_SEPARATOR.join(("action", str(account_id), salt, body)).encode())


def runtime_image_key(queue: str, runtime: str) -> str:
    """Redis: the image id the deployment's workers last ran ``runtime`` with, so the API can
    compute an action key without a Docker engine of its own."""
    return f"rgrid:{queue}:runtime-image:{runtime}"


# --- Redis keys --------------------------------------------------------------------------------
# Redis holds what a deployment's processes share for a while: hosts' heartbeats, which host has
# which environment, a run's environment variables and piped input on their way to the worker.
# A deployment's keys carry its queue name (deployments and test sessions may share a Redis);
# an execution's carry its id, unique across deployments. Workers of one version and the API of
# the next read each other's keys during an upgrade: values never change.


def deployment_keys_pattern(queue: str) -> str:
    """Every Redis key of one deployment (``SCAN`` pattern): what a test session or a bench
    run deletes when it is done with its queue name."""
    return f"rgrid:{queue}:*"


def host_alive_key(queue: str, host: str) -> str:
    """A worker host's heartbeat (rgrid/host/hosts.py): set with a TTL, renewed while its
    Docker engine answers; gone means the host is not chosen."""
    return f"rgrid:{queue}:host-alive:{host}"


def build_pool_alive_key(queue: str, host: str) -> str:
    """A host's build pool's heartbeat: installs are handed to its build queue only while it
    is set."""
    return f"rgrid:{queue}:build-pool-alive:{host}"


def environment_hosts_key(queue: str, environment: str) -> str:
    """The set of hosts that have ``environment`` installed (the warm-host preference)."""
    return f"rgrid:{queue}:env-hosts:{environment}"


def execution_env_key(execution_id: str) -> str:
    """A run's ``--env`` values, encrypted, from the API to the worker (rgrid/store/channels.py)."""
    return f"rgrid:env:{execution_id}"


def execution_stdin_key(execution_id: str) -> str:
    """A run's piped input, in chunks, from the API to the worker (rgrid/store/channels.py)."""
    return f"rgrid:stdin:{execution_id}"


# --- Docker labels -----------------------------------------------------------------------------
# Labels are how RGrid finds its own containers and images on an engine it shares with others:
# the reaper, the warm pool, the disk sweep and a restarted worker read them from containers a
# process of another version may have started, so their names never change.

#: Every container and volume RGrid creates carries this label, so leftovers can be reaped.
MANAGED_LABEL = "rgrid.managed"
#: The execution a container was started for (no warm sandbox was free).
EXECUTION_LABEL = "rgrid.execution"
#: Unix time after which an execution container is certainly abandoned (its timeout plus grace):
#: lets any reaper on the host remove it, even one whose database never heard of it.
DEADLINE_LABEL = "rgrid.deadline"
#: A warm sandbox's pool key (``pool.pool_key``): which executions it may be handed to.
POOL_LABEL = "rgrid.pool"
#: The host folder behind a sandbox's ``/work``: how its folder is found from its container.
HOST_DIR_LABEL = "rgrid.dir"
#: Unix time at which an unclaimed sandbox ends itself: a claim this close to it is not tried.
IDLE_UNTIL_LABEL = "rgrid.idle-until"
#: Which installation (API + workers of one deployment, or one embedded data folder) started
#: a sandbox: each keeps, counts and retires only its own.
INSTALLATION_LABEL = "rgrid.installation"
#: On a runtime image: the runtime it was built for.
RUNTIME_LABEL = "rgrid.runtime"


# --- live logs (rgrid/store/redis_logs.py) ----------------------------------------------------


def log_buffer_key(execution_id: str) -> str:
    """Redis: a running execution's log chunks, a list its workers append to and the API
    reads while the run is live (the stored log, ``log_object_key``, is the record after)."""
    return f"rgrid:log:{execution_id}"


def log_changed_channel(execution_id: str) -> str:
    """Redis pub/sub: where each change to a live log is announced, for its followers."""
    return f"rgrid:log-changed:{execution_id}"


def log_writers_key(execution_id: str) -> str:
    """Redis: each writer's last appended sequence number, so a retried append is stored once."""
    return f"rgrid:log-writers:{execution_id}"
