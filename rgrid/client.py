"""What the CLI talks to: a remote RGrid API, or the embedded default in this process.

Both offer the same calls, so every CLI command works the same way against either.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol

import requests

from rgrid import cache_keys
from rgrid import executions as svc
from rgrid.accounts import get_or_create_account
from rgrid.config import Settings
from rgrid.db import session_scope
from rgrid.docker_engine import get_docker
from rgrid.errors import AuthError, BadInput, NotFound, RGridError, ServiceUnavailable
from rgrid.pipeline import PipelineContext, run_all
from rgrid.runtimes import resolve_runtime

EMBEDDED_ACCOUNT = "local"


class Client(Protocol):
    #: How long a follower waits between polls for new log chunks.
    poll_interval_s: float

    def submit(
        self, *, script: str, script_name: str, runtime: str, timeout_s: int | None, args: list[str]
    ) -> dict: ...
    def get(self, execution_id: str) -> dict: ...
    def list(self, limit: int) -> list[dict]: ...
    def logs(self, execution_id: str, offset: int) -> dict: ...
    def download_outputs(self, execution: dict, dest: Path) -> list[Path]: ...


def _verified_copy(chunks, target: Path, expected_sha256: str) -> None:
    """Write chunks to ``target`` and refuse the file unless its digest is the promised one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with open(partial, "wb") as fh:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)
    if digest.hexdigest() != expected_sha256:
        partial.unlink(missing_ok=True)
        raise RGridError(f"output {target.name} failed verification (digest mismatch)")
    partial.replace(target)


def _safe_target(dest: Path, relpath: str) -> Path:
    target = (dest / relpath).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise RGridError(f"refusing output path {relpath!r} outside the outputs folder")
    return target


class RemoteClient:
    poll_interval_s = 0.1

    def __init__(self, base_url: str, api_key: str | None):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, **kwargs) -> dict:
        url = f"{self.base_url}/v1{path}"
        try:
            response = self.session.request(method, url, timeout=60, **kwargs)
        except requests.ConnectionError as exc:
            raise ServiceUnavailable(f"cannot reach the RGrid API at {self.base_url}") from exc
        except requests.Timeout as exc:
            raise ServiceUnavailable(f"the RGrid API at {self.base_url} did not answer") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.ok:
            return body
        message = body.get("error") or f"HTTP {response.status_code} from {url}"
        error_class = {401: AuthError, 404: NotFound, 503: ServiceUnavailable}.get(
            response.status_code, BadInput if response.status_code < 500 else RGridError
        )
        raise error_class(message)

    def submit(self, *, script, script_name, runtime, timeout_s, args) -> dict:
        payload = {
            "script": script,
            "script_name": script_name,
            "runtime": runtime,
            "timeout_s": timeout_s,
            "args": args,
        }
        return self._request("POST", "/executions", json=payload)

    def get(self, execution_id: str) -> dict:
        return self._request("GET", f"/executions/{execution_id}")

    def list(self, limit: int) -> list[dict]:
        return self._request("GET", "/executions", params={"limit": limit})["executions"]

    def logs(self, execution_id: str, offset: int) -> dict:
        return self._request("GET", f"/executions/{execution_id}/logs", params={"offset": offset})

    def download_outputs(self, execution: dict, dest: Path) -> list[Path]:
        listing = self._request("GET", f"/executions/{execution['execution_id']}/outputs")
        written = []
        for output in listing["outputs"]:
            target = _safe_target(dest, output["path"])
            try:
                with requests.get(output["url"], stream=True, timeout=60) as response:
                    response.raise_for_status()
                    _verified_copy(response.iter_content(1024 * 1024), target, output["sha256"])
            except requests.RequestException as exc:
                raise ServiceUnavailable(
                    f"could not download output {output['path']}: {exc}"
                ) from exc
            written.append(target)
        return written


class EmbeddedClient:
    """The whole pipeline in this process: SQLite, a local store and the local Docker engine."""

    poll_interval_s = 0.02

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self._threads: dict[str, threading.Thread] = {}
        with session_scope(ctx.session_factory) as session:
            self.account_id = get_or_create_account(session, EMBEDDED_ACCOUNT).id

    def submit(self, *, script, script_name, runtime, timeout_s, args) -> dict:
        resolve_runtime(runtime)
        get_docker()  # Fail now, with one line, rather than after writing a row.
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.create_execution(
                session,
                self.ctx.store,
                self.ctx.settings,
                account_id=self.account_id,
                script=script,
                script_name=script_name,
                runtime=runtime,
                timeout_s=timeout_s,
                args=args,
            )
            result = svc.execution_to_dict(execution)
        thread = threading.Thread(
            target=run_all, args=(self.ctx, result["execution_id"]), daemon=True
        )
        self._threads[result["execution_id"]] = thread
        thread.start()
        return result

    def get(self, execution_id: str) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            return svc.execution_to_dict(svc.get_execution(session, self.account_id, execution_id))

    def list(self, limit: int) -> list[dict]:
        with session_scope(self.ctx.session_factory) as session:
            rows = svc.list_executions(session, self.account_id, limit)
            return [svc.execution_to_dict(row) for row in rows]

    def logs(self, execution_id: str, offset: int) -> dict:
        with session_scope(self.ctx.session_factory) as session:
            execution = svc.get_execution(session, self.account_id, execution_id)
            return svc.read_logs(execution, self.ctx.logs, self.ctx.store, offset)

    def download_outputs(self, execution: dict, dest: Path) -> list[Path]:
        written = []
        for output in execution["outputs"]:
            target = _safe_target(dest, output["path"])
            key = cache_keys.output_object_key(execution["execution_id"], output["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".fetch")
            self.ctx.store.download(key, tmp)
            with open(tmp, "rb") as fh:
                _verified_copy(iter(lambda: fh.read(1024 * 1024), b""), target, output["sha256"])
            tmp.unlink(missing_ok=True)
            written.append(target)
        return written

    def wait(self, execution_id: str) -> None:
        thread = self._threads.get(execution_id)
        if thread is not None:
            thread.join()


def make_client(settings: Settings) -> Client:
    if settings.embedded:
        from rgrid.context import embedded_context

        return EmbeddedClient(embedded_context(settings))
    return RemoteClient(settings.api_url, settings.api_key)  # type: ignore[arg-type]
