"""The embedded default: the whole pipeline in the CLI's own process, with no servers."""

from __future__ import annotations

import atexit
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rgrid.client.downloads import save_outputs, select_outputs
from rgrid.client.embedded_batches import EmbeddedBatches
from rgrid.core import cachestats
from rgrid.core.db import session_scope
from rgrid.core.errors import LostFromStore, NotFound
from rgrid.core.models import iso_utc, utcnow
from rgrid.core.spec import RunSpec
from rgrid.host import disk
from rgrid.host.docker_engine import get_docker
from rgrid.host.runtimes import resolve_runtime
from rgrid.pipeline import reuse as reuse_mod
from rgrid.pipeline import reuse_why
from rgrid.pipeline.chain import run_all
from rgrid.pipeline.context import PipelineContext
from rgrid.pipeline.lost import recover_interrupted
from rgrid.service import cancelling, maintenance, purge
from rgrid.service import executions as svc
from rgrid.service.accounts import get_or_create_account
from rgrid.store import blobs
from rgrid.store.channels import StdinSource, check_env
from rgrid.store.inputs import InputFile

EMBEDDED_ACCOUNT = "local"


class EmbeddedClient(EmbeddedBatches):
    """The whole pipeline in this process: SQLite, a local store and the local Docker engine."""

    log_wait_s = 5.0

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        # Refilling the warm pool runs beside the script; the process waits for it to finish
        # starting its sandbox, which then outlives the process until it is used or idles out.
        atexit.register(ctx.join_background)
        recover_interrupted(ctx)
        with session_scope(ctx.session_factory) as session:
            self.account_id = get_or_create_account(session, EMBEDDED_ACCOUNT).id

    def submit(self, spec: RunSpec, *, stdin_source: StdinSource | None = None) -> dict:
        resolve_runtime(spec.runtime)
        if spec.env:
            spec = dataclasses.replace(spec, env=check_env(spec.env))
        get_docker()  # Fail now, with one line, rather than after writing a row.
        result, reused = self._create(spec, stdin_source is not None)
        if reused:
            return result  # answered from the output cache: no sandbox, nothing to run
        # Handed over in memory: they never reach the database or a file.
        if spec.env:
            self.ctx.channels.put_env(result["execution_id"], spec.env)
        if stdin_source is not None:
            self.ctx.channels.attach_stdin(result["execution_id"], stdin_source)
        thread = threading.Thread(
            target=run_all, args=(self.ctx, result["execution_id"]), daemon=True
        )
        thread.start()
        return result

    def _create(self, spec: RunSpec, stdin: bool) -> tuple[dict, bool]:
        """Write the row, owned by this process, and look the run up in the output cache;
        returns the execution and whether it was answered from there."""
        settings = self.ctx.settings
        wanted = reuse_mod.wanted(settings, spec.reuse) and not spec.refresh
        image = reuse_mod.local_runtime_image(spec.runtime) if wanted else None
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.create_execution(
                session,
                self.ctx.store,
                settings,
                account_id=self.account_id,
                spec=spec,
                stdin=stdin,
            )
            # Owned by this process from the start: if it is killed before the script ends,
            # the next `rgrid` on this machine ends the row (recover_interrupted).
            execution.worker = self.ctx.worker_id
            reused = reuse_mod.at_submission(
                session,
                self.ctx.store,
                settings,
                execution,
                env=spec.env,
                runtime_image=image,
                reuse=spec.reuse,
                refresh=spec.refresh,
            )
            return svc.execution_to_dict(execution), bool(reused)

    def get(self, execution_id: str, check_store: bool = False) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.get_execution(session, self.account_id, execution_id)
            result = svc.execution_to_dict(execution)
            if check_store:
                result.update(svc.lost_objects(session, execution, self.ctx.store))
            return result

    def why(self, execution_id: str) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.get_execution(session, self.account_id, execution_id)
            return reuse_why.explain(session, execution)

    def cancel(self, execution_id: str) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            # The account's own, by id, prefix or `last`.
            execution_id = svc.get_execution(session, self.account_id, execution_id).id
        _status, changed = cancelling.cancel(self.ctx, execution_id)
        return {**self.get(execution_id), "cancelled": changed}

    def list(self, limit: int, standalone: bool = False) -> list[dict]:
        with session_scope(self.ctx.session_factory) as session:
            rows = svc.list_executions(session, self.account_id, limit, standalone)
            return [svc.execution_to_dict(row) for row in rows]

    def logs(self, execution_id: str, offset: int, wait: bool = False) -> dict:
        page = self._logs(execution_id, offset)
        if wait and not page["chunks"] and not page["complete"]:
            # The pipeline runs in this process: wait for its next write, then look again.
            self.ctx.logs.wait(execution_id, offset, self.log_wait_s)
            page = self._logs(execution_id, offset)
        return page

    def _logs(self, execution_id: str, offset: int) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.get_execution(session, self.account_id, execution_id)
            page = svc.read_logs(execution, self.ctx.logs, self.ctx.store, offset)
            if page["complete"]:
                page["execution"] = svc.execution_to_dict(execution)
            return page

    def missing(self, digests: list[str]) -> list[str]:
        with session_scope(self.ctx.session_factory) as session:
            return blobs.missing_digests(session, self.ctx.store, self.account_id, digests)

    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None:
        """Into the local store, checked against the digest like any upload."""
        with session_scope(self.ctx.session_factory) as session:
            blobs.store_file(session, self.ctx.store, self.account_id, item.path, item.sha256)
        advance(item.size)

    def download_outputs(
        self,
        execution: dict,
        dest: Path,
        advance: Callable[[int], None] = lambda n: None,
        paths: list[str] | None = None,
    ) -> list[Path]:
        with session_scope(self.ctx.session_factory) as session:
            row = svc.get_execution(session, self.account_id, execution["execution_id"])
            listing = select_outputs(svc.output_listing(session, row, self.ctx.store), paths)
        return save_outputs(listing, dest, self._fetch_output, advance, self._fetch_span)

    def cache_stats(self) -> dict:
        """The account's stats, and this machine's own disk: the embedded default is its own
        worker host."""
        with session_scope(self.ctx.session_factory) as session:
            result = cachestats.stats(session, self.account_id, self._last_purge())
        result["host"] = {
            kind: {"entries": count, "bytes": size}
            for kind, (count, size) in disk.usage(self.ctx.settings).items()
        }
        result["budget_bytes"] = self.ctx.settings.cache_budget_bytes
        return result

    def cache_entries(self, limit: int) -> list[dict]:
        with session_scope(self.ctx.session_factory) as session:
            return cachestats.entries(session, self.account_id, limit)

    def cache_purge(self, older_than_s: int | None, everything: bool) -> dict:
        """The local cache: rows, stored blobs, environment folders and the blob cache."""
        age = purge.purge_age(older_than_s, everything)
        before = disk.usage(self.ctx.settings)["environment"]
        with session_scope(self.ctx.session_factory) as session:
            removed = purge.purge_account(
                session, self.ctx.store, self.account_id, age, self.ctx.settings.environments_dir
            )
        after = disk.usage(self.ctx.settings)["environment"]
        removed["environments"] = before[0] - after[0]
        removed["environment_bytes"] = max(0, before[1] - after[1])
        removed.update(maintenance.purge_local_files(self.ctx.settings, age))
        record = {"finished_at": iso_utc(utcnow()), "removed": removed}
        self._last_purge_file.write_text(json.dumps(record))
        return removed

    @property
    def _last_purge_file(self) -> Path:
        return self.ctx.settings.data_dir / "last-purge.json"

    def _last_purge(self) -> dict | None:
        try:
            return json.loads(self._last_purge_file.read_text())
        except (OSError, ValueError):
            return None

    @contextmanager
    def _fetch_output(self, output: dict) -> Iterator[Iterator[bytes]]:
        try:
            stream = self.ctx.store.open_stream(output["key"])
        except NotFound:
            raise LostFromStore.output(output["path"]) from None
        with stream:
            yield iter(lambda: stream.read(1024 * 1024), b"")

    @contextmanager
    def _fetch_span(
        self, pack: dict, offset: int, length: int, paths: list[str]
    ) -> Iterator[Iterator[bytes]]:
        try:
            stream = self.ctx.store.open_range(pack["key"], offset, length)
        except NotFound:
            raise LostFromStore.outputs(paths) from None
        with stream:
            yield iter(lambda: stream.read(1024 * 1024), b"")
