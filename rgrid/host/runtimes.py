"""Runtimes: the base images user scripts run in, and how to build them.

RGrid runs on Docker engines that have no container registry to pull from, so a base image
cannot be fetched: it is built here from Debian packages. ``mmdebstrap`` bootstraps a minimal
Debian root filesystem (the ``minbase`` variant plus ``python3`` and ``ca-certificates``) into a
tarball, using the host's own apt sources file, so no mirror address is written into the code
and the build goes wherever this machine's apt already goes. ``docker import`` then turns the
tarball into an image, with the environment, working directory, user and command set on import.

Every runtime image has an unprivileged user ``rgrid`` (uid and gid 1000, home ``/home/rgrid``),
and a ``/work`` directory owned by that user (where a sandbox mounts its work folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rgrid.core.cache_keys import RUNTIME_LABEL
from rgrid.core.config import DEFAULT_RUNTIME  # noqa: F401 - re-exported
from rgrid.core.errors import BuildError, UnknownRuntime

if TYPE_CHECKING:
    # Only for annotations: the API resolves runtime names and must not load docker-py.
    import docker

CONTAINER_UID = 1000
CONTAINER_GID = 1000
CONTAINER_HOME = "/home/rgrid"
WORK_DIR = "/work"

#: Packages installed on top of the ``minbase`` variant.
INCLUDE_PACKAGES: tuple[str, ...] = ("python3", "ca-certificates")

#: Where the host's apt sources are looked for, relative to the apt configuration directory.
_SOURCES_DIR = "sources.list.d"
_SOURCES_LIST = "sources.list"


@dataclass(frozen=True)
class RuntimeSpec:
    """A named runtime: the Debian suite its image is built from and the image tag it gets."""

    name: str
    image: str
    suite: str = "bookworm"
    python_version: str = "3.11"
    #: What wheels must be built for: bookworm's glibc is 2.36.
    python_platform: str = "x86_64-manylinux_2_36"

    @property
    def site_packages(self) -> str:
        """Where dependency layers go: on Debian's python3 path, so no ENV step is needed."""
        return f"/usr/local/lib/python{self.python_version}/dist-packages"

    @property
    def repository(self) -> str:
        return self.image.rpartition(":")[0]

    @property
    def tag(self) -> str:
        return self.image.rpartition(":")[2]


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec(
            name="python:3.11",
            image="rgrid-runtime:python-3.11",
            suite="bookworm",
            python_version="3.11",
        ),
    )
}


def resolve_runtime(name: str) -> RuntimeSpec:
    """The runtime called ``name``; :class:`UnknownRuntime` names the known ones otherwise."""
    try:
        return RUNTIMES[name]
    except KeyError:
        known = ", ".join(sorted(RUNTIMES))
        raise UnknownRuntime(f"unknown runtime {name!r} (known: {known})") from None


def runtime_image_exists(spec: RuntimeSpec, client: docker.DockerClient) -> bool:
    """True when the engine already has the runtime's image (never pulls)."""
    from rgrid.host.docker_engine import image_id

    return image_id(client, spec.image) is not None


def find_apt_sources(suite: str, apt_dir: Path = Path("/etc/apt")) -> Path:
    """The host's apt sources file that names ``suite``, to hand to mmdebstrap as its mirror.

    ``sources.list.d/*.sources`` (deb822; ``debian.sources`` first) are tried before the
    one-line ``sources.list``; the first whose active lines name the suite wins.
    """
    sources_dir = apt_dir / _SOURCES_DIR
    deb822 = sorted(sources_dir.glob("*.sources"), key=lambda p: (p.name != "debian.sources", p))
    candidates = [*deb822, apt_dir / _SOURCES_LIST]
    for path in candidates:
        if path.is_file() and _names_suite(path.read_text(errors="replace"), suite):
            return path
    searched = f"{sources_dir}/*.sources, {apt_dir / _SOURCES_LIST}"
    raise BuildError(f"no apt sources file names suite {suite!r} (looked in {searched})")


def _names_suite(text: str, suite: str) -> bool:
    """True when a non-comment line mentions ``suite`` (or ``suite-updates`` and the like)."""
    word = re.compile(rf"(?<![\w.-]){re.escape(suite)}(?![\w.])")
    active = (line.split("#", 1)[0] for line in text.splitlines())
    return any(word.search(line) for line in active)


def _default_mode() -> str:
    return "root" if os.geteuid() == 0 else "unshare"


def _dpkg_excludes(keep_copyright: bool) -> list[str]:
    opts = [
        "path-exclude=/usr/share/doc/*",
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/locale/*",
        "path-include=/usr/share/locale/locale.alias",
    ]
    if keep_copyright:
        opts.append("path-include=/usr/share/doc/*/copyright")
    return [f"--dpkgopt={opt}" for opt in opts]


def customize_script(spec: RuntimeSpec) -> str:
    """The shell run by mmdebstrap's customize hook (``$1`` is the new root filesystem)."""
    uid, gid = CONTAINER_UID, CONTAINER_GID
    want = spec.python_version
    return "\n".join(
        [
            "set -e",
            f'chroot "$1" groupadd --gid {gid} rgrid',
            f'chroot "$1" useradd --uid {uid} --gid {gid} --home-dir {CONTAINER_HOME}'
            " --create-home --no-log-init --shell /bin/sh rgrid",
            f'chroot "$1" install -d -o {uid} -g {gid} -m 0755 {WORK_DIR}',
            """v=$(chroot "$1" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')""",
            f'[ "$v" = "{want}" ] || {{ echo "E: suite {spec.suite} ships python $v,'
            f' runtime {spec.name} wants {want}" >&2; exit 1; }}',
        ]
    )


def mmdebstrap_command(
    spec: RuntimeSpec,
    sources: Path,
    output: Path,
    *,
    mode: str | None = None,
    keep_copyright: bool = True,
) -> list[str]:
    """The mmdebstrap argv that writes the runtime's root filesystem to the tarball ``output``."""
    return [
        "mmdebstrap",
        "--variant=minbase",
        f"--mode={mode or _default_mode()}",
        "--format=tar",
        f"--include={','.join(INCLUDE_PACKAGES)}",
        *_dpkg_excludes(keep_copyright),
        f"--customize-hook={customize_script(spec)}",
        spec.suite,
        str(output),
        str(sources),
    ]


def import_changes(spec: RuntimeSpec) -> list[str]:
    """The Dockerfile instructions applied by ``docker import``."""
    return [
        "ENV PYTHONUNBUFFERED=1",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV LANG=C.UTF-8",
        f"ENV HOME={CONTAINER_HOME}",
        f"WORKDIR {WORK_DIR}",
        f"USER {CONTAINER_UID}:{CONTAINER_GID}",
        'CMD ["python3"]',
        f'LABEL {RUNTIME_LABEL}="{spec.name}"',
    ]


def build_runtime(
    spec: RuntimeSpec,
    client: docker.DockerClient,
    log: Callable[[str], None] = print,
) -> str:
    """Build the runtime's image from Debian packages, tag it ``spec.image``, return its id."""
    sources = find_apt_sources(spec.suite)
    with tempfile.TemporaryDirectory(prefix="rgrid-runtime-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        _run_mmdebstrap(mmdebstrap_command(spec, sources, tarball), log)
        log(f"importing {tarball.stat().st_size / 1e6:.0f} MB root filesystem as {spec.image}")
        _import_tarball(spec, client, tarball)
    from rgrid.host.docker_engine import image_id

    built = image_id(client, spec.image)
    if built is None:
        raise BuildError(f"docker import of {spec.image} left no image")
    log(f"built {spec.image} ({built})")
    return built


def _run_mmdebstrap(argv: list[str], log: Callable[[str], None]) -> None:
    """Run mmdebstrap, passing each line it prints to ``log``; BuildError if it fails."""
    if shutil.which(argv[0]) is None:
        raise BuildError("mmdebstrap is not installed: install the Debian package 'mmdebstrap'")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for raw in proc.stdout:
        line = raw.rstrip()
        if line:
            lines.append(line)
            log(line)
    if proc.wait() != 0:
        raise BuildError(f"mmdebstrap failed (exit {proc.returncode}): {failure_summary(lines)}")


def failure_summary(lines: list[str], limit: int = 300) -> str:
    """One line from mmdebstrap's output: its first ``E:`` line (the cause) and its last line.

    mmdebstrap follows the cause with generic lines such as ``E: mmdebstrap failed to run``, so
    the last line alone rarely says what went wrong.
    """
    if not lines:
        return "no output"
    last = lines[-1][:limit]
    cause = next((line[:limit] for line in lines if line.startswith("E:")), None)
    if cause is None or cause == last:
        return last
    return f"{cause}; last line: {last}"


def _import_tarball(spec: RuntimeSpec, client: docker.DockerClient, tarball: Path) -> None:
    import docker.errors

    try:
        result = client.api.import_image_from_file(
            str(tarball), repository=spec.repository, tag=spec.tag, changes=import_changes(spec)
        )
    except docker.errors.APIError as exc:
        raise BuildError(f"docker import of {spec.image} failed: {exc.explanation or exc}") from exc
    error = _stream_error(result.splitlines() if isinstance(result, str) else [])
    if error:
        raise BuildError(f"docker import of {spec.image} failed: {error}")


def _stream_error(lines: Iterable[str]) -> str | None:
    """The first ``error`` reported in a JSON-lines progress stream from the engine."""
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("error"):
            return str(message["error"])
    return None
