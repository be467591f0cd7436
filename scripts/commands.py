"""The command lines of the stack's processes, one place for all of them: the API under
gunicorn, Celery workers (a host's run pool and its build pool, under scripts/supervise.sh),
beat and Flower (refused off loopback without credentials). scripts/launcher.py starts them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scripts.devenv import REPO

#: The virtualenv running this launcher: its gunicorn, celery and rgrid are the ones started.
BIN = Path(sys.executable).parent
SUPERVISE = REPO / "scripts" / "supervise.sh"


def api_command(port: int) -> list[str]:
    return [
        str(BIN / "gunicorn"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"),
        # The multiprocess metrics hooks (rgrid/core/metrics.py).
        *("--config", "python:rgrid.api.gunicorn_conf"),
        *("--access-logfile", "-"),
        "rgrid.api:create_app()",
    ]


def _celery(*args: str) -> list[str]:
    return [str(BIN / "celery"), "-A", "workers.celery_app", *args]


def worker_command(
    hostname: str, *, concurrency: int = 2, supervised: bool = True, queues: str | None = None
) -> list[str]:
    """A Celery worker; ``supervised``: under scripts/supervise.sh (a broker restart has killed
    celery 5.7's main process here, and a killed worker must come back); ``queues``: the
    queues it consumes (the build pool's), or the shared one and its host's."""
    command = _celery(
        *("worker", "--loglevel", "INFO"),
        *("--concurrency", str(concurrency), "--hostname", f"{hostname}@%h"),
        *(("--queues", queues) if queues else ()),
    )
    return [str(SUPERVISE), *command] if supervised else command


def builder_command(
    hostname: str, queue: str, host: str, *, concurrency: int = 2, supervised: bool = True
) -> list[str]:
    """A host's build pool: a Celery worker of its own on the host's build queue, so that
    dependency installs never hold the run pool's slots (rgrid/host/slots.py). Its environment
    says RGRID_WORKER_POOL=build (see ``StackConfig.env_for``)."""
    from rgrid.host.hosts import build_queue

    return worker_command(
        f"{hostname}-build",
        concurrency=concurrency,
        supervised=supervised,
        queues=build_queue(queue, host),
    )


def beat_command(schedule: Path) -> list[str]:
    return _celery("beat", "--loglevel", "INFO", "--schedule", str(schedule))


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def flower_command(port: int, address: str = "127.0.0.1", basic_auth: str | None = None):
    """Flower on ``address``. Anywhere but loopback it shows every execution's tasks and can
    revoke them, so it is refused without credentials (``user:password``, handed to Flower
    in its own FLOWER_BASIC_AUTH variable by :meth:`StackConfig.env_for`, never on its
    command line where `ps` would show it)."""
    if address not in LOOPBACK and not basic_auth:
        raise RuntimeError(
            f"Flower on {address} needs credentials: set RGRID_FLOWER_BASIC_AUTH=user:password"
        )
    return _celery("flower", f"--address={address}", f"--port={port}")
