"""The stacks the benchmarks run against: a private API + worker of this checkout on a
database, Redis database and bucket of their own (started by scripts/launcher.py, the one
launcher), the facts of the stack `make up` runs, and the tidy-up of the containers a bench
leaves on either (warm sandboxes, background bytecode compiles).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import BenchError, SetupError, clean_environ, docker_client
from scripts import devenv, launcher, stack  # the one launcher; `make up`'s pid files


def _claim_redis_db(base_url: str) -> int:
    """An empty Redis database (2-15; 0 is `make up`'s stack's, 1 the tests'), marked as taken."""
    import redis

    for number in range(15, 1, -1):
        client = redis.Redis.from_url(f"{base_url}/{number}")
        if client.dbsize() == 0 and client.set("rgrid-bench:claimed", "1", nx=True):
            return number
    raise SetupError("no empty Redis database (2-15) for a private stack")


@contextmanager
def private_stack(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """An API (gunicorn) and a Celery worker of this checkout, started by the stack launcher
    as `make up` starts them but on a new database (migrated here), an empty Redis database and
    a new bucket, so that they share nothing with the running stack or the tests. All of it is
    removed on the way out."""
    import boto3

    from rgrid.core.db import upgrade

    dev = devenv.dev_env()
    token = uuid.uuid4().hex[:8]
    redis_base = dev["RGRID_REDIS_URL"].rsplit("/", 1)[0]
    bucket = f"rgrid-bench-{token}"
    redis_db: int | None = None
    try:
        with devenv.fresh_database("rgrid_bench") as db_url:
            redis_db = _claim_redis_db(redis_base)
            server_env = {
                **clean_environ(),
                **dev,
                "RGRID_DATABASE_URL": db_url,
                "RGRID_REDIS_URL": f"{redis_base}/{redis_db}",
                "RGRID_S3_BUCKET": bucket,
                "RGRID_DATA_DIR": str(root / "stack-data"),
                **BENCH_STACK_ENV,
                **(extra_env or {}),
            }
            upgrade(db_url)
            config = launcher.StackConfig(
                env=server_env,
                log_dir=root / "stack-logs",
                name=f"rgrid-bench-{token}",
                api_port=devenv.free_port(),
                roles=("api", "worker"),
                supervised=False,
            )
            try:
                with launcher.Stack(config):
                    key = launcher.create_account_key(server_env, f"bench-{token}")
                    yield {"RGRID_API_URL": config.api_url, "RGRID_API_KEY": key}
            except RuntimeError as exc:  # the API did not start
                raise SetupError(str(exc)) from exc
    finally:
        if redis_db is not None:
            import redis

            redis.Redis.from_url(f"{redis_base}/{redis_db}").flushdb()
        _remove_bucket(boto3, dev, bucket)


def _remove_bucket(boto3, dev: dict[str, str], bucket: str) -> None:
    """Best effort, on the way out: when the object store is what failed, its error (already
    reported) must not be followed by a second traceback from this tidy-up."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=dev["RGRID_S3_ENDPOINT_URL"],
        aws_access_key_id=dev["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=dev["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.NoSuchBucket:
        pass
    except (BotoCoreError, ClientError) as exc:
        print(f"bench: could not remove bucket {bucket}: {exc}", file=sys.stderr)


#: What the bench's stack must allow that the development stack does not: wheels from local
#: folders (the edited-requirements rows) and from the pad server on loopback (PEP 723 rows).
BENCH_STACK_ENV = {"RGRID_ALLOW_LOCAL_FIND_LINKS": "1", "RGRID_ALLOWED_INDEXES": "127.0.0.1"}


def _worker_environ() -> dict[str, str]:
    """The running `make up` worker's environment ({} when it cannot be read)."""
    values = {}
    try:
        pid = stack.running_pid("worker")
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            name, _, value = item.partition(b"=")
            values[name.decode(errors="replace")] = value.decode(errors="replace")
    except (OSError, ValueError, TypeError):
        pass
    return values


def check_up_stack_allows_local_wheels() -> None:
    """A stack `make up` started before without the bench's settings refuses the local wheels:
    say so, rather than fail rows one by one."""
    environ = _worker_environ()
    if environ and any(environ.get(k) != v for k, v in BENCH_STACK_ENV.items()):
        raise BenchError(
            "the running stack does not allow local wheels (it was started without "
            + " ".join(f"{k}={v}" for k, v in BENCH_STACK_ENV.items())
            + "): `make down` and run the bench again (it starts the stack), or use --stack private"
        )


def up_stack_environments() -> Path:
    """The environments folder of the stack `make up` started: its worker's RGRID_DATA_DIR
    (read from the running worker's environment), else the default data dir of this user, which
    is what the worker uses when the variable is unset (scripts/dev.env does not set it)."""
    from rgrid.core.config import Settings

    data_dir = None
    try:
        pid = stack.running_pid("worker")
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            name, _, value = item.partition(b"=")
            if name == b"RGRID_DATA_DIR" and value:
                data_dir = Path(value.decode())
    except (OSError, ValueError):
        pass
    if data_dir is None:
        return Settings().environments_dir
    return data_dir / "environments"


def remove_containers_mounting(paths: list[Path]) -> int:
    """End every container (RGrid's, by its label) with a mount at or under one of ``paths``.
    A warm sandbox is retired as RGrid retires it (claimed under a throwaway name first, so no
    execution can be claiming it at that moment); anything else is removed by force."""
    from rgrid.core.cache_keys import HOST_DIR_LABEL, MANAGED_LABEL
    from rgrid.host import pool, sandbox

    client = docker_client()
    prefixes = [str(p).rstrip("/") for p in paths]

    def ours(container: dict) -> bool:
        sources = [m.get("Source", "") for m in container.get("Mounts", [])]
        return any(s == p or s.startswith(p + "/") for s in sources for p in prefixes)

    count = 0
    for container in client.api.containers(all=True, filters={"label": MANAGED_LABEL}):
        if not ours(container):
            continue
        name = container["Names"][0].lstrip("/")
        host_dir = container["Labels"].get(HOST_DIR_LABEL)
        try:
            if name.startswith(sandbox.POOL_NAME_PREFIX) and host_dir:
                pool.retire(client, sandbox.Box(name, container["Id"], Path(host_dir)))
            else:
                client.api.remove_container(container["Id"], force=True)
            count += 1
        except Exception as exc:  # noqa: BLE001 - cleanup goes on; say what was left
            print(f"cleanup: container {name}: {exc}", file=sys.stderr)
    return count


def wait_for_compile(environment: str, timeout_s: float = 600) -> float:
    """Wait (untimed) until RGrid's background bytecode compile of ``environment`` has ended
    (rgrid/host/environments.py ``compile_bytecode``: a container that mounts the environment's
    folder and runs compileall). A first run leaves one behind, and it must not land on the
    next row's time. Compiles of other environments (tests, other users) are not waited for.
    Returns the seconds waited."""
    from rgrid.core.cache_keys import MANAGED_LABEL

    filters = {"label": MANAGED_LABEL, "status": "running"}
    started = time.perf_counter()
    deadline = started + timeout_s

    def compiling(container: dict) -> bool:
        sources = [m.get("Source", "") for m in container.get("Mounts", [])]
        return "compileall" in container.get("Command", "") and any(
            Path(source).name == environment for source in sources
        )

    while time.perf_counter() < deadline:
        if not any(compiling(c) for c in docker_client().api.containers(filters=filters)):
            return time.perf_counter() - started
        time.sleep(0.2)
    print(f"  the bytecode compile of {environment} is still running; going on", file=sys.stderr)
    return time.perf_counter() - started
