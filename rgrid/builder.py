"""Builds a script image: the runtime (or dependency) image plus one layer holding the script.

The layer is made by creating a container from the base image (never started), copying the
script in with ``put_archive`` and committing it. That is what a one-line ``COPY`` Dockerfile
does, without the classic builder's per-instruction containers: no BuildKit in docker-py, and a
``# syntax=`` line would try to pull a frontend image.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable

import docker

from rgrid.docker_engine import MANAGED_LABEL
from rgrid.errors import BuildError

APP_DIR = "/app"
SCRIPT_NAME = "script.py"
SCRIPT_PATH = f"{APP_DIR}/{SCRIPT_NAME}"


def script_archive(script: bytes) -> bytes:
    """The script as a root-owned, world-readable file: the sandbox user may read, not write."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(SCRIPT_NAME)
        info.size = len(script)
        info.mode = 0o644
        info.uid = info.gid = 0
        info.mtime = 0
        tar.addfile(info, io.BytesIO(script))
    return buf.getvalue()


def _image_id(client: docker.DockerClient, ref: str) -> str | None:
    try:
        return client.api.inspect_image(ref)["Id"]
    except docker.errors.ImageNotFound:
        return None


def _remove_if_unused(client: docker.DockerClient, image_id: str) -> None:
    """The image the tag pointed to before (another database on this host built the same key):
    untagged now, nothing would ever purge it."""
    try:
        client.api.remove_image(image_id)
    except docker.errors.APIError:
        pass  # Still tagged elsewhere or used by a container: not ours to remove.


def build_script_image(
    client: docker.DockerClient,
    base_image: str,
    script: bytes,
    tag: str,
    labels: dict[str, str],
    log: Callable[[str], None],
) -> float:
    """Commit ``base_image`` + the script as ``tag``. Returns the seconds it took."""
    started = time.monotonic()
    superseded = _image_id(client, tag)
    repository, _, version = tag.partition(":")
    all_labels = {MANAGED_LABEL: "1", **labels}
    container = None
    try:
        log(f"FROM {base_image}\n")
        container = client.api.create_container(base_image, command=["true"])
        log(f"COPY {SCRIPT_NAME} {SCRIPT_PATH} ({len(script)} bytes)\n")
        client.api.put_archive(container["Id"], APP_DIR, script_archive(script))
        changes = [f"LABEL {key}={value}" for key, value in all_labels.items()]
        image = client.api.commit(
            container["Id"], repository=repository, tag=version or "latest", changes=changes
        )
        log(f"committed {tag} ({image['Id'][7:19]})\n")
        if superseded and superseded != image["Id"]:
            _remove_if_unused(client, superseded)
    except docker.errors.APIError as exc:
        raise BuildError(f"image build failed: {exc.explanation or exc}") from exc
    finally:
        if container is not None:
            try:
                client.api.remove_container(container["Id"], force=True)
            except docker.errors.APIError:
                pass  # Already gone; nothing to clean.
    return time.monotonic() - started
