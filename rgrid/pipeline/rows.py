"""The one way the pipeline loads and commits an execution's row, and waits out a service's
momentary outage while doing so. Light on purpose (no Docker, no host code): the service's
cancel and the log helpers use it from the API's process too."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session, object_session, sessionmaker

from rgrid.core import cache_keys
from rgrid.core.db import session_scope
from rgrid.core.errors import RGridError, ServiceUnavailable
from rgrid.core.models import Execution
from rgrid.core.statuses import TERMINAL_STATUSES

log = logging.getLogger(__name__)
T = TypeVar("T")


class HasDatabase(Protocol):
    """Anything that opens sessions: a PipelineContext, or the API's services."""

    @property
    def session_factory(self) -> sessionmaker[Session]: ...


@contextmanager
def optional_row(ctx: HasDatabase, execution_id: str) -> Iterator[Execution | None]:
    """Load, change and commit one execution's row; None if there is no such row (an
    execution deleted while its step or watch was on its way)."""
    with session_scope(ctx.session_factory) as session:
        yield session.get(Execution, execution_id)


@contextmanager
def execution_row(ctx: HasDatabase, execution_id: str) -> Iterator[Execution]:
    """Load, change and commit one execution's row: the one way the steps touch it."""
    with optional_row(ctx, execution_id) as execution:
        if execution is None:
            raise RGridError(f"execution {execution_id} not found")
        yield execution


def session_of(execution: Execution) -> Session:
    """The session an ``execution_row`` row is held in, for the cache tables read beside it
    in the same transaction."""
    session = object_session(execution)
    assert session is not None
    return session


#: How long a step waits for a service to come back before giving up on a result it holds.
PATIENCE_S = 120.0


def patiently(fn: Callable[[], T]) -> T:
    """Call ``fn`` until a momentary outage (database, Redis, object store: all raise
    ServiceUnavailable) has passed, for up to ``PATIENCE_S``. For what comes after a script
    ran: its result must not be lost to a restart, and running the script again to recover
    it is no answer."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    retrying = Retrying(
        retry=retry_if_exception_type(ServiceUnavailable),
        stop=stop_after_delay(PATIENCE_S),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=lambda state: log.warning(
            "waiting for a service: %s", state.outcome.exception() if state.outcome else ""
        ),
        reraise=True,
    )
    return retrying(fn)


def update_execution(
    ctx: HasDatabase, execution_id: str, change: Callable[[Execution], None]
) -> Execution:
    """Change the row and commit, patiently (see ``patiently``); returns the row committed."""

    def attempt() -> Execution:
        with execution_row(ctx, execution_id) as execution:
            change(execution)
        return execution

    return patiently(attempt)


def finished(execution: Execution) -> bool:
    """Over, or its end decided: a step finding it so does nothing (a redelivered task)."""
    return execution.status in TERMINAL_STATUSES or execution.outcome is not None


def has_dependencies(execution: Execution) -> bool:
    return cache_keys.has_dependencies(execution.dependency_hash)
