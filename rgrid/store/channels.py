"""What reaches a running script besides its files: environment variables and piped stdin.

Both pass from the client to the one sandbox that runs the script and are kept nowhere else:
never in the database, the object store or a log. Environment variables are secrets
(``rgrid run --env API_TOKEN``): on a server they wait for their worker in Redis, encrypted
with the operator's ``RGRID_SECRET_KEY``, and are deleted when the execution ends. Stdin is
streamed in chunks through a Redis list that the worker drains into the sandbox as the script
reads it. The embedded default hands both over in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import threading
from typing import TYPE_CHECKING, Protocol

from rgrid.core import cache_keys
from rgrid.core.errors import BadInput
from rgrid.store.logbuffer import redis_unavailable

if TYPE_CHECKING:
    import redis

#: An environment variable name as a POSIX shell takes it.
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
#: What one execution's environment variables may add up to.
MAX_ENV_BYTES = 64 * 1024
MAX_ENV_VARS = 200
#: How long a queued execution's secrets wait for a worker before they are dropped.
ENV_TTL_S = 2 * 24 * 3600
#: Stdin chunks that may wait in Redis for a script that is not reading them.
STDIN_BACKLOG = 16
#: Set by RGrid in every sandbox; a user's value would break the script's imports.
RESERVED_ENV = frozenset({"PYTHONPATH", "HOME", "PATH"})


def check_env(env: object) -> dict[str, str]:
    """Names a shell would accept, string values, within a size a process environment holds."""
    if not isinstance(env, dict):
        raise BadInput("'env' must be an object of NAME: value strings")
    if len(env) > MAX_ENV_VARS:
        raise BadInput(f"at most {MAX_ENV_VARS} environment variables")
    size = 0
    for name, value in env.items():
        if not isinstance(name, str) or not re.fullmatch(ENV_NAME, name):
            raise BadInput(f"bad environment variable name {name!r}")
        if name in RESERVED_ENV:
            raise BadInput(f"{name} is set by RGrid in the sandbox and cannot be replaced")
        if not isinstance(value, str) or "\0" in value:
            raise BadInput(f"environment variable {name} must be text without NUL bytes")
        size += len(name) + len(value.encode()) + 2
    if size > MAX_ENV_BYTES:
        raise BadInput(f"environment variables exceed {MAX_ENV_BYTES // 1024} KiB")
    return dict(env)


class StdinSource(Protocol):
    def read(self, size: int = -1) -> bytes: ...
    def close(self) -> None: ...


class ScriptChannels(Protocol):
    def put_env(self, execution_id: str, env: dict[str, str]) -> None: ...
    def get_env(self, execution_id: str) -> dict[str, str] | None: ...
    def stdin(self, execution_id: str) -> StdinSource | None: ...
    def forget(self, execution_id: str) -> None: ...


class FdReader:
    """A file descriptor read with ``os.read``: returns what is there (a line typed, a chunk
    piped) without waiting for a full buffer, and holds no lock a daemon thread could still
    hold when the interpreter exits."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, size: int = -1) -> bytes:
        return os.read(self.fd, size if size > 0 else 64 * 1024)

    def close(self) -> None:
        """The caller's descriptor is the caller's to close."""


class PassedStdin:
    """A client's stdin handed to the agent over its Unix socket (SCM_RIGHTS): the agent owns
    this copy of the descriptor and must give it up when the execution ends.

    Closing a descriptor does not wake a thread blocked reading it, and a copy left open would
    keep reading the user's terminal (``-i``) or keep a pipe's writer from ever seeing its
    reader go. So a read waits with ``poll`` on the descriptor and on a wake-up pipe, and
    ``close`` writes to the pipe: the read returns EOF and the descriptor is closed. The
    descriptor is never made non-blocking: its open file is shared with the client's shell."""

    def __init__(self, fd: int):
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._closing = False
        self._reading = False

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if self._closing:
                return b""
            self._reading = True
        try:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            poller.register(self._wake_r, select.POLLIN)
            while True:
                ready = dict(poller.poll())
                if self._wake_r in ready:
                    return b""
                if self.fd in ready:
                    try:
                        return os.read(self.fd, size if size > 0 else 64 * 1024)
                    except OSError:
                        return b""  # the client's end went away: the script reads EOF
        finally:
            with self._lock:
                self._reading = False
                if self._closing:
                    self._release()

    def close(self) -> None:
        """Wake a waiting read (it returns EOF) and give the descriptor up; idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            os.write(self._wake_w, b"x")
            if not self._reading:
                self._release()

    def _release(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class MemoryChannels:
    """The embedded default: the script runs in this process, so both are handed over here."""

    def __init__(self) -> None:
        self._env: dict[str, dict[str, str]] = {}
        self._stdin: dict[str, StdinSource] = {}

    def put_env(self, execution_id: str, env: dict[str, str]) -> None:
        self._env[execution_id] = env

    def get_env(self, execution_id: str) -> dict[str, str] | None:
        return self._env.get(execution_id)

    def attach_stdin(self, execution_id: str, source: StdinSource) -> None:
        self._stdin[execution_id] = source

    def stdin(self, execution_id: str) -> StdinSource | None:
        return self._stdin.get(execution_id)

    def forget(self, execution_id: str) -> None:
        """The execution is over: a stdin it never read to the end is given up too (the
        agent's copy of a client's descriptor would otherwise stay open)."""
        self._env.pop(execution_id, None)
        source = self._stdin.pop(execution_id, None)
        if source is not None:
            source.close()


class RedisChannels:
    """Shared by the API, which receives both from the client, and the workers."""

    def __init__(self, client: redis.Redis, secret_key: str | None, max_stdin_bytes: int):
        self.client = client
        self.max_stdin_bytes = max_stdin_bytes
        self._fernet = None
        if secret_key:
            from cryptography.fernet import Fernet

            key = base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest())
            self._fernet = Fernet(key)

    @staticmethod
    def _env_key(execution_id: str) -> str:
        return cache_keys.execution_env_key(execution_id)

    @staticmethod
    def _stdin_key(execution_id: str) -> str:
        return cache_keys.execution_stdin_key(execution_id)

    @redis_unavailable
    def put_env(self, execution_id: str, env: dict[str, str]) -> None:
        if self._fernet is None:
            raise BadInput(
                "this RGrid server cannot take environment variables: its operator has not"
                " set RGRID_SECRET_KEY"
            )
        token = self._fernet.encrypt(json.dumps(env).encode())
        self.client.set(self._env_key(execution_id), token, ex=ENV_TTL_S)

    @redis_unavailable
    def get_env(self, execution_id: str) -> dict[str, str] | None:
        token = self.client.get(self._env_key(execution_id))
        if token is None or self._fernet is None:
            return None
        return json.loads(self._fernet.decrypt(token))

    @redis_unavailable
    def feed_stdin(self, execution_id: str, data: bytes, eof: bool) -> bool:
        """Append a chunk the client read from its stdin; an empty chunk marks the end.
        Returns False, appending nothing, while the script has not read what is already
        waiting: the client then waits, as a writer to a full pipe does, so Redis never
        holds more than ``STDIN_BACKLOG`` chunks of one execution."""
        key = self._stdin_key(execution_id)
        if data and self.client.llen(key) >= STDIN_BACKLOG:
            return False
        if data:
            total = self.client.incrby(key + ":bytes", len(data))
            if total > self.max_stdin_bytes:
                raise BadInput(f"stdin is larger than {self.max_stdin_bytes} bytes")
        pipe = self.client.pipeline()
        if data:
            pipe.rpush(key, data)
        if eof:
            pipe.rpush(key, b"")
        pipe.expire(key, ENV_TTL_S)
        pipe.expire(key + ":bytes", ENV_TTL_S)
        pipe.execute()
        return True

    def stdin(self, execution_id: str) -> StdinSource:
        return _RedisStdin(self.client, self._stdin_key(execution_id))

    @redis_unavailable
    def forget(self, execution_id: str) -> None:
        stdin = self._stdin_key(execution_id)
        self.client.delete(self._env_key(execution_id), stdin, stdin + ":bytes")


class _RedisStdin:
    """Blocks until the client's next chunk; an empty chunk (or ``close``) is the end."""

    POLL_S = 1

    def __init__(self, client: redis.Redis, key: str):
        self.client, self.key = client, key
        self._closed = threading.Event()
        self._pending = b""

    def read(self, size: int = -1) -> bytes:
        while not self._pending and not self._closed.is_set():
            item = self.client.blpop([self.key], timeout=self.POLL_S)
            if item is None:
                continue
            if item[1] == b"":
                self._closed.set()
                break
            self._pending = item[1]
        data = self._pending if size is None or size < 0 else self._pending[:size]
        self._pending = self._pending[len(data) :]
        return data

    def close(self) -> None:
        self._closed.set()
