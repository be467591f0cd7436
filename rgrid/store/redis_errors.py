"""Redis down is a service outage like any other: ServiceUnavailable (the log buffers and the
script channels both talk to Redis)."""

from __future__ import annotations

import functools

from rgrid.core.errors import ServiceUnavailable


def redis_unavailable(method):
    """Redis down is a service outage like any other: ServiceUnavailable, which the worker
    retries and the API answers with 503."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            return method(*args, **kwargs)
        except (ConnectionError, TimeoutError) as exc:
            raise ServiceUnavailable("the queue and log service (Redis) is unavailable") from exc

    return wrapper
