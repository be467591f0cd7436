"""What the CLI talks to, whichever it is: a remote RGrid API (``RemoteClient``), the
embedded default in this process (``EmbeddedClient``) or the embedded default's agent
(``AgentClient``). Every one offers the calls of ``Client``, so every CLI command works the
same way against each; the agent serves exactly these calls (``CALLS``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from rgrid.core.config import Settings
from rgrid.core.spec import RunSpec
from rgrid.store.channels import StdinSource
from rgrid.store.inputs import InputFile


class Client(Protocol):
    """``logs(..., wait=True)`` returns as soon as there is something new (or after a few
    seconds with nothing), and its last page carries the finished ``execution``."""

    # Executions.
    def submit(self, spec: RunSpec, *, stdin_source: StdinSource | None = None) -> dict: ...
    def get(self, execution_id: str, check_store: bool = False) -> dict:
        """``check_store``: also ask the object store whether the log and outputs it was
        given are still there (``log_lost``, ``lost_outputs``)."""
        ...

    def why(self, execution_id: str) -> dict: ...
    def cancel(self, execution_id: str) -> dict: ...
    def list(self, limit: int, standalone: bool = False) -> list[dict]: ...
    def logs(self, execution_id: str, offset: int, wait: bool = False) -> dict: ...
    def download_outputs(
        self,
        execution: dict,
        dest: Path,
        advance: Callable[[int], None] = ...,
        paths: list[str] | None = None,
    ) -> list[Path]:
        """``paths``: only the outputs these name (``select_outputs``); all without."""
        ...

    # Inputs.
    def missing(self, digests: list[str]) -> list[str]: ...
    def upload(self, item: InputFile, advance: Callable[[int], None]) -> None: ...

    # Batches: created, filled in pages, started, followed.
    def create_batch(
        self, spec: RunSpec, parallel: int | None = None, size: int | None = None
    ) -> dict: ...
    def add_batch_inputs(self, batch_id: str, inputs: list[dict]) -> dict: ...
    def start_batch(self, batch_id: str) -> dict: ...
    def batch(self, batch_id: str) -> dict: ...
    def batch_executions(
        self, batch_id: str, after: str = "", finished_since: str | None = None, limit: int = 500
    ) -> list[dict]: ...
    def cancel_batch(self, batch_id: str) -> dict: ...
    def retry_batch(self, batch_id: str) -> dict: ...
    def list_batches(self, limit: int) -> list[dict]: ...

    # The output cache.
    def cache_stats(self) -> dict: ...
    def cache_entries(self, limit: int) -> list[dict]: ...
    def cache_purge(self, older_than_s: int | None, everything: bool) -> dict: ...


#: The names of the protocol's calls: all a client offers, and all the agent serves.
CALLS = frozenset(
    name for name, value in vars(Client).items() if callable(value) and not name.startswith("_")
)


def make_run_client(settings: Settings) -> Client:
    """The client for `rgrid run`. The embedded default goes through its agent
    (rgrid/client/agent.py), which keeps the pipeline loaded between runs, unless the agent is
    turned off (RGRID_AGENT=0). Forwarded stdin goes too: the agent is handed the descriptor
    itself (the script reads it there)."""
    if settings.embedded and settings.agent:
        from rgrid.client.agent_client import connect_or_start

        client = connect_or_start(settings)
        if client is not None:
            return client
    return make_client(settings)


def make_client(settings: Settings) -> Client:
    if settings.embedded:
        # Imported only here: the database, Docker and pipeline code is heavy to import, and
        # the remote client needs none of it.
        from rgrid.client.embedded import EmbeddedClient
        from rgrid.service.context import embedded_context

        return EmbeddedClient(embedded_context(settings))
    # Imported only here too: http.client (and the email parser it brings) is a quarter of the
    # CLI's import time, and the embedded default's agent speaks over a socket without it.
    from rgrid.client.remote import RemoteClient

    return RemoteClient(settings.api_url, settings.api_key, settings.api_retry_s)  # type: ignore[arg-type]
