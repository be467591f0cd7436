"""HTTP/1.1 on the standard library for the remote client: one kept-alive connection per
host (``Http``), and part of an open file streamed as a request body (``FileSlice``)."""

from __future__ import annotations

import http.client
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import urlsplit


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


class Http:
    """HTTP/1.1 on the standard library, one kept-alive connection per host.

    Why not requests: importing it costs ~0.1 s of every CLI start, a third of a warm run's
    budget (a bare ``docker run`` is ~0.36 s here). The CLI needs little of it: JSON calls to
    the API and streamed PUT/GET of presigned object-store URLs."""

    def __init__(self, timeout_s: float = 60, blocksize: int = 64 * 1024):
        self.timeout_s, self.blocksize = timeout_s, blocksize
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        if key not in self._connections:
            if scheme == "https":
                self._connections[key] = http.client.HTTPSConnection(
                    netloc, timeout=self.timeout_s, blocksize=self.blocksize
                )
            elif scheme == "http":
                self._connections[key] = http.client.HTTPConnection(
                    netloc, timeout=self.timeout_s, blocksize=self.blocksize
                )
            else:
                raise ValueError(f"unsupported URL scheme {scheme!r}")
        return self._connections[key]

    def request(
        self,
        method: str,
        url: str,
        body: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request and return the response with its body unread. A kept-alive
        connection the server closed meanwhile is reopened once."""
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"not an absolute URL: {url!r}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        for attempt in (1, 2):
            connection = self._connection(parts.scheme, parts.netloc)
            try:
                connection.request(method, target, body=body, headers=headers or {})
                return connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                connection.close()
                if attempt == 2 or not (body is None or isinstance(body, bytes)):
                    raise
            except BaseException:
                # Interrupted half way (Ctrl-C during a long poll): the connection's state is
                # unknown, so it is never used again. Closing is not enough: http.client keeps
                # a request it had not sent yet in the connection's buffer, and would send it
                # ahead of the next one on the same object (the server then answers 400).
                self.forget(url)
                raise
        raise AssertionError("unreachable")

    def forget(self, url: str) -> None:
        """Close the connection to ``url``'s host: a body left unread on it."""
        parts = urlsplit(url)
        connection = self._connections.pop((parts.scheme, parts.netloc), None)
        if connection is not None:
            connection.close()

    @contextmanager
    def reading(self, response: http.client.HTTPResponse, url: str) -> Iterator[None]:
        """Around reading a response's body: if that is interrupted, the connection is
        closed, so the next request does not meet the rest of this body."""
        try:
            yield
        except BaseException:
            response.close()
            self.forget(url)
            raise
