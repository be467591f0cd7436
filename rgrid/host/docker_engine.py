"""Access to the Docker engine, with the one-line error a user sees when it is not there."""

from __future__ import annotations

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
