"""Errors a user can act on.

Every error that reaches a user is an ``RGridError``: the CLI prints its message on one line
and exits 125 (``rgrid.cli.EXIT_RGRID``), the API turns it into a JSON body with
``http_status``. Anything else is a bug and is allowed to surface as such.
"""


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


class NotFound(RGridError):
    http_status = 404


class AuthError(RGridError):
    http_status = 401


class ServiceUnavailable(RGridError):
    """A component RGrid depends on (Docker, the API, a database) cannot be reached."""

    http_status = 503


class BuildError(RGridError):
    """An image could not be built; the message carries the builder's own words."""
