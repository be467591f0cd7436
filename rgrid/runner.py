"""Runs a script image in the sandbox DESIGN.md asks for, and collects what it wrote.

The container gets no network, a non-root user, a read-only root with ``/work`` (a per-execution
volume) and ``/tmp`` (a tmpfs) writable, memory/CPU/PID limits, no capabilities and no new
privileges. The wall-clock deadline is enforced here, because ``wait(timeout=...)`` is only an
HTTP read timeout; and the container and its volume are removed here, never by ``auto_remove``,
so its logs cannot vanish before they are read.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import docker
from docker.types import Mount

from rgrid.builder import SCRIPT_PATH
from rgrid.docker_engine import (
    DEADLINE_GRACE_S,
    DEADLINE_LABEL,
    EXECUTION_LABEL,
    MANAGED_LABEL,
)

WORK_DIR = "/work"
OUTPUTS_DIR = "/work/outputs"


@dataclass(frozen=True)
class Sandbox:
    user: str = "1000:1000"
    memory: str = "1g"
    cpus: float = 1.0
    pids: int = 256
    tmp_size: str = "256m"
    max_output_bytes: int = 1024**3


@dataclass
class RunResult:
    exit_code: int | None
    timed_out: bool
    run_s: float
    outputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _owned_dir(name: str, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.uid, info.gid = uid, gid
    info.mtime = int(time.time())
    return info


def write_work_archive(dest: BinaryIO, user: str, inputs: list[tuple[str, Path]]) -> None:
    """The tar copied into /work before the script starts: ``outputs/`` and every input, owned
    by the sandbox user. With every capability dropped, even root in the container could not
    fix ownership later, so it is set in the archive."""
    uid, gid = (int(part) for part in user.split(":"))
    with tarfile.open(fileobj=dest, mode="w") as tar:
        tar.addfile(_owned_dir("outputs", uid, gid))
        made = set()
        for name, source in sorted(inputs):
            parents = list(PurePosixPath(name).parents)[:-1]
            for parent in reversed(parents):
                if str(parent) not in made:
                    tar.addfile(_owned_dir(str(parent), uid, gid))
                    made.add(str(parent))
            info = tarfile.TarInfo(name)
            info.size = source.stat().st_size
            info.mode = 0o644
            info.uid, info.gid = uid, gid
            info.mtime = int(source.stat().st_mtime)
            with open(source, "rb") as fh:
                tar.addfile(info, fh)


class _ChunkReader(io.RawIOBase):
    """Lets tarfile read docker-py's chunk generator as a stream, in constant memory."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _remove_leftovers(client: docker.DockerClient, name: str, volume: str) -> None:
    """A redelivered task may find the container of an earlier attempt: start clean."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(name, force=True)
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_volume(volume, force=True)


class _OutputStream:
    """The container's stdout and stderr, attached to *before* it starts (as `docker run`
    does): a container that exits at once can no longer be attached to, and its output would
    be lost. If streaming fails before the first chunk, the whole output is read back from the
    engine instead."""

    def __init__(
        self, client: docker.DockerClient, container_id: str, on_output: Callable[[str, str], None]
    ):
        self.client, self.container_id, self.on_output = client, container_id, on_output
        self.streamed = False
        self._stream = client.api.attach(
            container_id, stdout=True, stderr=True, stream=True, logs=True, demux=True
        )
        self.thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self) -> None:
        decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        try:
            for out, err in self._stream:
                for name, data in (("stdout", out), ("stderr", err)):
                    if data and (text := decoders[name].decode(data)):
                        self.streamed = True
                        self.on_output(name, text)
        except Exception:  # noqa: BLE001 - the fallback below reads what was missed
            return
        for name, decoder in decoders.items():
            if tail := decoder.decode(b"", final=True):
                self.on_output(name, tail)
        self.streamed = True

    def finish(self) -> None:
        self.thread.join(30)
        if self.streamed or self.thread.is_alive():
            return
        for name in ("stdout", "stderr"):
            data = self.client.api.logs(
                self.container_id, stdout=name == "stdout", stderr=name == "stderr"
            )
            if data:
                self.on_output(name, data.decode("utf-8", errors="replace"))


def _collect_outputs(
    client: docker.DockerClient, container_id: str, dest: Path, limit: int, notes: list[str]
) -> list[dict]:
    """Copy regular files under /work/outputs to ``dest``; links are reported, not followed."""
    try:
        chunks, _stat = client.api.get_archive(container_id, OUTPUTS_DIR)
    except docker.errors.NotFound:
        notes.append("the script removed /work/outputs; no outputs collected")
        return []
    outputs: list[dict] = []
    total = 0
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(iter(chunks))), mode="r|") as tar:
        for member in tar:
            rel = PurePosixPath(member.name)
            parts = rel.parts[1:]  # drop the leading "outputs"
            if not parts or ".." in parts or rel.is_absolute():
                continue
            relpath = "/".join(parts)
            if member.isdir():
                continue
            if not member.isreg():
                notes.append(f"skipped outputs/{relpath}: not a regular file (links not followed)")
                continue
            total += member.size
            if total > limit:
                raise OutputLimitExceeded(
                    f"outputs exceed the {limit} byte limit (at outputs/{relpath})"
                )
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            source = tar.extractfile(member)
            assert source is not None
            with open(target, "wb") as fh:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    fh.write(chunk)
            outputs.append({"path": relpath, "size": member.size, "sha256": digest.hexdigest()})
    return outputs


class OutputLimitExceeded(Exception):
    pass


def run_script(
    client: docker.DockerClient,
    *,
    execution_id: str,
    image: str,
    args: list[str],
    timeout_s: int,
    sandbox: Sandbox,
    outputs_dest: Path,
    on_output: Callable[[str, str], None],
    inputs: list[tuple[str, Path]] | None = None,
) -> RunResult:
    """Run the script image with ``inputs`` (name in /work, local file) placed in /work."""
    name = f"rgrid-run-{execution_id}"
    volume = f"rgrid-work-{execution_id}"
    labels = {
        MANAGED_LABEL: "1",
        EXECUTION_LABEL: execution_id,
        DEADLINE_LABEL: str(int(time.time()) + timeout_s + DEADLINE_GRACE_S),
    }
    _remove_leftovers(client, name, volume)
    client.volumes.create(name=volume, labels=labels)
    container = None
    try:
        host_config = client.api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={sandbox.tmp_size},mode=1777"},
            mounts=[Mount(WORK_DIR, volume, type="volume")],
            mem_limit=sandbox.memory,
            memswap_limit=sandbox.memory,
            nano_cpus=int(sandbox.cpus * 1e9),
            pids_limit=sandbox.pids,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=False,
        )
        # create + start, never containers.run(): run() silently tries to pull a missing image.
        container = client.api.create_container(
            image,
            command=["python3", SCRIPT_PATH, *args],
            user=sandbox.user,
            working_dir=WORK_DIR,
            labels=labels,
            host_config=host_config,
            name=name,
            network_disabled=True,
        )
        cid = container["Id"]
        # Spooled to disk and streamed: inputs can be gigabytes.
        with tempfile.TemporaryFile() as archive:
            write_work_archive(archive, sandbox.user, inputs or [])
            archive.seek(0)
            client.api.put_archive(cid, WORK_DIR, archive)

        started = time.monotonic()
        output = _OutputStream(client, cid, on_output)
        client.api.start(cid)
        output.thread.start()
        exit_holder: dict[str, int] = {}
        waiter = threading.Thread(
            target=lambda: exit_holder.update(client.api.wait(cid, timeout=None)),
            daemon=True,
        )
        waiter.start()
        waiter.join(timeout_s)
        timed_out = waiter.is_alive()
        if timed_out:
            try:
                client.api.kill(cid)
            except docker.errors.APIError:
                pass  # It exited between the deadline and the kill.
            waiter.join(30)
        run_s = time.monotonic() - started
        output.finish()

        result = RunResult(
            exit_code=None if timed_out else exit_holder.get("StatusCode"),
            timed_out=timed_out,
            run_s=run_s,
        )
        outputs_dest.mkdir(parents=True, exist_ok=True)
        result.outputs = _collect_outputs(
            client, cid, outputs_dest, sandbox.max_output_bytes, result.notes
        )
        return result
    finally:
        _remove_leftovers(client, name, volume)
