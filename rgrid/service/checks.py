"""`rgrid admin check`: whether this host reaches what its role needs, with its own settings.

The first thing an operator runs on a new host. Each check is one line saying what it reached
or what is wrong, in the operator's terms (which setting, which address, what to run next),
and every check is bounded by a few seconds: a host whose network drops packets gets an
answer, not a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rgrid.core.config import DEFAULT_RUNTIME, Settings

#: Each check gives up after this long (connect and read).
TIMEOUT_S = 5

#: Which services each role reaches (deploy/README: the roles).
ROLE_CHECKS = {
    "api": ("database", "broker", "store"),
    "worker": ("database", "broker", "store", "docker"),
    "beat": ("database", "broker"),
    "flower": ("broker",),
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<5}{self.name:<10}{self.detail}"


class CheckFailed(Exception):
    """What is wrong, in one line."""


def _safe_url(url: str) -> str:
    """``url`` without its password: the output may be pasted into a ticket."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: name no part of it
        return url.split("@")[-1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_database(settings: Settings) -> str:
    if not settings.database_url:
        raise CheckFailed("RGRID_DATABASE_URL is not set")
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from rgrid.core.db import newest_revision

    args = {"connect_timeout": TIMEOUT_S} if settings.database_url.startswith("postgres") else {}
    engine = create_engine(settings.database_url, poolclass=NullPool, connect_args=args)
    where = _safe_url(settings.database_url)
    try:
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:  # noqa: BLE001 - any failure is the line
        raise CheckFailed(f"{where}: {_first_line(getattr(exc, 'orig', exc))}") from None
    finally:
        engine.dispose()
    newest = newest_revision()
    if current != newest:
        raise CheckFailed(
            f"{where}: schema at {current or 'nothing'}, this version needs {newest}:"
            " run `rgrid admin migrate`"
        )
    return f"{where} (schema {current})"


def check_broker(settings: Settings) -> str:
    import redis

    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S
    )
    where = _safe_url(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CheckFailed(f"{where}: {_first_line(exc)}") from None
    finally:
        client.close()
    return f"{where} (queue {settings.queue})"


def check_store(settings: Settings) -> str:
    if not settings.s3_endpoint_url:
        raise CheckFailed("RGRID_S3_ENDPOINT_URL is not set (servers keep blobs in S3)")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            connect_timeout=TIMEOUT_S,
            read_timeout=TIMEOUT_S,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )
    where = f"{settings.s3_endpoint_url} bucket {settings.s3_bucket}"
    try:
        client.head_bucket(Bucket=settings.s3_bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise CheckFailed(
                f"{where}: no such bucket (the API creates it when it starts)"
            ) from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise CheckFailed(
                f"{where}: refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        raise CheckFailed(f"{where}: {_first_line(exc)}") from None
    except BotoCoreError as exc:
        raise CheckFailed(f"{where}: {_first_line(exc)}") from None
    return where


def check_docker(settings: Settings) -> str:
    import docker

    from rgrid.host.runtimes import resolve_runtime

    try:
        client = docker.from_env(timeout=TIMEOUT_S)
        try:
            version = client.version().get("Version", "?")
            image = resolve_runtime(DEFAULT_RUNTIME).image
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                raise CheckFailed(
                    f"engine {version} has no runtime image {image}:"
                    f" run `rgrid runtime build {DEFAULT_RUNTIME}`"
                ) from None
        finally:
            client.close()
    except CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - no socket, refused, timed out: the line says
        raise CheckFailed(f"Docker engine unreachable: {_first_line(exc)}") from None
    return f"engine {version}, runtime image {image}"


def check_api(settings: Settings) -> str:
    import urllib.request

    assert settings.api_url
    url = settings.api_url.rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            if response.status != 200:
                raise CheckFailed(f"{url}: answered {response.status}")
    except CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - refused, timed out, bad URL
        raise CheckFailed(f"{url}: {_first_line(getattr(exc, 'reason', exc))}") from None
    return settings.api_url


CHECKS: dict[str, Callable[[Settings], str]] = {
    "database": check_database,
    "broker": check_broker,
    "store": check_store,
    "docker": check_docker,
    "api": check_api,
}


def run_checks(settings: Settings, role: str) -> list[Check]:
    """The role's checks, in order; the API too when RGRID_API_URL names one."""
    names = list(ROLE_CHECKS[role])
    if settings.api_url and role != "api":
        names.append("api")
    results = []
    for name in names:
        try:
            results.append(Check(name, True, CHECKS[name](settings)))
        except CheckFailed as exc:
            results.append(Check(name, False, str(exc)))
    return results
