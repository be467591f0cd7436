"""Access to the Docker engine: a client, with the one-line error a user sees when it is not
there, and whether it answers (what a worker host checks before and after a Docker step)."""

from __future__ import annotations

import os
import socket

import docker
from docker.errors import DockerException, ImageNotFound

from rgrid.core.errors import ServiceUnavailable


def get_docker() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except DockerException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceUnavailable(f"cannot reach the Docker engine: {reason}") from exc
    return client


def image_id(client: docker.DockerClient, image: str) -> str | None:
    """The id of ``image`` on this engine, or None when it has no such image (never pulls)."""
    try:
        return client.api.inspect_image(image)["Id"]
    except ImageNotFound:
        return None


def engine_answers() -> bool:
    """Whether the engine answers a ping on a new connection: a stopping dockerd closes its
    socket first but keeps serving the connections it has, so a step's own (kept alive)
    client would still get a ping."""
    try:
        client = docker.from_env(timeout=3)
    except Exception:  # noqa: BLE001 - no socket at all: not answering
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure is "not answering"
        return False
    finally:
        client.close()


def engine_accepts() -> bool:
    """Before a Docker step: whether the engine (``DOCKER_HOST``, as docker-py reads it) takes
    a new connection, which is what tells a stopping dockerd (see ``engine_answers``), for a
    connect instead of a whole new client and a ping (~25 ms a step, measured). An engine
    that accepts but no longer answers fails the step, which then asks ``engine_answers``."""
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    scheme, _, where = url.partition("://")
    try:
        if scheme == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(3)
                sock.connect(where)
        elif scheme == "tcp":
            host, _, port = where.rstrip("/").rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        else:  # ssh:// and the like: ask the engine itself
            return engine_answers()
    except (OSError, ValueError):
        return False
    return True
