"""The remote client's HTTP connection after a request was interrupted half way (Ctrl-C while
its headers were being written): the next request reaches the server whole, on a real local
server."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rgrid.client.transport import Http


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = f"{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_request_interrupted_while_its_headers_are_written_leaves_nothing_behind(
    server, monkeypatch
):
    http_client = Http(timeout_s=5)
    # One whole request first: the connection is open and kept alive.
    assert http_client.request("GET", f"{server}/first").read() == b"GET /first"

    real_putheader = http.client.HTTPConnection.putheader
    calls = []

    def interrupted(self, header, *values):
        calls.append(header)
        if len(calls) == 2:  # the request line and one header are in the buffer, unsent
            raise KeyboardInterrupt
        return real_putheader(self, header, *values)

    monkeypatch.setattr(http.client.HTTPConnection, "putheader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        http_client.request("GET", f"{server}/logs", headers={"A": "1", "B": "2", "C": "3"})
    monkeypatch.setattr(http.client.HTTPConnection, "putheader", real_putheader)

    response = http_client.request("POST", f"{server}/cancel", body=b"{}")
    assert response.status == 200
    assert response.read() == b"POST /cancel"
