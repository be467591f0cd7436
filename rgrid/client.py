"""What the CLI talks to: a remote RGrid API, or the embedded default in this process.

Both offer the same calls, so every CLI command works the same way against either.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import requests

from rgrid.config import Settings
from rgrid.errors import AuthError, BadInput, NotFound, RGridError, ServiceUnavailable
from rgrid.inputs import InputFile


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
        inputs: list[dict] | None = None,
        files_uploaded: int = 0,
        bytes_uploaded: int = 0,
    ) -> dict: ...
    def get(self, execution_id: str) -> dict: ...
    def list(self, limit: int) -> list[dict]: ...
    def logs(self, execution_id: str, offset: int) -> dict: ...
    def download_outputs(
        self, execution: dict, dest: Path, advance: Callable[[int], None] = ...
    ) -> list[Path]: ...
    def missing(self, digests: list[str]) -> list[str]: ...
    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None: ...


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


def _counted(chunks: Iterable[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


def safe_target(dest: Path, relpath: str) -> Path:
    target = (dest / relpath).resolve()
    if target == dest.resolve() or not target.is_relative_to(dest.resolve()):
        raise RGridError(f"refusing output path {relpath!r} outside the outputs folder")
    return target


class FileSlice(io.RawIOBase):
    """Part of an open file as a request body: streamed (never held in memory), with a length
    so the presigned PUT gets its Content-Length, and a callback for the progress bar."""

    def __init__(self, fh: BinaryIO, offset: int, length: int, advance: Callable[[int], None]):
        self.fh, self.remaining, self.advance = fh, length, advance
        self.length = length
        fh.seek(offset)

    def __len__(self) -> int:
        return self.length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self.fh.read(min(size, 1024 * 1024))
        self.remaining -= len(data)
        self.advance(len(data))
        return data


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
        except requests.RequestException as exc:  # e.g. RGRID_API_URL without http://
            raise BadInput(f"bad RGRID_API_URL {self.base_url!r}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
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

    def missing(self, digests: list[str]) -> list[str]:
        return self._request("POST", "/blobs/missing", json={"digests": digests})["missing"]

    def _put(self, url: str, body: FileSlice) -> requests.Response:
        try:
            response = requests.put(url, data=body, timeout=600)
        except requests.RequestException as exc:
            raise ServiceUnavailable(f"upload to the object store failed: {exc}") from exc
        if not response.ok:
            raise ServiceUnavailable(
                f"upload to the object store failed: HTTP {response.status_code}"
            )
        return response

    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None:
        plan = self._request("POST", "/uploads", json={"sha256": item.sha256, "size": item.size})
        parts = []
        with open(item.path, "rb") as fh:
            if "url" in plan:
                self._put(plan["url"], FileSlice(fh, 0, item.size, advance))
            for part in plan.get("parts", []):
                body = FileSlice(fh, part["offset"], part["length"], advance)
                response = self._put(part["url"], body)
                etag = response.headers.get("ETag")
                if not etag:
                    raise ServiceUnavailable("the object store did not acknowledge an upload part")
                parts.append({"part_number": part["part_number"], "etag": etag})
        self._request("POST", f"/uploads/{plan['upload_id']}/complete", json={"parts": parts})

    def download_outputs(
        self, execution: dict, dest: Path, advance: Callable[[int], None] = lambda n: None
    ) -> list[Path]:
        listing = self._request("GET", f"/executions/{execution['execution_id']}/outputs")
        written = []
        for output in listing["outputs"]:
            target = safe_target(dest, output["path"])
            try:
                with requests.get(output["url"], stream=True, timeout=60) as response:
                    response.raise_for_status()
                    verified_copy(
                        _counted(response.iter_content(1024 * 1024), advance),
                        target,
                        output["sha256"],
                    )
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
