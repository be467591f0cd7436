"""Operator commands: accounts and API keys, straight against the database."""

from __future__ import annotations

import click

from rgrid.cli import cli
from rgrid.cli.output import note, print_json, table_lines
from rgrid.config import get_settings

# Database modules are imported inside the commands: importing SQLAlchemy and Alembic costs
# a third of a second that `rgrid run` against an API should not pay.


def _factory():
    from rgrid.db import get_session_factory

    return get_session_factory(get_settings().effective_database_url)


@cli.group()
def admin() -> None:
    """Manage accounts and API keys (uses RGRID_DATABASE_URL)."""


@admin.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    from rgrid.db import upgrade

    upgrade(get_settings().effective_database_url)
    click.echo("database is up to date")


@admin.command("create-account")
@click.argument("name")
@click.option("--with-key", is_flag=True, help="Also issue an API key and print it.")
@click.option("--json", "json_mode", is_flag=True)
def create_account(name: str, with_key: bool, json_mode: bool) -> None:
    """Create an account."""
    from rgrid import accounts
    from rgrid.db import session_scope

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
    from rgrid import accounts
    from rgrid.db import session_scope

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
    from rgrid import accounts
    from rgrid.db import session_scope

    with session_scope(_factory()) as session:
        accounts.revoke_key(session, key_id)
    click.echo(f"key {key_id} revoked")


@admin.command("list-keys")
@click.option("--json", "json_mode", is_flag=True)
def list_keys(json_mode: bool) -> None:
    """List API keys (their prefixes, never the keys)."""
    from sqlalchemy import select

    from rgrid.db import session_scope
    from rgrid.models import Account, ApiKey, iso_utc

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
