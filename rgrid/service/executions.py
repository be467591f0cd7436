"""Submitting and reading executions, for the API and the embedded default alike."""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput, LostFromStore, NotFound
from rgrid.core.hashing import script_hash
from rgrid.core.models import Execution, iso_utc
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.core.units import human_limit, parse_bytes
from rgrid.host.dependencies import check_sources
from rgrid.host.requirements import check_local_paths, inline_requirements, normalise
from rgrid.host.runtimes import DEFAULT_RUNTIME, resolve_runtime
from rgrid.store.blobs import blobs_for, check_uploaded
from rgrid.store.inputs import OUTPUTS_DIR, check_manifest
from rgrid.store.logbuffer import LogBuffer, LogChunk, iter_buffered, iter_log, stored_size
from rgrid.store.objectstore import ObjectStore, exists_many
from rgrid.store.uploads import decode_inline, store_inline

#: A log page carries at most this many chunks and about this much text, so neither the API
#: nor the CLI ever holds a whole log in memory, however large.
LOG_PAGE_CHUNKS = 512
#: The most one ``GET /logs`` page carries, in stored bytes (plus at most one chunk).
LOG_PAGE_BYTES = 1024**2
#: The shortest execution id prefix accepted in place of the whole id.
MIN_ID_PREFIX = 4


def new_execution_id() -> str:
    return secrets.token_hex(8)


def validate_submission(
    settings: Settings, script: str, script_name: str, runtime: str, timeout_s: int | None
) -> int:
    """Check what a user sent; returns the timeout to use."""
    try:
        size = len(script.encode())
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON can carry
        raise BadInput("script is not valid Unicode text") from exc
    if size > settings.max_script_bytes:
        raise BadInput(f"script is larger than {settings.max_script_bytes} bytes")
    # A relative path: the entry script's place in its project (``sub/main.py``).
    parts = script_name.split("/") if isinstance(script_name, str) else [""]
    if (
        not script_name
        or len(script_name) > 255
        or any(part in ("", ".", "..") for part in parts)
        or parts[0] == OUTPUTS_DIR
        or "\\" in script_name
        or any(ord(c) < 32 for c in script_name)
    ):
        raise BadInput(f"bad script name {script_name!r}")
    resolve_runtime(runtime)
    if timeout_s is None:
        return settings.default_timeout_s
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int):
        raise BadInput("timeout_s must be a whole number of seconds")
    if not 1 <= timeout_s <= settings.max_timeout_s:
        raise BadInput(f"timeout must be between 1 and {settings.max_timeout_s} seconds")
    return timeout_s


#: What a script's argument list may add up to (Linux's ARG_MAX is 2 MiB with the env).
MAX_ARGS_BYTES = 1024 * 1024


def check_args(args: object) -> None:
    if args is None:
        return
    if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
        raise BadInput("args must be a list of strings without NUL characters")
    if sum(len(a.encode(errors="replace")) + 1 for a in args) > MAX_ARGS_BYTES:
        raise BadInput(f"args add up to more than {MAX_ARGS_BYTES // 1024} KiB")


def resolve_limits(
    settings: Settings, memory: str | int | None, cpus: float | None
) -> tuple[int, float]:
    """The memory (bytes) and CPUs a run gets: what the user asked for, within the operator's
    maximums, else the operator's defaults."""
    most_memory = parse_bytes(settings.max_memory_limit, "RGRID_MAX_MEMORY")
    if memory is None:
        memory_bytes = parse_bytes(settings.memory_limit, "RGRID_MEMORY_LIMIT")
    else:
        if isinstance(memory, bool) or not isinstance(memory, str | int):
            raise BadInput("memory must be a size such as 512m or 2g")
        memory_bytes = memory if isinstance(memory, int) else parse_bytes(memory, "memory")
        if not 32 * 1024**2 <= memory_bytes <= most_memory:
            raise BadInput(f"memory must be between 32 MiB and {human_limit(most_memory)}")
    if cpus is None:
        return memory_bytes, settings.cpu_limit
    if isinstance(cpus, bool) or not isinstance(cpus, int | float):
        raise BadInput("cpus must be a number such as 0.5 or 2")
    if not 0.01 <= cpus <= settings.max_cpu_limit:
        raise BadInput(f"cpus must be between 0.01 and {settings.max_cpu_limit:g}")
    return memory_bytes, float(cpus)


def requirements_for(script: str, requirements: str | None, runtime: str) -> str:
    """The normalised requirements, from a requirements text or the script's PEP 723 block."""
    inline = inline_requirements(script, resolve_runtime(runtime).python_version)
    if requirements is not None and inline is not None:
        raise BadInput(
            "the script has inline '# /// script' dependencies and -r was given: use one of them"
        )
    return normalise(requirements if requirements is not None else inline or "")


def store_script(
    store: ObjectStore, account_id: int, script: str, presence_ttl_s: float = 0
) -> str:
    """Store the script under its content hash (once per account); returns the hash."""
    from rgrid.store.objectstore import all_exist

    data = script.encode()
    digest = script_hash(data)
    key = cache_keys.script_object_key(account_id, digest)
    if not all_exist(store, [key], presence_ttl_s)[0]:
        store.put_bytes(key, data)
    return digest


@dataclass(frozen=True)
class CheckedSubmission:
    """A script's options as ``check_submission`` accepted them: what the row is made of."""

    timeout_s: int
    memory_bytes: int
    cpus: float
    requirements: str
    inputs: list[dict]
    sources: list[dict]


def check_submission(
    session: Session,
    settings: Settings,
    account_id: int,
    *,
    script: str,
    script_name: str,
    runtime: str,
    timeout_s: int | None,
    args: list[str] | None,
    requirements: str | None,
    inputs: list[dict] | None,
    memory: str | int | None,
    cpus: float | None,
    sources: list[dict] | None = None,
    inline: list[dict] | None = None,
    store: ObjectStore | None = None,
) -> CheckedSubmission:
    """Every check a script's options get before anything is stored, the same for a single
    execution and a batch (BadInput on the first that fails). Inputs must already be stored
    blobs of this account."""
    timeout = validate_submission(settings, script, script_name, runtime, timeout_s)
    memory_bytes, cpu_limit = resolve_limits(settings, memory, cpus)
    normalised = requirements_for(script, requirements, runtime)
    # The embedded default's "worker host" is the user's own machine: its folders are theirs.
    check_local_paths(normalised, settings.allow_local_find_links or settings.embedded)
    if settings.database_url:
        check_sources(settings, normalised)
    manifest = check_manifest(inputs or [], settings)
    if any(item["path"] == script_name for item in manifest):
        # Both would be /work/<name>: the script sits beside its inputs, as it does locally.
        raise BadInput(f"an input has the script's own name {script_name}")
    tree = check_source_tree(settings, sources, script_name, manifest)
    check_args(args)
    if inline:
        # Last, once everything else is accepted: these are stored now, as uploads would
        # have been before the submission.
        assert store is not None
        referenced = {item["sha256"] for item in manifest + tree}
        files = decode_inline(settings, inline, referenced)
        store_inline(session, store, account_id, files, settings.blob_presence_ttl_s)
    check_uploaded(session, account_id, manifest + tree)
    return CheckedSubmission(timeout, memory_bytes, cpu_limit, normalised, manifest, tree)


def check_source_tree(
    settings: Settings, sources: object, script_name: str, manifest: list[dict]
) -> list[dict]:
    """The shipped modules: safe unique paths and real digests (as inputs), within the source
    tree's bounds, and none where an input or the script goes."""
    if sources is None:
        return []
    tree = check_manifest(sources, settings)
    if len(tree) >= settings.max_source_files:
        raise BadInput(f"more than {settings.max_source_files} source files")
    if sum(item["size"] for item in tree) > settings.max_source_bytes:
        raise BadInput(f"source files total over the limit of {settings.max_source_bytes} bytes")
    taken = {item["path"] for item in manifest} | {script_name}
    clash = next((item["path"] for item in tree if item["path"] in taken), None)
    if clash:
        raise BadInput(f"the shipped module {clash} has the name of an input or the script")
    names = taken | {item["path"] for item in tree}
    for name in names:
        parent = next((str(p) for p in PurePosixPath(name).parents if str(p) in names), None)
        if parent:
            raise BadInput(f"{parent} is both a file and the folder of {name}")
    return tree


def tree_digest(
    script_name: str, script_digest: str, tree: list[dict], module: str | None = None
) -> str:
    """The source-tree digest: the entry script at its path and every shipped module."""
    entry = {"path": script_name, "sha256": script_digest}
    return cache_keys.source_tree_digest([entry, *tree], module)


def check_label(text: object) -> str | None:
    """A short printable label (where the dependencies were found), or None."""
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > 300 or any(ord(c) < 32 for c in text):
        raise BadInput("dependency_source must be a short line of text")
    return text


def check_module(module: object, script_name: str) -> str | None:
    """``-m``: a dotted name whose file is the entry script (``pkg/mod.py`` or
    ``pkg/mod/__main__.py``), so the name cannot point the run at anything else."""
    if module is None:
        return None
    parts = module.split(".") if isinstance(module, str) else []
    if not parts or not all(part.isidentifier() for part in parts) or len(module) > 255:
        raise BadInput("module must be a dotted module name")
    path = "/".join(parts)
    if script_name not in (f"{path}.py", f"{path}/__main__.py"):
        raise BadInput(f"module {module} is not the script {script_name}")
    return module


def create_execution(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    *,
    account_id: int,
    script: str,
    script_name: str,
    runtime: str = DEFAULT_RUNTIME,
    timeout_s: int | None = None,
    args: list[str] | None = None,
    requirements: str | None = None,
    refresh_deps: bool = False,
    inputs: list[dict] | None = None,
    files_uploaded: int = 0,
    bytes_uploaded: int = 0,
    memory: str | int | None = None,
    cpus: float | None = None,
    stdin: bool = False,
    env_names: list[str] | None = None,
    sources: list[dict] | None = None,
    module: str | None = None,
    dependency_source: str | None = None,
    inline: list[dict] | None = None,
) -> Execution:
    """Store the script (content-addressed) and write the execution row; the caller commits and
    only then enqueues the pipeline. Inputs must already be stored blobs of this account, or
    come ``inline`` (``{sha256, data}``, base64: small files in the submission's body)."""
    checked = check_submission(
        session,
        settings,
        account_id,
        script=script,
        script_name=script_name,
        runtime=runtime,
        timeout_s=timeout_s,
        args=args,
        requirements=requirements,
        inputs=inputs,
        memory=memory,
        cpus=cpus,
        sources=sources,
        inline=inline,
        store=store,
    )
    counts = (files_uploaded, bytes_uploaded)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in counts):
        raise BadInput("files_uploaded and bytes_uploaded must be counts")
    manifest = checked.inputs
    module = check_module(module, script_name)
    digest = store_script(store, account_id, script, settings.blob_presence_ttl_s)
    execution = Execution(
        id=new_execution_id(),
        account_id=account_id,
        status="queued",
        runtime=runtime,
        script_name=script_name,
        script_hash=digest,
        args=list(args or []),
        requirements=checked.requirements,
        refresh_deps=bool(refresh_deps),
        inputs=manifest,
        input_hash=cache_keys.input_hash(manifest) if manifest else None,
        sources=checked.sources or None,
        source_digest=tree_digest(script_name, digest, checked.sources, module),
        module=module,
        dependency_source=check_label(dependency_source),
        input_cache_hit=bool(manifest) and files_uploaded == 0,
        files_uploaded=files_uploaded,
        timeout_s=checked.timeout_s,
        memory_bytes=checked.memory_bytes,
        cpus=checked.cpus,
        stdin=bool(stdin),
        env_names=sorted(env_names) if env_names else None,
        script_cache_hit=False,
        dependency_cache_hit=None,
        bytes_uploaded=bytes_uploaded,
        outputs=[],
    )
    session.add(execution)
    session.flush()
    return execution


def get_execution(session: Session, account_id: int, execution_id: str) -> Execution:
    """By id, by a unique prefix of one (at least four characters, as git takes them), or
    ``last``: the account's newest. Another account's execution is simply not found: no
    account learns of another's work."""
    mine = select(Execution).where(Execution.account_id == account_id)
    if execution_id == "last":
        execution = session.scalars(mine.order_by(Execution.created_at.desc()).limit(1)).first()
        if execution is None:
            raise NotFound("no executions yet")
        return execution
    if re.fullmatch(f"[0-9a-f]{{{MIN_ID_PREFIX},15}}", execution_id):
        found = list(session.scalars(mine.where(Execution.id.startswith(execution_id)).limit(2)))
        if len(found) > 1:
            raise BadInput(f"{execution_id} is the start of more than one execution id")
        if found:
            return found[0]
        raise NotFound(f"no execution {execution_id}")
    execution = session.get(Execution, execution_id)
    if execution is None or execution.account_id != account_id:
        raise NotFound(f"no execution {execution_id}")
    return execution


def list_executions(
    session: Session, account_id: int, limit: int = 20, standalone: bool = False
) -> list[Execution]:
    """The account's newest executions; ``standalone``: only those of no batch (a listing
    shows each batch as one row of its own)."""
    query = select(Execution).where(Execution.account_id == account_id)
    if standalone:
        query = query.where(Execution.batch_id.is_(None))
    return list(
        session.scalars(query.order_by(Execution.created_at.desc()).limit(max(1, min(limit, 500))))
    )


def duration_s(execution: Execution) -> float | None:
    if execution.finished_at is None:
        return None
    created, finished = execution.created_at, execution.finished_at
    if (created.tzinfo is None) != (finished.tzinfo is None):  # SQLite drops the zone
        created, finished = created.replace(tzinfo=None), finished.replace(tzinfo=None)
    return round((finished - created).total_seconds(), 3)


def execution_to_dict(execution: Execution) -> dict:
    return {
        "execution_id": execution.id,
        "status": execution.status,
        "exit_code": execution.exit_code,
        "error": execution.error,
        # What the stored log lacks, if anything (None: it is complete).
        "log_incomplete": execution.log_incomplete,
        "runtime": execution.runtime,
        "script_name": execution.script_name,
        "script_hash": execution.script_hash,
        "dependency_hash": execution.dependency_hash,
        "environment": execution.environment,
        "runtime_image": execution.runtime_image,
        "host": execution.host,
        "sandbox_warm": execution.sandbox_warm,
        "resolved_dependencies": execution.resolved_dependencies,
        "refresh_deps": execution.refresh_deps,
        "input_hash": execution.input_hash,
        "inputs": execution.inputs,
        "source_digest": execution.source_digest,
        "sources": execution.sources or [],
        "module": execution.module,
        "dependency_source": execution.dependency_source,
        "files_uploaded": execution.files_uploaded,
        "args": execution.args,
        "timeout_s": execution.timeout_s,
        "memory_bytes": execution.memory_bytes,
        "cpus": execution.cpus,
        "stdin": execution.stdin,
        "env_names": execution.env_names or [],
        "batch_id": execution.batch_id,
        # A cache that does not apply (no dependencies, no inputs) is null, not a miss.
        "script_cache_hit": execution.script_cache_hit,
        "dependency_cache_hit": execution.dependency_cache_hit
        if cache_keys.has_dependencies(execution.dependency_hash)
        else None,
        "input_cache_hit": execution.input_cache_hit if execution.inputs else None,
        "bytes_uploaded": execution.bytes_uploaded,
        "deps_build_s": execution.deps_build_s,
        "run_s": execution.run_s,
        "duration_s": duration_s(execution),
        "outputs": execution.outputs,
        # Instant repeats (rgrid/pipeline/reuse.py): the run this one was answered from, and whether
        # the output cache was looked up (None: not asked) and hit.
        "reused_from": execution.reused_from,
        "output_cache_hit": execution.output_cache_hit,
        "created_at": iso_utc(execution.created_at),
        "started_at": iso_utc(execution.started_at),
        "finished_at": iso_utc(execution.finished_at),
    }


def _page(chunks: Iterator[LogChunk]) -> list[LogChunk]:
    """Chunks up to the page's limits, counted in stored (JSON) bytes, which is what the
    answer carries: a page of control bytes is six times its text."""
    page: list[LogChunk] = []
    size = 0
    for chunk in chunks:
        page.append(chunk)
        size += stored_size(*chunk)
        if len(page) >= LOG_PAGE_CHUNKS or size >= LOG_PAGE_BYTES:
            break
    return page


def replayed_log(source_id: str, stream) -> Iterator[LogChunk]:
    """A reused execution's log: one note saying so, then the script's own output from the
    original's log (its notes on caches and sandboxes were about a run that this was not)."""
    yield ("system", f"reused {source_id}: its output replayed; the script did not run\n")
    for chunk in iter_log(stream):
        if chunk[0] in ("stdout", "stderr"):
            yield chunk


def read_logs(execution: Execution, logs: LogBuffer, store: ObjectStore, offset: int = 0) -> dict:
    """One page of log chunks from ``offset`` on. ``complete`` is true once the final log is
    stored and this page reaches its end, so a follower knows it has seen everything."""
    finished = execution.status in TERMINAL_STATUSES
    more = False
    chunks: list[LogChunk]
    if finished:
        try:
            # A reused execution replays the log of the run it was answered from.
            source = execution.reused_from or execution.id
            stream = store.open_stream(cache_keys.log_object_key(source))
            with contextlib.closing(stream):
                stored = (
                    itertools.islice(replayed_log(execution.reused_from, stream), offset, None)
                    if execution.reused_from
                    else iter_log(stream, skip=offset)
                )
                chunks = _page(stored)
                more = next(stored, None) is not None
        except NotFound:
            if execution.log_stored:
                raise LostFromStore.log(execution.id) from None
            chunks = []  # it ended before any step ran (and wrote a log)
    else:
        chunks = _page(iter_buffered(logs, execution.id, offset))
    return {
        "status": execution.status,
        "complete": finished and not more,
        "offset": offset,
        "next_offset": offset + len(chunks),
        "chunks": [list(chunk) for chunk in chunks],
    }


def lost_objects(session: Session, execution: Execution, store: ObjectStore) -> dict:
    """What the object store no longer has of this execution although it was stored: whether
    its log is lost, and which outputs are (a lost pack: every output in it). One HEAD request
    per object, so only on request (`rgrid status`), never on a run's path."""
    log_lost = execution.log_stored and not store.exists(cache_keys.log_object_key(execution.id))
    outputs = execution.outputs or []
    blobs = blobs_for(session, execution.account_id, [o["sha256"] for o in outputs])
    present = exists_many(store, [blob.object_key for blob in blobs.values()])
    lost = [
        output["path"]
        for output in outputs
        if (blob := blobs.get(output["sha256"])) is None or not present[blob.object_key]
    ]
    return {"log_lost": bool(log_lost), "lost_outputs": lost}


def output_listing(session: Session, execution: Execution, store: ObjectStore) -> dict:
    """Where to fetch each output: ``outputs``, each with a presigned URL (or, for a local
    store, the key) of its own object, or, packed with other small outputs, the index of its
    pack in ``packs`` and its offset there; ``packs``, each pack once with its URL and key.
    A client fetches a pack's outputs with one (ranged) GET and splits it, instead of one GET
    per output; one URL is signed per pack, not per output."""
    listing = []
    packs: dict[str, int] = {}
    pack_list: list[dict] = []
    outputs = execution.outputs or []
    # One query for them all: a run may leave 100,000 files (issue 24).
    stored = blobs_for(session, execution.account_id, [output["sha256"] for output in outputs])
    for output in outputs:
        blob = stored.get(output["sha256"])
        if blob is None:
            raise NotFound(f"output {output['path']} is no longer stored")
        if blob.pack_offset is None:
            listing.append(
                {**output, "key": blob.object_key, "url": store.download_url(blob.object_key)}
            )
            continue
        if blob.object_key not in packs:
            packs[blob.object_key] = len(pack_list)
            pack_list.append({"key": blob.object_key, "url": store.download_url(blob.object_key)})
        listing.append({**output, "pack": packs[blob.object_key], "offset": blob.pack_offset})
    return {"outputs": listing, "packs": pack_list}
