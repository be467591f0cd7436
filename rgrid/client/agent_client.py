"""The CLI's side of the embedded agent (rgrid/client/agent.py): find the agent for this data folder
and this shell's settings, start it if there is none, and call it over its Unix socket.

Kept light on purpose: a warm `rgrid run` imports this instead of SQLAlchemy, docker-py and the
pipeline, which is most of what the embedded default used to cost around the script.

The protocol is one JSON object per line each way: ``{"method": ..., "args": {...}}`` answered
by ``{"result": ...}`` or ``{"error": {"type": ..., "message": ...}}``. A connection owns what
it submitted: when it closes before an execution ends, the agent cancels the execution. So a
killed client cancels its run, as the in-process default always did.

A run with piped stdin (or ``-i``) hands the agent its stdin descriptor itself, with the
``submit`` line (SCM_RIGHTS): the agent then reads the pipe, file or terminal directly, so a run
from a script, a heredoc or CI takes the same path as one from a terminal, and EOF is the pipe's
own.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rgrid.core import errors
from rgrid.core.config import Settings, agent_environment
from rgrid.core.spec import RunSpec
from rgrid.store.inputs import InputFile

#: A Unix socket's path must fit in sockaddr_un (108 bytes on Linux, with the NUL).
MAX_SOCKET_PATH = 100
#: How long a first run waits for the agent it started to answer before running in process.
START_WAIT_S = 20.0


def _code_stamp() -> str:
    """Changes whenever the installed rgrid code does, so an upgrade (or an edit in a
    checkout) never talks to an agent still running the old code."""
    package = Path(__file__).resolve().parent
    newest = max(p.stat().st_mtime_ns for p in package.rglob("*.py"))
    return f"{newest}"


def fingerprint() -> str:
    """The agent's identity: this shell's RGrid-relevant environment and the code."""
    digest = hashlib.sha256(json.dumps([agent_environment(), _code_stamp()]).encode())
    return digest.hexdigest()[:16]


def _data_key(settings: Settings) -> str:
    return hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:12]


def socket_dirs(settings: Settings) -> list[Path]:
    """Where this data folder's agents listen: the folder itself, or, where its path is too
    long for a socket, a private folder under the system's temp dir."""
    return [settings.data_dir, Path(tempfile.gettempdir()) / f"rgrid-agents-{os.getuid()}"]


def socket_path(settings: Settings) -> Path:
    name = f"agent-{fingerprint()}.sock"
    preferred = settings.data_dir / name
    if len(str(preferred)) <= MAX_SOCKET_PATH:
        return preferred
    return socket_dirs(settings)[1] / f"{_data_key(settings)}-{name}"


def agent_sockets(settings: Settings) -> list[Path]:
    """Every agent socket of this data folder, whatever settings started it."""
    own = settings.data_dir.glob("agent-*.sock")
    short = socket_dirs(settings)[1].glob(f"{_data_key(settings)}-agent-*.sock")
    return sorted([*own, *short])


class AgentGone(errors.ServiceUnavailable):
    """The agent closed the connection mid-call (it was stopped or killed)."""


class AgentClient:
    """The ``Client`` protocol (rgrid/client/protocol.py), answered by the agent."""

    def __init__(self, path: Path, conn: socket.socket):
        self.path = path
        self._conn: socket.socket | None = conn

    @classmethod
    def connect(cls, path: Path, timeout_s: float | None = None) -> AgentClient:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            raise
        conn.settimeout(None)
        return cls(path, conn)

    def _call(self, method: str, _fds: tuple[int, ...] = (), **args) -> object:
        """One request and its answer; ``_fds``: descriptors passed with the request line."""
        if self._conn is None:
            # An earlier call was interrupted (Ctrl-C) with its answer unread: a fresh
            # connection rather than an answer to the wrong question. Closing the old one
            # also tells the agent its executions are abandoned, which an interrupted
            # `rgrid run` means anyway.
            self._conn = AgentClient.connect(self.path)._conn
        conn = self._conn
        assert conn is not None
        try:
            request = json.dumps({"method": method, "args": args}).encode() + b"\n"
            if _fds:
                # The descriptors travel with the line's first byte; the rest follows as usual.
                sent = socket.send_fds(conn, [request], list(_fds))
                conn.sendall(request[sent:])
            else:
                conn.sendall(request)
            line = _read_line(conn)
        except OSError:
            line = b""  # reset or refused mid-call: the agent is going away
        except BaseException:
            conn.close()
            self._conn = None
            raise
        if not line:
            conn.close()
            self._conn = None
            raise AgentGone(f"the local rgrid agent stopped during '{method}' (see {_log_hint()})")
        reply = json.loads(line)
        if "error" in reply:
            raise _error(reply["error"])
        return reply["result"]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # The Client protocol (rgrid/client/protocol.py): each call by its own name, with its
    # arguments as JSON values (a spec as its body, a path as text).
    def submit(self, spec: RunSpec, *, stdin_source=None) -> dict:
        """``stdin_source``: this process's stdin (an ``FdReader``), whose descriptor the agent
        receives and reads from then on."""
        body = spec.submit_body(stdin=stdin_source is not None)
        if stdin_source is None:
            return self._call("submit", spec=body)  # type: ignore[return-value]
        fd = getattr(stdin_source, "fd", None)
        if not isinstance(fd, int):
            raise errors.BadInput("the local rgrid agent takes stdin only as a descriptor")
        return self._call("submit", _fds=(fd,), spec=body)  # type: ignore[return-value]

    def get(self, execution_id: str, check_store: bool = False) -> dict:
        return self._call("get", execution_id=execution_id, check_store=check_store)  # type: ignore[return-value]

    def cancel(self, execution_id: str) -> dict:
        return self._call("cancel", execution_id=execution_id)  # type: ignore[return-value]

    def why(self, execution_id: str) -> dict:
        return self._call("why", execution_id=execution_id)  # type: ignore[return-value]

    def list(self, limit: int, standalone: bool = False) -> list[dict]:
        return self._call("list", limit=limit, standalone=standalone)  # type: ignore[return-value]

    def logs(self, execution_id: str, offset: int, wait: bool = False) -> dict:
        return self._call("logs", execution_id=execution_id, offset=offset, wait=wait)  # type: ignore[return-value]

    def missing(self, digests: list[str]) -> list[str]:
        return self._call("missing", digests=digests)  # type: ignore[return-value]

    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None:
        """The agent reads the file itself: it runs on this machine as this user."""
        self._call("upload", name=item.name, path=str(item.path.resolve()), size=item.size,
                   sha256=item.sha256)  # fmt: skip
        advance(item.size)

    def download_outputs(
        self,
        execution: dict,
        dest: Path,
        advance: Callable[[int], None] = lambda n: None,
        paths: list[str] | None = None,
    ) -> list[Path]:
        written = self._call(
            "download_outputs", execution=execution, dest=str(dest.resolve()), paths=paths
        )
        advance(sum(o["size"] for o in execution.get("outputs") or []))
        return [Path(p) for p in written]  # type: ignore[union-attr]

    def create_batch(
        self, spec: RunSpec, parallel: int | None = None, size: int | None = None
    ) -> dict:
        return self._call("create_batch", spec=spec.batch_body(), parallel=parallel, size=size)  # type: ignore[return-value]

    def add_batch_inputs(self, batch_id: str, inputs: list[dict]) -> dict:
        return self._call("add_batch_inputs", batch_id=batch_id, inputs=inputs)  # type: ignore[return-value]

    def start_batch(self, batch_id: str) -> dict:
        return self._call("start_batch", batch_id=batch_id)  # type: ignore[return-value]

    def batch(self, batch_id: str) -> dict:
        return self._call("batch", batch_id=batch_id)  # type: ignore[return-value]

    def batch_executions(
        self, batch_id: str, after: str = "", finished_since: str | None = None, limit: int = 500
    ) -> list[dict]:
        return self._call(  # type: ignore[return-value]
            "batch_executions",
            batch_id=batch_id,
            after=after,
            finished_since=finished_since,
            limit=limit,
        )

    def cancel_batch(self, batch_id: str) -> dict:
        return self._call("cancel_batch", batch_id=batch_id)  # type: ignore[return-value]

    def retry_batch(self, batch_id: str) -> dict:
        return self._call("retry_batch", batch_id=batch_id)  # type: ignore[return-value]

    def list_batches(self, limit: int) -> list[dict]:
        return self._call("list_batches", limit=limit)  # type: ignore[return-value]

    def cache_stats(self) -> dict:
        return self._call("cache_stats")  # type: ignore[return-value]

    def cache_entries(self, limit: int) -> list[dict]:
        return self._call("cache_entries", limit=limit)  # type: ignore[return-value]

    def cache_purge(self, older_than_s: int | None, everything: bool) -> dict:
        return self._call("cache_purge", older_than_s=older_than_s, everything=everything)  # type: ignore[return-value]

    # The agent's own calls.
    def ping(self) -> dict:
        return self._call("ping")  # type: ignore[return-value]

    def shutdown(self) -> dict:
        return self._call("shutdown")  # type: ignore[return-value]


def _read_line(conn: socket.socket) -> bytes:
    """One reply line. Unbuffered reads of a socket file would be simpler, but a buffered
    reader left behind by Ctrl-C could hold the start of the next reply."""
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


def _error(detail: dict) -> errors.RGridError:
    kind = getattr(errors, str(detail.get("type")), None)
    if isinstance(kind, type) and issubclass(kind, errors.RGridError):
        return kind(detail["message"])
    return errors.RGridError(detail["message"])


def _log_hint() -> str:
    return "agent.log in the rgrid data folder"


def log_path(settings: Settings) -> Path:
    return settings.data_dir / "agent.log"


def start_agent(settings: Settings, path: Path) -> None:
    """Start an agent for ``path``, detached from this terminal (its own session), so that
    Ctrl-C here never reaches it. It ends itself after ``agent_idle_s`` with nothing to do."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log_path(settings), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "rgrid.client.agent", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def connect_or_start(settings: Settings) -> AgentClient | None:
    """The agent for this data folder and these settings, started if need be; None when it
    does not answer in time (the caller then runs in process)."""
    path = socket_path(settings)
    try:
        return AgentClient.connect(path, timeout_s=2.0)
    except OSError:
        pass
    start_agent(settings, path)
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            return AgentClient.connect(path, timeout_s=2.0)
        except OSError:
            continue
    return None


def stop_agents(settings: Settings, timeout_s: float = 20.0) -> int:
    """Ask every agent of this data folder to stop (cancelling what it runs); returns how many
    answered. Leftover sockets of agents that were killed are removed."""
    stopped = 0
    for path in agent_sockets(settings):
        try:
            client = AgentClient.connect(path, timeout_s=2.0)
        except OSError:
            path.unlink(missing_ok=True)
            continue
        try:
            client.shutdown()
            stopped += 1
        except errors.RGridError:
            pass
        finally:
            client.close()
        deadline = time.monotonic() + timeout_s
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return stopped
