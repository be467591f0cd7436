"""What holds a running execution: the watch beside its script (the worker's lease renewed,
the sandbox stopped on a cancel) and the host-wide lock that lets one run step at a time
run it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rgrid.core import lifecycle
from rgrid.host import sandbox, sandbox_container
from rgrid.pipeline.rows import optional_row

if TYPE_CHECKING:
    from rgrid.pipeline.context import PipelineContext

log = logging.getLogger(__name__)


class RunWatch:
    """Beside a running script: renews the worker's lease on the execution row (so a lost
    worker is noticed within ``settings.lease_s``) and stops the sandbox as soon as a cancel
    is requested, from this process or any other."""

    INTERVAL_S = 0.5

    def __init__(self, ctx: PipelineContext, execution_id: str, box: sandbox.Box):
        self.ctx, self.execution_id, self.box = ctx, execution_id, box
        self.cancelled = False
        #: Set with ``cancelled``: a runner waiting on the sandbox stops waiting.
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rgrid-run-watch", daemon=True)

    def __enter__(self) -> RunWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        renew_every = max(1.0, self.ctx.settings.lease_s / 6)
        renewed = time.monotonic()
        while not self._stop.wait(self.INTERVAL_S):
            try:
                with optional_row(self.ctx, self.execution_id) as row:
                    if row is None:
                        return
                    if row.cancel_requested:
                        self.cancelled = True
                        sandbox_container.kill(self.ctx.docker, self.box)
                        self.stopped.set()
                        return
                    if time.monotonic() - renewed >= renew_every:
                        lifecycle.renew_lease(row)
                        renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - a blip must not stop the watch; next tick retries
                log.warning("could not check execution %s", self.execution_id, exc_info=True)


class RunElsewhere(Exception):
    """Another copy of this execution's run step is running on this host (a redelivered task
    beside the one still alive): this copy does nothing."""


@contextmanager
def run_lock(ctx: PipelineContext, execution_id: str) -> Iterator[None]:
    """One run step per execution at a time on this host, across processes: a flock, so a
    killed holder lets go at once and its redelivered step can take over. Raises
    ``RunElsewhere`` when another holds it."""
    import fcntl

    folder = ctx.settings.run_locks_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{execution_id}.lock"
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunElsewhere(execution_id) from None
        try:
            yield
        finally:
            # Unlinked while held: a copy waiting on this file finds the execution over
            # once it gets it (it looks after locking), so a new file is harmless.
            path.unlink(missing_ok=True)
