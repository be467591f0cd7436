"""A private PEP 503 package index on loopback, in a thread: it wants HTTP basic auth and sends
the ordinary cache headers a real index sends, and it remembers who asked for what, so a test
can tell whether a request reached it at all."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name


@dataclass
class PrivateIndex:
    folder: Path
    user: str
    password: str
    port: int = 0
    #: (path, whether the request carried the right credentials), in arrival order.
    requests: list[tuple[str, bool]] = field(default_factory=list)

    def url(self, credentials: bool = True) -> str:
        auth = f"{self.user}:{self.password}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}/simple/"

    def _page(self, project: str) -> bytes | None:
        links = [
            f'<a href="/files/{wheel.name}">{wheel.name}</a>'
            for wheel in sorted(self.folder.glob("*.whl"))
            if canonicalize_name(wheel.name.split("-")[0]) == project
        ]
        if not links:
            return None
        return ("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>").encode()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        index = self
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                # What made the shared cache serve another account's download: a cacheable
                # answer, keyed by a URL without the credentials.
                self.send_header("Cache-Control", "max-age=600, public")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                authorised = self.headers.get("Authorization") == expected
                index.requests.append((self.path, authorised))
                if not authorised:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="private"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                parts = [p for p in self.path.split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    page = index._page(canonicalize_name(parts[1]))
                    if page is not None:
                        return self._send(200, page, "text/html")
                if len(parts) == 2 and parts[0] == "files":
                    wheel = index.folder / parts[1]
                    if wheel.is_file() and wheel.parent == index.folder:
                        return self._send(200, wheel.read_bytes(), "application/octet-stream")
                self._send(404, b"not found", "text/plain")

        return Handler


@contextmanager
def private_index(
    folder: Path, user: str = "alice", password: str = "s3cret"
) -> Iterator[PrivateIndex]:
    """Serve the wheels in ``folder`` until the block ends."""
    index = PrivateIndex(folder, user, password)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), index.handler())
    index.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="private-index", daemon=True)
    thread.start()
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass
class TricklingIndex:
    """An index that answers every request at once, then sends one byte every half second
    for ever: a dependency install from it goes on until its deadline or until it is killed."""

    port: int = 0
    #: Paths asked for, in arrival order.
    requests: list[str] = field(default_factory=list)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple/"


@contextmanager
def trickling_index() -> Iterator[TricklingIndex]:
    """Serve a trickling index until the block ends (its open answers end with it)."""
    import time

    index = TricklingIndex()
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            index.requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass  # the client went away

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    index.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="trickling-index", daemon=True)
    thread.start()
    try:
        yield index
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
