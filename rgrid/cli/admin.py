"""Operator commands: the schema, a host's health and draining, accounts and API keys,
straight against the database and the broker."""

from __future__ import annotations

import time

import click

from rgrid.cli import EXIT_RGRID, cli
from rgrid.cli.output import note, print_json, table_lines
from rgrid.core.config import get_settings

# Database modules are imported inside the commands: importing SQLAlchemy and Alembic costs
# a third of a second that `rgrid run` against an API should not pay.


def _factory():
    from rgrid.core.db import get_session_factory

    return get_session_factory(get_settings().effective_database_url)


@cli.group()
def admin() -> None:
    """Manage accounts and API keys (uses RGRID_DATABASE_URL)."""


@admin.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head). Safe to run from every
    host at once: one migrates under a PostgreSQL advisory lock, the others wait and find
    nothing to do."""
    from rgrid.core.db import upgrade
    from rgrid.core.errors import ServiceUnavailable

    url = get_settings().effective_database_url
    try:
        applied = upgrade(url)
    except ServiceUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, bad URL: one line
        from rgrid.service.checks import _first_line, _safe_url

        reason = _first_line(getattr(exc, "orig", None) or exc)
        raise ServiceUnavailable(f"database {_safe_url(url)}: {reason}") from None
    from rgrid.core.db import newest_revision

    if applied:
        click.echo(f"database migrated to {applied[-1]} ({len(applied)} migration(s) applied)")
    else:
        click.echo(f"database is up to date (schema {newest_revision()})")


@admin.command()
@click.option(
    "--role",
    type=click.Choice(["api", "worker", "beat", "flower"]),
    default="worker",
    show_default=True,
    help="What this host runs: which services it must reach.",
)
def check(role: str) -> None:
    """Reach the database, broker, store and Docker engine (and the API, when RGRID_API_URL
    is set) with this host's settings: one line each, non-zero exit if anything is wrong."""
    from rgrid.core.config import Settings
    from rgrid.service.checks import run_checks

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        click.echo(f"{'FAIL':<5}{'settings':<10}{exc}")
        raise SystemExit(EXIT_RGRID) from None
    results = run_checks(settings, role)
    for result in results:
        click.echo(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        click.echo(f"rgrid: error: {len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise SystemExit(EXIT_RGRID)


def _registry():
    from rgrid.host.hosts import HostRegistry
    from rgrid.service.context import redis_client

    settings = get_settings()
    return HostRegistry(redis_client(settings.redis_url), settings.queue)


def _wait_for(what: str, done, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            from rgrid.core.errors import RGridError

            raise RGridError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


@admin.command()
@click.argument("host")
@click.option("--wait", is_flag=True, help="Return once the host has finished its runs.")
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True)
def drain(host: str, wait: bool, timeout_s: float) -> None:
    """Take worker host HOST (its RGRID_HOST_NAME) out of service: it finishes what it runs,
    takes no new work, and executions waiting for it move to a live host. It stays drained
    (a restart included) until `rgrid admin undrain HOST`."""
    from rgrid.core import queueing
    from rgrid.host import hosts

    settings = get_settings()
    registry = _registry()
    registry.drain(host)
    click.echo(f"{host}: draining (takes no new work)")
    if wait:
        _wait_for(
            f"{host}'s worker to stop taking work (is it running?)",
            lambda: registry.drain_state(host) == hosts.DRAINED,
            timeout_s,
        )
    factory = _factory()
    live = [h for h in registry.live_hosts() if h != host]
    app = queueing.create_celery_app()
    moved = 0
    for execution_id, pinned in hosts.pinned_to_lost_hosts(factory, registry):
        if pinned != host or not live:
            continue
        to = live[moved % len(live)]
        if hosts.move(factory, execution_id, host, to):
            queueing.enqueue_from(
                app, queueing.BUILD, execution_id, hosts.host_queue(settings.queue, to)
            )
            moved += 1
    if moved:
        click.echo(f"{host}: {moved} waiting execution(s) moved to {', '.join(live)}")
    elif not live and hosts.pinned_to_lost_hosts(factory, registry):
        click.echo(f"{host}: no other live host yet: waiting executions move when one is up")
    if wait:
        running = {"n": 0}

        def finished() -> bool:
            busy = [s for _, s in hosts.busy_on(factory, host) if s == "running"]
            running["n"] = len(busy)
            return not busy

        _wait_for(f"{host}'s runs to finish", finished, timeout_s)
        click.echo(f"{host}: drained: nothing running, nothing new")


@admin.command()
@click.argument("host")
def undrain(host: str) -> None:
    """Put a drained worker host HOST back in service."""
    if _registry().undrain(host):
        click.echo(f"{host}: taking work again")
    else:
        click.echo(f"{host}: was not drained")


@admin.command("create-account")
@click.argument("name")
@click.option("--with-key", is_flag=True, help="Also issue an API key and print it.")
@click.option("--json", "json_mode", is_flag=True)
def create_account(name: str, with_key: bool, json_mode: bool) -> None:
    """Create an account."""
    from rgrid.core.db import session_scope
    from rgrid.service import accounts

    with session_scope(_factory()) as session:
        account = accounts.create_account(session, name)
        result = {"account_id": account.id, "name": account.name}
        if with_key:
            row, secret = accounts.issue_key(session, account)
            result.update(key_id=row.id, api_key=secret)
    if json_mode:
        print_json(result)
        return
    click.echo(f"account {result['name']} created (id {result['account_id']})")
    if with_key:
        click.echo(f"API key (shown once, store it now): {result['api_key']}")


@admin.command("create-key")
@click.argument("account_name")
@click.option("--json", "json_mode", is_flag=True)
def create_key(account_name: str, json_mode: bool) -> None:
    """Issue an API key for ACCOUNT_NAME. The key is shown once; only its hash is kept."""
    from rgrid.core.db import session_scope
    from rgrid.service import accounts

    with session_scope(_factory()) as session:
        account = accounts.find_account(session, account_name)
        row, secret = accounts.issue_key(session, account)
        result = {"key_id": row.id, "account": account.name, "api_key": secret}
    if json_mode:
        print_json(result)
    else:
        click.echo(f"key {result['key_id']} for {account_name} (shown once): {secret}")


@admin.command("revoke-key")
@click.argument("key_id", type=int)
def revoke_key(key_id: int) -> None:
    """Revoke an API key by its id; requests with it are refused from now on."""
    from rgrid.core.db import session_scope
    from rgrid.service import accounts

    with session_scope(_factory()) as session:
        accounts.revoke_key(session, key_id)
    click.echo(f"key {key_id} revoked")


@admin.command("list-keys")
@click.option("--json", "json_mode", is_flag=True)
def list_keys(json_mode: bool) -> None:
    """List API keys (their prefixes, never the keys)."""
    from sqlalchemy import select

    from rgrid.core.db import session_scope
    from rgrid.core.models import Account, ApiKey, iso_utc

    with session_scope(_factory()) as session:
        rows = session.execute(select(ApiKey, Account.name).join(Account).order_by(ApiKey.id)).all()
        result = [
            {
                "key_id": key.id,
                "account": name,
                "prefix": key.prefix,
                "created_at": iso_utc(key.created_at),
                "revoked": key.revoked_at is not None,
            }
            for key, name in rows
        ]
    if json_mode:
        print_json(result)
        return
    if not result:
        note("no API keys")
    for line in table_lines(
        ("ID", "ACCOUNT", "PREFIX", "STATE", "CREATED (UTC)"),
        (
            (
                str(row["key_id"]),
                row["account"],
                row["prefix"] + "…",
                "revoked" if row["revoked"] else "active",
                row["created_at"][:19].replace("T", " "),
            )
            for row in result
        ),
    ):
        click.echo(line)
