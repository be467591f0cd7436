"""What the pipeline's steps need from their surroundings (settings, database, object store,
log buffer, locks, Docker, the host registry), built once per worker process or CLI run."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import docker
from sqlalchemy.orm import Session, sessionmaker

from rgrid.core.config import Settings
from rgrid.core.locks import LockFactory
from rgrid.host import pool, sandbox
from rgrid.host.docker_engine import get_docker
from rgrid.host.hosts import HostRegistry
from rgrid.pipeline.logs import MAX_CHUNK_CHARS, system_note
from rgrid.store.channels import ScriptChannels
from rgrid.store.logbuffer import LogBuffer, stored_size
from rgrid.store.objectstore import ObjectStore


@dataclass
class PipelineContext:
    """What the steps need from their surroundings; built once per worker process or CLI run."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    logs: LogBuffer
    locks: LockFactory
    #: Environment variables and stdin on their way to the script.
    channels: ScriptChannels
    docker_factory: Callable[[], docker.DockerClient] = get_docker
    #: Warm sandboxes kept per environment; None: the operator's setting. The embedded
    #: default keeps one, for the environment it last used.
    pool_size: int | None = None
    #: Work started off the user's path (refilling the pool). A process that is about to
    #: exit joins these first.
    background: list[threading.Thread] = field(default_factory=list)
    #: True for the embedded default: the pipeline runs in the CLI's own process.
    embedded: bool = False
    #: Which hosts hold which environment (server side); None: one host, nothing to share.
    hosts: HostRegistry | None = None

    @cached_property
    def docker(self) -> docker.DockerClient:
        return self.docker_factory()

    @property
    def limits(self) -> sandbox.Limits:
        return sandbox.Limits.from_settings(self.settings)

    @property
    def pool(self) -> pool.PoolSettings:
        s = self.settings
        return pool.PoolSettings(
            root=s.sandboxes_dir,
            size=s.pool_size if self.pool_size is None else self.pool_size,
            max_total=s.pool_max,
            idle_s=s.pool_idle_s,
        )

    def note(self, execution_id: str, text: str) -> None:
        """A line from RGrid itself in the execution's log (cache decisions, limits hit)."""
        system_note(self, execution_id, text)

    def phase(self, execution_id: str, text: str) -> None:
        """The start of a phase a user waits through (resolving, installing, starting): the
        CLI shows one line per phase with its elapsed time."""
        self.logs.append(execution_id, "phase", text)

    def detail(self, execution_id: str) -> Callable[[str], None]:
        """A sink for an installer's raw output: kept in the log, shown with ``-v``. Bounded
        like the script's own output (an index chooses what the installer prints)."""
        room = self.settings.max_log_bytes

        def sink(line: str) -> None:
            nonlocal room
            line = line[:MAX_CHUNK_CHARS]
            room -= stored_size("detail", line)
            if room >= 0:
                self.logs.append(execution_id, "detail", line)

        return sink

    @property
    def worker_id(self) -> str:
        """Who runs a script: this host and process (the pid changes in each Celery child)."""
        prefix = "embedded:" if self.embedded else ""
        return f"{prefix}{socket.gethostname()}:{os.getpid()}"

    def warm(self, environment: str | None) -> None:
        """Tell the grid this host has ``environment``, so later runs of it come here."""
        if self.hosts is not None and environment:
            with contextlib.suppress(Exception):  # only a preference: never fail a run for it
                self.hosts.has_environment(self.settings.host_name, environment)

    def join_background(self, timeout_s: float = 30) -> None:
        for thread in self.background:
            thread.join(timeout_s)
        self.background.clear()
