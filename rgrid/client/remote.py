"""The client of a remote RGrid API: JSON calls over HTTP/1.1 on the standard library, and
streamed uploads and downloads of presigned object-store URLs. It offers the calls of
``rgrid.client.protocol.Client``, as the embedded default and its agent do."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

from rgrid.client.downloads import save_outputs, select_outputs
from rgrid.client.transport import FileSlice, Http
from rgrid.core.errors import (
    AuthError,
    BadInput,
    LostFromStore,
    NotFound,
    RGridError,
    ServiceUnavailable,
)
from rgrid.core.spec import RunSpec
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.store.channels import StdinSource
from rgrid.store.inputs import InputFile


class RemoteClient:
    #: Each log request waits (long poll) up to this long for something new.
    log_wait_s = 5.0

    def __init__(self, base_url: str, api_key: str | None, retry_s: float = 60):
        self.base_url = base_url.rstrip("/")
        #: How long a transient failure (API down, 503, refused connection) is retried.
        self.retry_s = retry_s
        self.headers = {"Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.http = Http()
        self.objects = Http(timeout_s=600, blocksize=1024 * 1024)
        #: Object-store connections of the threads that fetch outputs
        #: (rgrid.client.downloads.save_outputs): one kept-alive connection serves one
        #: request at a time.
        self._threads = threading.local()
        #: Output listings that came with a log's final page, by execution: the download
        #: that follows needs no request of its own.
        self._final_outputs: dict[str, dict] = {}
        #: Log pages that came with a submission's answer (a run answered from the output
        #: cache is over before it is returned), by execution and offset.
        self._pages: dict[tuple[str, int], dict] = {}
        #: What the server's last missing-digests answer said a submission may carry inline.
        self.inline_bytes = 0

    def fork(self) -> RemoteClient:
        """The same API and key on connections of its own, for another thread (one kept-alive
        connection serves one request at a time)."""
        return RemoteClient(self.base_url, None, self.retry_s)._with_headers(self.headers)

    def _with_headers(self, headers: dict[str, str]) -> RemoteClient:
        self.headers = dict(headers)
        return self

    def _request(
        self,
        method: str,
        path: str,
        json_body: object = None,
        params: dict | None = None,
        retry: bool = False,
    ) -> dict:
        """One API call. With ``retry`` (calls that follow a submitted run and change
        nothing), a transient failure (the API or a service behind it restarting, a blip) is
        retried with backoff for ``retry_s``: a run in progress is not abandoned over a
        restart. Other calls fail at once, so a wrong address is reported at once."""
        try:
            return self._request_once(method, path, json_body, params)
        except ServiceUnavailable as first:
            if not retry or self.retry_s <= 0:
                raise
            failure = first
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_after_delay,
            wait_exponential,
        )

        print(f"rgrid: {failure.message}; retrying for up to {self.retry_s:.0f}s", file=sys.stderr)
        retrying = Retrying(
            retry=retry_if_exception_type(ServiceUnavailable),
            stop=stop_after_delay(self.retry_s),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._request_once(method, path, json_body, params)
        raise AssertionError("unreachable")

    def _request_once(
        self,
        method: str,
        path: str,
        json_body: object,
        params: dict | None,
        raw_body: bytes | None = None,
        transport: Http | None = None,
    ) -> dict:
        url = f"{self.base_url}/v1{path}"
        if params:
            url += "?" + urlencode(params)
        headers = dict(self.headers)
        body = raw_body
        if raw_body is not None:
            headers["Content-Type"] = "application/octet-stream"
        elif json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        transport = transport or self.http
        try:
            response = transport.request(method, url, body=body, headers=headers)
            with transport.reading(response, url):
                data = response.read()
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"cannot reach the RGrid API at {self.base_url}") from exc
        except TimeoutError as exc:
            raise ServiceUnavailable(f"the RGrid API at {self.base_url} did not answer") from exc
        except (ValueError, OSError) as exc:  # e.g. RGRID_API_URL without http://
            raise BadInput(f"bad RGRID_API_URL {self.base_url!r}: {exc}") from exc
        try:
            payload = json.loads(data)
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if 200 <= response.status < 300:
            return payload
        message = payload.get("error") or f"HTTP {response.status} from {url}"
        error_class = {401: AuthError, 404: NotFound, 503: ServiceUnavailable}.get(
            response.status, BadInput if response.status < 500 else RGridError
        )
        raise error_class(message)

    def submit(self, spec: RunSpec, *, stdin_source: StdinSource | None = None) -> dict:
        payload = spec.submit_body(stdin=stdin_source is not None)
        submitted = self._request("POST", "/executions", payload)
        if isinstance(page := submitted.pop("log_page", None), dict):
            self._pages[(submitted["execution_id"], page.get("offset", 0))] = page
        if stdin_source is not None:
            threading.Thread(
                target=self._feed_stdin,
                args=(submitted["execution_id"], stdin_source),
                name="rgrid-stdin",
                daemon=True,
            ).start()
        return submitted

    #: Piped stdin is sent in chunks of at most this many bytes, and a chunk the server had
    #: no room for is offered again after this long.
    STDIN_CHUNK = 256 * 1024
    STDIN_RETRY_S = 0.1

    def _feed_stdin(self, execution_id: str, source: StdinSource) -> None:
        """Send stdin to the execution as it is read, then its end. On its own connection: the
        main thread is following the log meanwhile."""
        own = Http()
        path = f"/executions/{execution_id}/stdin"
        try:
            while chunk := source.read(self.STDIN_CHUNK):
                while True:
                    answer = self._request_once(
                        "POST", path, None, None, raw_body=chunk, transport=own
                    )
                    if answer.get("accepted") or answer.get("status") in TERMINAL_STATUSES:
                        break
                    time.sleep(self.STDIN_RETRY_S)  # the script is not reading yet
                if answer.get("status") in TERMINAL_STATUSES:
                    return  # it ended without reading the rest, as a pipe's reader may
            self._request_once("POST", path, None, {"eof": 1}, raw_body=b"", transport=own)
        except RGridError as exc:
            print(f"rgrid: stdin not passed on: {exc.message}", file=sys.stderr)
            with contextlib.suppress(RGridError, OSError):
                self._request_once("POST", path, None, {"eof": 1}, raw_body=b"", transport=own)
        except OSError as exc:
            print(f"rgrid: could not read stdin: {exc}", file=sys.stderr)

    def get(self, execution_id: str, check_store: bool = False) -> dict:
        params = {"check_store": 1} if check_store else None
        return self._request("GET", f"/executions/{execution_id}", params=params, retry=True)

    def why(self, execution_id: str) -> dict:
        return self._request("GET", f"/executions/{execution_id}/why", retry=True)

    def cancel(self, execution_id: str) -> dict:
        return self._request("POST", f"/executions/{execution_id}/cancel", retry=True)

    def list(self, limit: int, standalone: bool = False) -> list[dict]:
        params = {"limit": limit, "standalone": int(standalone)}
        return self._request("GET", "/executions", params=params)["executions"]

    # Batches (rgrid/api/batches.py): created, filled in pages, started, followed.

    def create_batch(
        self, spec: RunSpec, parallel: int | None = None, size: int | None = None
    ) -> dict:
        body = spec.batch_body()
        body.update({k: v for k, v in (("parallel", parallel), ("size", size)) if v is not None})
        return self._request("POST", "/batches", body)

    def add_batch_inputs(self, batch_id: str, inputs: list[dict]) -> dict:
        return self._request("POST", f"/batches/{batch_id}/inputs", {"inputs": inputs})

    def start_batch(self, batch_id: str) -> dict:
        return self._request("POST", f"/batches/{batch_id}/start")

    def batch(self, batch_id: str) -> dict:
        return self._request("GET", f"/batches/{batch_id}", retry=True)

    def batch_executions(
        self, batch_id: str, after: str = "", finished_since: str | None = None, limit: int = 500
    ) -> list[dict]:
        params: dict[str, object] = {"after": after, "limit": limit}
        if finished_since is not None:
            params["finished_since"] = finished_since
        path = f"/batches/{batch_id}/executions"
        return self._request("GET", path, params=params, retry=True)["executions"]

    def cancel_batch(self, batch_id: str) -> dict:
        return self._request("POST", f"/batches/{batch_id}/cancel", retry=True)

    def retry_batch(self, batch_id: str) -> dict:
        return self._request("POST", f"/batches/{batch_id}/retry")

    def list_batches(self, limit: int) -> list[dict]:
        return self._request("GET", "/batches", params={"limit": limit})["batches"]

    def logs(self, execution_id: str, offset: int, wait: bool = False) -> dict:
        page = self._pages.pop((execution_id, offset), None)
        if page is None:
            params = {"offset": offset}
            if wait:
                params["wait"] = self.log_wait_s
            path = f"/executions/{execution_id}/logs"
            page = self._request("GET", path, params=params, retry=wait)
        if page.get("complete") and "outputs" in page:
            self._final_outputs[execution_id] = {
                "outputs": page["outputs"],
                "packs": page.get("output_packs") or [],
            }
        return page

    def missing(self, digests: list[str]) -> list[str]:
        answer = self._request("POST", "/blobs/missing", {"digests": digests})
        # How many bytes of what is missing the submission may carry itself (0: an older
        # server, or the operator turned it off): each such file then costs no upload.
        inline = answer.get("inline_bytes", 0)
        self.inline_bytes = inline if isinstance(inline, int) and inline > 0 else 0
        return answer["missing"]

    def cache_stats(self) -> dict:
        return self._request("GET", "/cache/stats")

    def cache_entries(self, limit: int) -> list[dict]:
        return self._request("GET", "/cache/entries", params={"limit": limit})["entries"]

    def cache_purge(self, older_than_s: int | None, everything: bool) -> dict:
        body = {"all": True} if everything else {"older_than_s": older_than_s}
        return self._request("POST", "/cache/purge", body)["removed"]

    def _put(
        self, url: str, body: FileSlice, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        try:
            response = self.objects.request(
                "PUT", url, body=body, headers={**(headers or {}), "Content-Length": str(len(body))}
            )
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"upload to the object store failed: {exc}") from exc
        if not 200 <= response.status < 300:
            raise ServiceUnavailable(f"upload to the object store failed: HTTP {response.status}")
        return response

    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None:
        plan = self._request("POST", "/uploads", {"sha256": item.sha256, "size": item.size})
        parts = []
        with open(item.path, "rb") as fh:
            if "url" in plan:
                body = FileSlice(fh, 0, item.size, advance)
                self._put(plan["url"], body, plan.get("headers"))
            for part in plan.get("parts", []):
                body = FileSlice(fh, part["offset"], part["length"], advance)
                response = self._put(part["url"], body)
                etag = response.getheader("ETag")
                if not etag:
                    raise ServiceUnavailable("the object store did not acknowledge an upload part")
                parts.append({"part_number": part["part_number"], "etag": etag})
        # The server copies and hashes the whole file before it answers (5 GiB: about a
        # minute on the S3 endpoint here): the object store's patience, not a quick call's.
        self._request_once(
            "POST",
            f"/uploads/{plan['upload_id']}/complete",
            {"parts": parts},
            None,
            transport=self.objects,
        )

    def download_outputs(
        self,
        execution: dict,
        dest: Path,
        advance: Callable[[int], None] = lambda n: None,
        paths: list[str] | None = None,
    ) -> list[Path]:
        listing = self._final_outputs.pop(execution["execution_id"], None)
        if listing is None:
            path = f"/executions/{execution['execution_id']}/outputs"
            answer = self._request("GET", path, retry=True)
            listing = {"outputs": answer["outputs"], "packs": answer.get("packs") or []}
        listing = select_outputs(listing, paths)
        return save_outputs(listing, dest, self._fetch_output, advance, self._fetch_span)

    def _objects(self) -> Http:
        """This thread's object-store connections."""
        if threading.current_thread() is threading.main_thread():
            return self.objects
        if not hasattr(self._threads, "objects"):
            self._threads.objects = Http(timeout_s=600, blocksize=1024 * 1024)
        return self._threads.objects

    @contextmanager
    def _fetch_output(self, output: dict) -> Iterator[Iterator[bytes]]:
        """The output's bytes from its presigned URL. A network failure is the object store's
        (ServiceUnavailable); an OSError that escapes is this filesystem's. A small one the
        log's final page carried (``data``) needs no GET."""
        if "data" in output:
            yield iter([base64.b64decode(output["data"])])
            return
        url = output["url"]
        objects = self._objects()
        try:
            response = objects.request("GET", url)
            if response.status == 404:
                response.read()
                raise LostFromStore.output(output["path"])
            if response.status != 200:
                response.read()
                raise ServiceUnavailable(
                    f"could not download output {output['path']}: HTTP {response.status}"
                )
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"could not download output {output['path']}: {exc}") from exc

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = response.read(1024 * 1024)
                except (OSError, http.client.HTTPException) as exc:
                    raise ServiceUnavailable(
                        f"could not download output {output['path']}: {exc}"
                    ) from exc
                if not chunk:
                    return
                yield chunk

        with objects.reading(response, url):
            yield chunks()

    @contextmanager
    def _fetch_span(
        self, pack: dict, offset: int, length: int, paths: list[str]
    ) -> Iterator[Iterator[bytes]]:
        """``length`` bytes of a pack from ``offset`` on: one GET of its presigned URL with a
        ``Range`` header (which the URL's signature leaves free, so one URL serves every
        span). A store that ignores the range answers the whole pack: read up to the span."""
        url = pack["url"]
        objects = self._objects()
        what = f"outputs {paths[0]}…" if len(paths) > 1 else f"output {paths[0]}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            response = objects.request("GET", url, headers=headers)
            if response.status == 404:
                response.read()
                raise LostFromStore.outputs(paths)
            if response.status not in (200, 206):
                response.read()
                raise ServiceUnavailable(f"could not download {what}: HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"could not download {what}: {exc}") from exc
        skip = offset if response.status == 200 else 0

        def read(count: int) -> bytes:
            try:
                return response.read(count)
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceUnavailable(f"could not download {what}: {exc}") from exc

        def chunks() -> Iterator[bytes]:
            nonlocal skip
            while skip:
                skipped = read(min(skip, 1024 * 1024))
                if not skipped:
                    return
                skip -= len(skipped)
            left = length
            while left > 0:
                chunk = read(min(left, 1024 * 1024))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

        with objects.reading(response, url):
            yield chunks()
        if not response.isclosed():  # the rest of a whole pack is not wanted: drop the line
            response.close()
            objects.forget(url)
