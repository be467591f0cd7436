"""Checking a run's submission before anything of it is stored, the same for a single
execution and a batch: the script and its name, the runtime, the limits asked for within
the operator's, the requirements, the inputs and the shipped source tree. Every check raises
BadInput with one line naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from rgrid.core import cache_keys
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput
from rgrid.core.hashing import script_hash
from rgrid.core.spec import RunSpec
from rgrid.core.units import human_limit, parse_bytes
from rgrid.host.dependencies import check_sources
from rgrid.host.requirements import check_local_paths, inline_requirements, normalise
from rgrid.host.runtimes import resolve_runtime
from rgrid.store.blobs import check_uploaded
from rgrid.store.inputs import OUTPUTS_DIR, check_manifest
from rgrid.store.objectstore import ObjectStore
from rgrid.store.uploads import decode_inline, store_inline


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
    """A run's options as ``check_submission`` accepted them: what the row is made of."""

    timeout_s: int
    memory_bytes: int
    cpus: float
    requirements: str
    inputs: list[dict]
    sources: list[dict]
    module: str | None
    dependency_source: str | None


def check_submission(
    session: Session,
    settings: Settings,
    account_id: int,
    spec: RunSpec,
    store: ObjectStore | None = None,
) -> CheckedSubmission:
    """Every check a run's options get before anything is stored, the same for a single
    execution and a batch (BadInput on the first that fails). Inputs must already be stored
    blobs of this account, or come ``inline`` (then stored in ``store``, last of all)."""
    timeout = validate_submission(
        settings, spec.script, spec.script_name, spec.runtime, spec.timeout_s
    )
    memory_bytes, cpu_limit = resolve_limits(settings, spec.memory, spec.cpus)
    normalised = requirements_for(spec.script, spec.requirements, spec.runtime)
    # The embedded default's "worker host" is the user's own machine: its folders are theirs.
    check_local_paths(normalised, settings.allow_local_find_links or settings.embedded)
    if settings.database_url:
        check_sources(settings, normalised)
    manifest = check_manifest(spec.inputs or [], settings)
    if any(item["path"] == spec.script_name for item in manifest):
        # Both would be /work/<name>: the script sits beside its inputs, as it does locally.
        raise BadInput(f"an input has the script's own name {spec.script_name}")
    tree = check_source_tree(settings, spec.sources, spec.script_name, manifest)
    check_args(spec.args)
    check_counts(spec.files_uploaded, spec.bytes_uploaded)
    module = check_module(spec.module, spec.script_name)
    label = check_label(spec.dependency_source)
    if spec.inline:
        # Last, once everything else is accepted: these are stored now, as uploads would
        # have been before the submission.
        assert store is not None
        referenced = {item["sha256"] for item in manifest + tree}
        files = decode_inline(settings, spec.inline, referenced)
        store_inline(session, store, account_id, files, settings.blob_presence_ttl_s)
    check_uploaded(session, account_id, manifest + tree)
    return CheckedSubmission(
        timeout, memory_bytes, cpu_limit, normalised, manifest, tree, module, label
    )


def check_counts(files_uploaded: object, bytes_uploaded: object) -> None:
    """What the client says it uploaded for the run (kept for `status`): two counts."""
    counts = (files_uploaded, bytes_uploaded)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in counts):
        raise BadInput("files_uploaded and bytes_uploaded must be counts")


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
