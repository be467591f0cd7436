"""Batches in the embedded default: the same batch rows and dispatch as on a server
(rgrid/service/batches.py), with the queue replaced by a pool of threads in this process, each
running one execution's whole pipeline at a time.

The batch's ``parallel`` bounds the threads (default: ``EMBEDDED_PARALLEL``); every row of
the batch is marked as this process's from the start, so if the process is killed, the next
`rgrid` on this machine ends what it left (``lost.recover_interrupted``).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from sqlalchemy import update

from rgrid.core.db import serialized_session_factory, session_scope
from rgrid.core.models import Execution
from rgrid.core.spec import RunSpec
from rgrid.host.docker_engine import get_docker
from rgrid.pipeline import reuse
from rgrid.pipeline.chain import run_all
from rgrid.pipeline.context import PipelineContext
from rgrid.service import batch_retry, batch_views, batches
from rgrid.service.cancelling import cancel

#: Executions run at once in process when --parallel is not given: the host's cores, at most 4.
EMBEDDED_PARALLEL = max(1, min(4, os.cpu_count() or 1))


class EmbeddedBatches:
    """Mixed into EmbeddedClient: the batch calls of RemoteClient, served in process. Whatever
    writes (the runs, dispatch, cancel, retry) goes through ``_writer``: the same services
    with transactions that take turns (``serialized_session_factory``)."""

    ctx: PipelineContext
    account_id: int
    _runner: ThreadPoolExecutor | None = None
    _writer_ctx: PipelineContext | None = None

    @property
    def _writer(self) -> PipelineContext:
        if self._writer_ctx is None:
            url = self.ctx.settings.effective_database_url
            self._writer_ctx = dataclasses.replace(
                self.ctx, session_factory=serialized_session_factory(url)
            )
        return self._writer_ctx

    def create_batch(
        self, spec: RunSpec, parallel: int | None = None, size: int | None = None
    ) -> dict:
        get_docker()  # Fail now, with one line, rather than after writing rows.
        with session_scope(self._writer.session_factory) as session:
            batch = batches.create_batch(
                session,
                self.ctx.store,
                self.ctx.settings,
                account_id=self.account_id,
                spec=spec,
                parallel=parallel or EMBEDDED_PARALLEL,
                size=size,
            )
            return batch_views.batch_to_dict(session, batch)

    def add_batch_inputs(self, batch_id: str, inputs: list[dict]) -> dict:
        with session_scope(self._writer.session_factory) as session:
            added = batches.add_page(
                session,
                self.ctx.settings,
                self.account_id,
                batch_id,
                inputs,
                store=self.ctx.store,
                runtime_image=self._runtime_image,
            )
            session.execute(
                update(Execution)
                .where(Execution.batch_id == batch_id)
                .values(worker=self.ctx.worker_id),
                execution_options={"synchronize_session": False},
            )
        return {"batch_id": batch_id, **added}

    def _runtime_image(self, runtime: str) -> str | None:
        """This engine's image for the runtime, looked up once per process (a page each)."""
        images = self.__dict__.setdefault("_images", {})
        if runtime not in images:
            images[runtime] = reuse.local_runtime_image(runtime)
        return images[runtime]

    def _run(self, execution_id: str) -> None:
        run_all(self._writer, execution_id)
        batches.after_execution(self._writer.session_factory, execution_id, self._enqueue)

    def _enqueue(self, execution_id: str) -> None:
        if self._runner is None:
            self._start_runner(EMBEDDED_PARALLEL)
        self._runner.submit(self._run, execution_id)  # type: ignore[union-attr]

    def _start_runner(self, threads: int) -> None:
        if self._runner is None:
            self._runner = ThreadPoolExecutor(threads, thread_name_prefix="rgrid-batch")
            # Before the process exits, the runs under way end (a cancel ends them quickly).
            atexit.register(self._runner.shutdown, wait=True)

    def start_batch(self, batch_id: str) -> dict:
        status = self.batch(batch_id)
        full_id = status["batch_id"]
        self._start_runner(status["parallel"] or EMBEDDED_PARALLEL)
        batches.start(self._writer.session_factory, self.account_id, full_id, self._enqueue)
        return self.batch(full_id)

    def batch(self, batch_id: str) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            found = batch_views.get_batch(session, self.account_id, batch_id)
            return batch_views.batch_to_dict(session, found)

    def batch_executions(
        self, batch_id: str, after: str = "", finished_since: str | None = None, limit: int = 500
    ) -> list[dict]:
        since = None
        if finished_since is not None:
            since = datetime.fromisoformat(finished_since).astimezone(UTC)
        with session_scope(self.ctx.session_factory) as session:
            found = batch_views.get_batch(session, self.account_id, batch_id)
            return batch_views.executions_page(
                session, found, after=after, finished_since=since, limit=limit
            )

    def cancel_batch(self, batch_id: str) -> dict:
        full_id = self.batch(batch_id)["batch_id"]
        stopped = batches.cancel(
            self._writer.session_factory,
            self.account_id,
            full_id,
            lambda execution_id: cancel(self._writer, execution_id),
            release=self.ctx.logs.clear,
        )
        return {**self.batch(full_id), "stopped": stopped}

    def retry_batch(self, batch_id: str) -> dict:
        status = self.batch(batch_id)
        full_id = status["batch_id"]
        self._start_runner(status["parallel"] or EMBEDDED_PARALLEL)
        renewed = batch_retry.retry(
            self._writer.session_factory,
            self.account_id,
            full_id,
            self._enqueue,
            self.ctx.settings,
        )
        with session_scope(self._writer.session_factory) as session:
            session.execute(
                update(Execution)
                .where(Execution.id.in_(list(renewed.values())), Execution.worker.is_(None))
                .values(worker=self.ctx.worker_id),
                execution_options={"synchronize_session": False},
            )
        return {
            **self.batch(full_id),
            "retried": list(renewed),
            "new_executions": list(renewed.values()),
        }

    def list_batches(self, limit: int) -> list[dict]:
        with session_scope(self.ctx.session_factory) as session:
            rows = batch_views.list_batches(session, self.account_id, limit)
            return [batch_views.batch_to_dict(session, row) for row in rows]
