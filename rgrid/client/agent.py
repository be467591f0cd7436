"""The embedded default's agent: one long-lived process per data folder (and per set of
settings) that keeps the pipeline imported, the database open and the warm pool's refills
running, so a warm `rgrid run` costs a CLI start and a few round trips over a Unix socket.

The CLI starts it on first use (rgrid/client/agent_client.py), as Docker's CLI has a
daemon and Gradle its build daemon; it ends itself after ``agent_idle_s`` with no client
connected, on
`rgrid agent stop`, and on SIGTERM/SIGINT, cancelling whatever it still runs. Everything it
does is what the in-process ``EmbeddedClient`` does; a connection owns the executions it
submitted, and closing it early (the client was killed) cancels them. A client's stdin comes
as a descriptor passed with its ``submit`` (SCM_RIGHTS), read here as the script reads it.

Run as ``python -m rgrid.client.agent SOCKET_PATH``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

from rgrid.client.embedded import EmbeddedClient
from rgrid.client.protocol import CALLS
from rgrid.core.config import Settings, get_settings
from rgrid.core.errors import RGridError
from rgrid.core.spec import RunSpec
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.service.cancelling import cancel
from rgrid.service.context import embedded_context
from rgrid.store.channels import PassedStdin
from rgrid.store.inputs import InputFile

log = logging.getLogger("rgrid.client.agent")

#: How long stopping waits for cancelled executions to end before exiting anyway (their
#: sandboxes' own deadlines and the next start's recovery end the rest).
STOP_WAIT_S = 15.0
#: The agent's own calls, besides the ``Client`` protocol's.
AGENT_CALLS = frozenset({"ping", "shutdown"})


class Agent:
    def __init__(self, settings: Settings, path: Path):
        self.settings = settings
        self.path = path
        self.client = EmbeddedClient(embedded_context(settings))
        self._lock = threading.Lock()
        self._connections = 0
        self._last_active = time.monotonic()
        #: Executions submitted through this agent that may still be running.
        self._live: set[str] = set()
        self.server: socketserver.ThreadingUnixStreamServer | None = None

    # Bookkeeping for the idle timeout and for what a closed connection leaves behind.
    def connected(self, delta: int) -> None:
        with self._lock:
            self._connections += delta

    def touch(self) -> None:
        with self._lock:
            self._last_active = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            if self._connections:
                return 0.0
            return time.monotonic() - self._last_active

    def abandon(self, owned: set[str]) -> None:
        """A connection closed: cancel what it submitted and did not see end."""
        for execution_id in owned:
            try:
                if self.client.get(execution_id)["status"] not in TERMINAL_STATUSES:
                    log.info("client left: cancelling %s", execution_id)
                    cancel(self.client.ctx, execution_id)
            except Exception:  # noqa: BLE001 - one failure must not keep the others running
                log.exception("could not cancel %s", execution_id)

    def stop_everything(self) -> None:
        """Cancel what still runs and wait (bounded) for it to end."""
        with self._lock:
            live = set(self._live)
        self.abandon(live)
        deadline = time.monotonic() + STOP_WAIT_S
        for execution_id in live:
            while time.monotonic() < deadline:
                if self.client.get(execution_id)["status"] in TERMINAL_STATUSES:
                    break
                time.sleep(0.1)
        self.client.ctx.join_background()

    # The calls a client makes; each returns JSON-ready values.
    def dispatch(self, method: str, args: dict, owned: set[str], fds: list[int]) -> object:
        """A call of the ``Client`` protocol (or the agent's own ``ping`` and ``shutdown``), by
        its name: a ``_serve_<name>`` method where its arguments or answer are not JSON values
        as they are, else the embedded client's call itself. ``fds``: descriptors passed with
        the request; the call takes over the ones it uses, the caller closes what is left."""
        if method not in CALLS | AGENT_CALLS:
            raise RGridError(f"the local rgrid agent has no call '{method}'")
        if method not in AGENT_CALLS:
            self.touch()  # `rgrid agent status` must not keep an idle agent alive
        serve = getattr(self, f"_serve_{method}", None)
        if serve is not None:
            return serve(args, owned, fds)
        return getattr(self.client, method)(**args)

    def _serve_submit(self, args: dict, owned: set[str], fds: list[int]) -> dict:
        body = args["spec"]
        stdin = None
        if body.get("stdin"):
            if len(fds) != 1:
                raise RGridError("the local rgrid agent got no stdin with this run")
            stdin = PassedStdin(fds.pop())
        try:
            result = self.client.submit(RunSpec.from_body(body), stdin_source=stdin)
        except BaseException:
            if stdin is not None:
                stdin.close()
            raise
        owned.add(result["execution_id"])
        with self._lock:
            self._live.add(result["execution_id"])
        return result

    def _serve_logs(self, args: dict, owned: set[str], fds: list[int]) -> dict:
        page = self.client.logs(args["execution_id"], args["offset"], args["wait"])
        if page.get("complete"):
            with self._lock:
                self._live.discard(args["execution_id"])
        return page

    def _serve_upload(self, args: dict, owned: set[str], fds: list[int]) -> None:
        item = InputFile(
            name=args["name"], path=Path(args["path"]), size=args["size"], sha256=args["sha256"]
        )
        self.client.upload(item, lambda n: None)

    def _serve_download_outputs(self, args: dict, owned: set[str], fds: list[int]) -> list[str]:
        written = self.client.download_outputs(
            args["execution"], Path(args["dest"]), paths=args.get("paths")
        )
        return [str(p) for p in written]

    def _serve_create_batch(self, args: dict, owned: set[str], fds: list[int]) -> dict:
        spec = RunSpec.from_body(args["spec"])
        return self.client.create_batch(spec, args.get("parallel"), args.get("size"))

    def _serve_ping(self, args: dict, owned: set[str], fds: list[int]) -> dict:
        return {"pid": os.getpid(), "socket": str(self.path)}

    def _serve_shutdown(self, args: dict, owned: set[str], fds: list[int]) -> dict:
        threading.Thread(target=self.shutdown, daemon=True).start()
        return {"pid": os.getpid()}

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        agent = self.server.agent
        owned: set[str] = set()
        agent.connected(+1)
        done = threading.Event()
        threading.Thread(
            target=_watch_hangup, args=(self.request, done, agent, owned), daemon=True
        ).start()
        try:
            for line, fds in _requests(self.request):
                request = json.loads(line)
                try:
                    reply = {
                        "result": agent.dispatch(request["method"], request["args"], owned, fds)
                    }
                except RGridError as exc:
                    reply = {"error": {"type": type(exc).__name__, "message": exc.message}}
                except Exception as exc:  # noqa: BLE001 - the client gets one line, the log the rest
                    log.exception("call %s failed", request.get("method"))
                    reply = {
                        "error": {
                            "type": "RGridError",
                            "message": f"internal error in the local rgrid agent: {exc}"
                            f" (details in {agent.settings.data_dir / 'agent.log'})",
                        }
                    }
                finally:
                    for fd in fds:  # passed with a call that did not take them
                        os.close(fd)
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            done.set()
            agent.connected(-1)
            if owned:
                agent.touch()
            agent.abandon(set(owned))


def _watch_hangup(conn: socket.socket, done: threading.Event, agent: Agent, owned: set) -> None:
    """Cancel a connection's executions as soon as its client hangs up, even while a call of
    it is still being answered: a follower's long poll of a quiet script (one waiting on its
    stdin) would otherwise notice only when the poll returns, seconds later. ``POLLRDHUP``
    is the peer's close alone; a next request does not raise it."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP)
    while not done.is_set():
        if poller.poll(500) and not done.is_set():
            agent.abandon(set(owned))
            return


#: At most this many descriptors come with one request (a run's stdin is one).
MAX_FDS = 4


def _requests(conn: socket.socket):
    """The connection's request lines, each with the descriptors passed with it. Read with
    ``recvmsg`` rather than a buffered file: descriptors arrive as ancillary data, which a
    file read drops (and the kernel then closes them). A client sends one request and waits
    for its answer, so what arrives before a line's end belongs to that line."""
    buffer = b""
    fds: list[int] = []
    while True:
        while b"\n" not in buffer:
            data, received, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS)
            fds.extend(received)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            buffer += data
        line, buffer = buffer.split(b"\n", 1)
        yield line, fds
        fds = []


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    agent: Agent


def _hold_lock(path: Path) -> object | None:
    """One agent per socket: the lock is held for the agent's lifetime, so a second one
    started at the same moment exits, and a socket file left by a killed agent can be
    replaced safely."""
    handle = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _watch_idle(agent: Agent, server: _Server) -> None:
    while True:
        time.sleep(1.0)
        if agent.idle_for() >= agent.settings.agent_idle_s:
            log.info("idle for %ss: stopping", agent.settings.agent_idle_s)
            server.shutdown()
            return


def serve(path: Path, settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    lock = _hold_lock(path)
    if lock is None:
        return 0  # another agent has it
    path.unlink(missing_ok=True)
    agent = Agent(settings, path)
    old_umask = os.umask(0o177)  # the socket: this user only (it carries --env values)
    try:
        server = _Server(str(path), _Handler)
    finally:
        os.umask(old_umask)
    server.agent = agent
    agent.server = server
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=_watch_idle, args=(agent, server), daemon=True).start()
    log.info("agent %d listening on %s", os.getpid(), path)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        # No new clients from here on; then end what still runs.
        path.unlink(missing_ok=True)
        server.server_close()
        agent.stop_everything()
        log.info("agent %d stopped", os.getpid())
    return 0


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s"
    )
    if len(sys.argv) != 2:
        print("usage: python -m rgrid.client.agent SOCKET_PATH", file=sys.stderr)
        return 2
    # Not a terminal's child any more (its own session): a closed socket must not kill it.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return serve(Path(sys.argv[1]))


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    raise SystemExit(main())
