"""Errors a user can act on.

Every error that reaches a user is an ``RGridError``: the CLI prints its message on one line
and exits 125 (``rgrid.cli.EXIT_RGRID``), the API turns it into a JSON body with
``http_status``. Anything else is a bug: it surfaces in the server's log with its detail, and
to the user as ``internal_error`` (never the exception's own text, which can carry Docker API
URLs and connection-pool messages).
"""

from __future__ import annotations


class RGridError(Exception):
    """A failure with a one-line explanation meant for the user."""

    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(RGridError):
    """The request itself is wrong: fix it and try again."""


class UnknownRuntime(BadInput):
    """The runtime name maps to no base image."""


class OverQuota(BadInput):
    """An account is over one of its caps for now (open uploads, staged bytes): the request
    is fine, and succeeds once what the account already has in progress finishes."""

    http_status = 429


class NotFound(RGridError):
    http_status = 404


class LostFromStore(NotFound):
    """Something RGrid stored (an execution's log, an output file) is no longer in the object
    store although the database says it was put there: the store lost it. Said as such, so
    that a lost log is not shown as an empty one, nor a lost file as a failed download."""

    @classmethod
    def log(cls, execution_id: str) -> LostFromStore:
        return cls(f"the log of execution {execution_id} is lost from the object store")

    @classmethod
    def output(cls, path: str) -> LostFromStore:
        return cls(f"output {path} is lost from the object store")

    @classmethod
    def outputs(cls, paths: list[str]) -> LostFromStore:
        """Outputs packed together (store/output_blobs.py) are lost together: named, on one line."""
        if len(paths) == 1:
            return cls.output(paths[0])
        named = ", ".join(paths[:3])
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        return cls(f"outputs {named}{more} ({len(paths)}) are lost from the object store")


class AuthError(RGridError):
    http_status = 401


class ServiceUnavailable(RGridError):
    """A component RGrid depends on (Docker, the API, a database) cannot be reached. The
    message names the service, then (after ": ") the cause."""

    http_status = 503

    @property
    def summary(self) -> str:
        """The service, without the cause: the cause's text can carry internal addresses and
        library messages, so a server tells its users only this (and logs the rest)."""
        return self.message.split(": ", 1)[0]


class BuildError(RGridError):
    """An image could not be built; the message carries the builder's own words."""


def user_message(exc: BaseException, doing: str, reference: str) -> str:
    """What a user is told when work for them raised ``exc`` while ``doing`` something: an
    RGridError's own words, else (a bug, or a service of ours failing) that something went wrong
    on our side, with a reference the operator finds in the server's log."""
    if isinstance(exc, RGridError) and not isinstance(exc, ServiceUnavailable):
        return exc.message
    return f"internal error while {doing}; reference {reference}"
