"""An execution's statuses and the moves between them, in one place."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    BUILD_FAILED = "build_failed"
    CANCELLED = "cancelled"
    ERROR = "error"


TERMINAL_STATUSES = frozenset(
    {
        Status.SUCCEEDED,
        Status.FAILED,
        Status.TIMED_OUT,
        Status.BUILD_FAILED,
        Status.CANCELLED,
        Status.ERROR,
    }
)

#: Where each status may go next. A terminal status goes nowhere: an execution ends once.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.BUILDING, Status.RUNNING}) | TERMINAL_STATUSES,
    Status.BUILDING: frozenset({Status.RUNNING}) | TERMINAL_STATUSES,
    # A redelivered run step (its worker died) re-attaches to the sandbox running the script.
    Status.RUNNING: frozenset({Status.RUNNING}) | TERMINAL_STATUSES,
    **{status: frozenset() for status in TERMINAL_STATUSES},
}


class IllegalTransition(Exception):
    pass


def check_transition(current: str, new: str) -> Status:
    """``new`` as a Status, if an execution in ``current`` may move there."""
    target = Status(new)
    if target not in TRANSITIONS[Status(current)]:
        raise IllegalTransition(f"an execution cannot go from {current} to {new}")
    return target
