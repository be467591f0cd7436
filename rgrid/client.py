"""What the CLI talks to: a remote RGrid API, or the embedded default in this process.

Both offer the same calls, so every CLI command works the same way against either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import requests

from rgrid.config import Settings
from rgrid.errors import AuthError, BadInput, NotFound, RGridError, ServiceUnavailable


class Client(Protocol):
    #: How long a follower waits between polls for new log chunks.
    poll_interval_s: float

    def submit(
        self,
        *,
        script: str,
        script_name: str,
        runtime: str,
        timeout_s: int | None,
        args: list[str],
        requirements: str | None = None,
        refresh_deps: bool = False,
    ) -> dict: ...
    def get(self, execution_id: str) -> dict: ...
    def list(self, limit: int) -> list[dict]: ...
    def logs(self, execution_id: str, offset: int) -> dict: ...
    def download_outputs(self, execution: dict, dest: Path) -> list[Path]: ...


def verified_copy(chunks, target: Path, expected_sha256: str) -> None:
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


def safe_target(dest: Path, relpath: str) -> Path:
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

    def submit(self, *, script, script_name, runtime, timeout_s, args, **options) -> dict:
        payload = {
            "script": script,
            "script_name": script_name,
            "runtime": runtime,
            "timeout_s": timeout_s,
            "args": args,
            **options,
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
            target = safe_target(dest, output["path"])
            try:
                with requests.get(output["url"], stream=True, timeout=60) as response:
                    response.raise_for_status()
                    verified_copy(response.iter_content(1024 * 1024), target, output["sha256"])
            except requests.RequestException as exc:
                raise ServiceUnavailable(
                    f"could not download output {output['path']}: {exc}"
                ) from exc
            written.append(target)
        return written


def make_client(settings: Settings) -> Client:
    if settings.embedded:
        # Imported only here: the database, Docker and pipeline code is heavy to import, and
        # the remote client needs none of it.
        from rgrid.context import embedded_context
        from rgrid.embedded import EmbeddedClient

        return EmbeddedClient(embedded_context(settings))
    return RemoteClient(settings.api_url, settings.api_key)  # type: ignore[arg-type]
