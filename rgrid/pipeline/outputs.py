"""An ended run's output files: collected from its sandbox while the folder is held against
this host's sweepers, and stored as blobs of the account within the run's time limit."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rgrid.core.models import Execution
from rgrid.host import sandbox, sandbox_files
from rgrid.pipeline.rows import patiently
from rgrid.pipeline.watch import RunWatch
from rgrid.store import blobs

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext


def store_outputs(
    ctx: PipelineContext,
    execution: Execution,
    box: sandbox.Box,
    outputs: list[dict],
    store_by: float,
    contents: dict[str, bytes] | None = None,
) -> None:
    """Outputs are blobs of the account too: a file some run already produced is not stored
    twice, and thousands of small ones are stored many at a time (``blobs.store_outputs``).
    Past ``store_by`` (a ``time.monotonic()``) the run is over its time limit: the outputs
    are not recorded, so none of them is half there for the user."""
    folder = str(sandbox_files.output_path(box, "")).rstrip("/")
    blobs.store_outputs(
        ctx.session_factory,
        ctx.store,
        execution.account_id,
        # Strings, not a Path per output: 10,000 of those cost most of a second.
        [(f"{folder}/{output['path']}", output["sha256"], output["size"]) for output in outputs],
        contents={f"{folder}/{path}": data for path, data in (contents or {}).items()},
        store_by=store_by,
        on_late=lambda: sandbox.OutputLimitExceeded(
            f"time limit {execution.timeout_s}s reached while storing {len(outputs)} outputs"
        ),
    )


#: While a run's outputs are read, its sandbox folder's mtime is renewed this often.
HOLD_EVERY_S = 10.0


@dataclasses.dataclass
class _HeldBox(sandbox.Box):
    """An ended sandbox whose ``/work`` is reached through a descriptor held open on it."""

    work_fd: int = -1

    @property
    def work(self) -> Path:
        return Path(f"/proc/self/fd/{self.work_fd}")


@contextlib.contextmanager
def holding(box: sandbox.Box) -> Iterator[sandbox.Box]:
    """The ended sandbox, held while its outputs are collected and stored. Its container is
    gone by then, and sweepers on this host delete or unmount a folder with no live
    container: ``pool.sweep_folders`` once its mtime is a minute old (renewed here), and any
    installation's ``pool.release_orphaned_disks`` (a test session's end: at once). Storing
    10,000 outputs took longer than either. The yielded box reads ``/work`` through a
    descriptor held on it, which keeps a lazily unmounted filesystem alive and reachable."""
    stop = threading.Event()

    def renew() -> None:
        while True:
            with contextlib.suppress(OSError):
                os.utime(box.host_dir)
            if stop.wait(HOLD_EVERY_S):
                return

    thread = threading.Thread(target=renew, name="rgrid-hold-outputs", daemon=True)
    thread.start()
    try:
        fd = os.open(box.work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        fd = None  # then collecting says what is wrong with the folder
    try:
        if fd is None:
            yield box
        else:
            yield _HeldBox(box.name, box.container_id, box.host_dir, work_fd=fd)
    finally:
        if fd is not None:
            os.close(fd)
        stop.set()
        thread.join()


#: Storing outputs may take this much past the run's own time limit.
OUTPUT_STORE_GRACE_S = 60.0


def collect_and_store(
    ctx: PipelineContext, execution: Execution, box: sandbox.Box, result: sandbox.RunResult
) -> list[dict]:
    """The outputs of the ended run, collected and stored; raises
    ``sandbox.OutputLimitExceeded`` when they are over a limit or past the time to store them.

    Collecting and storing outputs count within the run's own time limit (with a grace for
    a run that used all of it), so a flood of outputs cannot hold the slot."""
    store_by = time.monotonic() + max(0.0, execution.timeout_s - result.run_s)
    store_by += OUTPUT_STORE_GRACE_S
    # The watch renews the lease meanwhile: storing 2,000 outputs outlasted the e2e
    # stack's 4 s lease, and its sweep called the worker lost.
    with holding(box) as held, RunWatch(ctx, execution.id, box):
        # Small files' bytes are kept as they are hashed: packing them reads none again.
        contents: dict[str, bytes] = {}
        outputs = sandbox_files.collect_outputs(
            held,
            ctx.limits,
            result.notes,
            keep=contents,
            keep_at_most=blobs.PACK_MAX_BLOB_BYTES,
            keep_bytes=blobs.PACKS_AT_ONCE * blobs.PACK_TARGET_BYTES,
        )
        for note in result.notes:
            ctx.note(execution.id, note)
        patiently(lambda: store_outputs(ctx, execution, held, outputs, store_by, contents))
    return outputs
