"""A sandbox's container: started (``start_box``), claimed, resized, killed, discarded.

Every container is created and started through the engine's API, never ``containers.run()``
(which silently tries to pull a missing image); a claim is an atomic rename; a container
removes itself when its supervisor exits (``auto_remove``), so ending one is a kill and the
removal of its host folder.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import docker
from docker.types import Mount

from rgrid.core.cache_keys import (
    DEADLINE_LABEL,
    EXECUTION_LABEL,
    HOST_DIR_LABEL,
    IDLE_UNTIL_LABEL,
    MANAGED_LABEL,
)
from rgrid.core.units import parse_bytes
from rgrid.host.runtimes import CONTAINER_HOME, WORK_DIR
from rgrid.host.sandbox import (
    DEPS_MOUNT,
    DISK_DIR,
    KILL_GRACE_S,
    META_MOUNT,
    RUN_NAME_PREFIX,
    Box,
    Environment,
    Limits,
    sandbox_uid_gid,
)
from rgrid.host.sandbox_fs import make_host_folder, remove_folder
from rgrid.host.sandbox_supervisor import SUPERVISOR


def start_box(
    client: docker.DockerClient,
    env: Environment,
    limits: Limits,
    *,
    root: Path,
    idle_s: float,
    name: str,
    labels: dict[str, str] | None = None,
) -> Box:
    """Create and start a sandbox that waits up to ``idle_s`` for its one job."""
    uid, gid = sandbox_uid_gid(limits)
    host_dir = make_host_folder(root, name, uid, gid, parse_bytes(limits.disk))
    host_config = _host_config(client, limits, _mounts(env, host_dir), uid, gid)
    all_labels = {
        MANAGED_LABEL: "1",
        HOST_DIR_LABEL: str(host_dir),
        IDLE_UNTIL_LABEL: str(int(time.time() + idle_s)),
        **(labels or {}),
    }
    config = client.api.create_container_config(
        env.image,
        command=["python3", "-I", "-S", "-c", SUPERVISOR, str(idle_s)],
        user=f"{uid}:{gid}",
        working_dir=WORK_DIR,
        labels=all_labels,
        host_config=host_config,
        network_disabled=True,
        stdin_open=True,
    )
    # Stdin closes when the claimer detaches, so a runner that dies before sending the job
    # leaves a supervisor that sees EOF and exits. docker-py has no keyword for it.
    config["StdinOnce"] = True
    container_id = _create_and_start(client, config, name, host_dir)
    return Box(name=name, container_id=container_id, host_dir=host_dir)


def _mounts(env: Environment, host_dir: Path) -> list[Mount]:
    """``/work`` and the supervisor's folder from the sandbox's own filesystem; the
    environment's dependency set, read-only."""
    mounts = [
        Mount(WORK_DIR, str(host_dir / DISK_DIR / "work"), type="bind"),
        Mount(META_MOUNT, str(host_dir / DISK_DIR / "meta"), type="bind"),
    ]
    if env.deps_dir is not None:
        mounts.append(Mount(DEPS_MOUNT, str(env.deps_dir), type="bind", read_only=True))
    return mounts


def _host_config(
    client: docker.DockerClient, limits: Limits, mounts: list[Mount], uid: int, gid: int
) -> dict:
    """Every limit of the sandbox: no network, a read-only root, size-limited tmpfs for
    ``/tmp`` and home, memory (no swap beyond it), CPUs, PIDs, no capabilities."""
    tmpfs_opts = "rw,nosuid,nodev"
    return client.api.create_host_config(
        network_mode="none",
        read_only=True,
        auto_remove=True,
        tmpfs={
            "/tmp": f"{tmpfs_opts},size={limits.tmp_size},mode=1777",
            CONTAINER_HOME: f"{tmpfs_opts},size={limits.home_size},uid={uid},gid={gid},mode=0700",
        },
        mounts=mounts,
        mem_limit=limits.memory,
        memswap_limit=limits.memory,
        nano_cpus=int(limits.cpus * 1e9),
        pids_limit=limits.pids,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        init=False,
    )


def _create_and_start(client: docker.DockerClient, config: dict, name: str, host_dir: Path) -> str:
    """The container's id, started; on any failure nothing is left behind."""
    try:
        # create + start, never containers.run(): run() silently tries to pull a missing image.
        created = client.api.create_container_from_config(config, name=name)
        client.api.start(created["Id"])
    except BaseException:
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_container(name, force=True)
        remove_folder(host_dir)
        raise
    return created["Id"]


def claim(client: docker.DockerClient, box: Box, execution_id: str) -> bool:
    """Take a pre-started sandbox for one execution, by renaming it: the loser of two
    claimers gets 404 because the old name is gone. But only when the renames come one after
    the other: two renames of one container at the same moment both succeeded here (Docker
    20.10; two threads running 40 executions handed one sandbox to two executions, which
    then ran in the same /work), so the claims of one sandbox take turns under a file lock
    in its host folder (beside ``work``, out of the container's sight)."""
    import fcntl

    lock_path = box.host_dir / "claim.lock"
    try:
        lock = open(lock_path, "a+b")  # noqa: SIM115 - held across the rename below
    except OSError:
        return False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.api.rename(box.name, f"{RUN_NAME_PREFIX}{execution_id}")
        except docker.errors.APIError:
            return False
    box.name = f"{RUN_NAME_PREFIX}{execution_id}"
    return True


def resize(client: docker.DockerClient, box: Box, memory_bytes: int, cpus: float) -> None:
    """Give a claimed sandbox the limits one run asked for (``rgrid run --memory/--cpus``):
    a warm sandbox is started with the operator's defaults, and changing a running
    container's cgroup costs ~20 ms where starting another costs ~0.4 s. docker-py's
    ``update_container`` has no ``NanoCpus``, which the container was created with (the
    engine refuses a quota beside it), so the update is posted as the docker CLI does."""
    body = {"Memory": memory_bytes, "MemorySwap": memory_bytes, "NanoCpus": int(cpus * 1e9)}
    url = client.api._url("/containers/{0}/update", box.container_id)
    client.api._result(client.api._post_json(url, data=body), True)


def kill(client: docker.DockerClient, box: Box) -> None:
    """Stop the sandbox now (it removes itself); its host folder stays until ``discard``. A
    paused one cannot be killed: it is unpaused first."""
    if not box.container_id:
        return  # found by its folder: its container is gone
    try:
        client.api.kill(box.container_id)
    except docker.errors.APIError as exc:
        if "paused" not in str(exc).lower():
            return  # already gone, or exiting
        with contextlib.suppress(docker.errors.APIError):
            client.api.unpause(box.container_id)
            client.api.kill(box.container_id)


def discard(client: docker.DockerClient, box: Box, *, ended: bool = False) -> None:
    """End the sandbox (it removes itself) and delete its host folder and filesystem.
    ``ended``: its supervisor said it is done and is exiting, so it is not killed (the engine
    answers a kill of an exiting container only once it has stopped: ~37 ms here)."""
    if not ended:
        kill(client, box)
    remove_folder(box.host_dir)


def execution_labels(execution_id: str, timeout_s: float) -> dict[str, str]:
    """For a sandbox started for one execution (no warm one was free)."""
    return {
        EXECUTION_LABEL: execution_id,
        DEADLINE_LABEL: str(int(time.time() + timeout_s + KILL_GRACE_S + 60)),
    }
