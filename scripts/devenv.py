"""The local development services as every launcher, test and bench reaches them: their
addresses and credentials (scripts/dev.env, read here and nowhere else), a free loopback port,
and a scratch PostgreSQL database of its own.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_ENV_FILE = REPO / "scripts" / "dev.env"


def dev_env() -> dict[str, str]:
    """The local services' addresses and credentials (scripts/dev.env)."""
    return read_env_file(DEV_ENV_FILE)


def read_env_file(path: Path) -> dict[str, str]:
    """What systemd's ``EnvironmentFile=`` makes of the file: ``KEY=VALUE`` lines, ``#``
    comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def free_port() -> int:
    """A loopback port nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fresh_database(prefix: str = "rgrid_test") -> Iterator[str]:
    """An empty PostgreSQL database of its own on the development server, dropped (with any
    connection still open to it) on the way out. Migrating it is the caller's business."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    base = dev_env()["RGRID_DATABASE_URL"]
    name = f"{prefix}_{secrets.token_hex(4)}"
    # No pooled connection: a test restarts PostgreSQL, and the drop must still reach it.
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
