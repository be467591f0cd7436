"""``rgrid cache stats|ls|purge``: the caller's own caches (embedded: this machine's)."""

from __future__ import annotations

import re

import click

from rgrid.cli import cli
from rgrid.cli.output import note, print_json, table_lines
from rgrid.client.protocol import make_client
from rgrid.core.config import get_settings
from rgrid.core.errors import BadInput
from rgrid.core.units import human_bytes

_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> int:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` as seconds."""
    match = _AGE.match(text or "")
    if not match:
        raise BadInput(f"--older-than must look like 7d, 12h or 30m, not {text!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


@cli.group()
def cache() -> None:
    """Inspect and clean your caches (scripts, dependency sets, input files, outputs)."""


def _rate(rate: dict) -> str:
    if not rate["lookups"]:
        return "-"
    return f"{rate['hit_rate']:.0%} ({rate['hits']}/{rate['lookups']})"


def _when(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ") or "-"


@cache.command()
@click.option("--json", "json_mode", is_flag=True)
def stats(json_mode: bool) -> None:
    """Hit rates over 1, 7 and 30 days, entries, sizes, oldest entry, last purge."""
    data = make_client(get_settings()).cache_stats()
    if json_mode:
        print_json(data)
        return
    windows = list(data["hit_rates"])
    types = ("script", "dependency", "input", "outputs")
    for line in table_lines(
        ("HIT RATE", *windows),
        ((t, *(_rate(data["hit_rates"][w][t]) for w in windows)) for t in types),
    ):
        click.echo(line)
    click.echo()
    for line in table_lines(
        ("CACHE", "ENTRIES", "BYTES", "LEAST RECENTLY USED (UTC)"),
        (
            (
                t,
                str(data["caches"][t]["entries"]),
                human_bytes(data["caches"][t]["bytes"]) if t in ("input", "outputs") else "-",
                _when(data["caches"][t]["oldest_used_at"]),
            )
            for t in types
        ),
    ):
        click.echo(line)
    host = data.get("host")
    if host:
        click.echo()
        env, blob = host["environment"], host["blob"]
        click.echo(
            f"this machine: {env['entries']} environment(s) {human_bytes(env['bytes'])}, "
            f"{blob['entries']} cached file(s) {human_bytes(blob['bytes'])}, "
            f"budget {human_bytes(data['budget_bytes'])}"
        )
    saved = data.get("outputs_saved")
    if saved:
        click.echo(
            f"reused runs: {saved['reuses']}, saving {saved['run_seconds']:.1f}s of run time"
            f" and {human_bytes(saved['bytes'])} of outputs"
        )
    purge = data.get("last_purge")
    click.echo(f"last purge: {_when(purge['finished_at']) + ' UTC' if purge else 'never'}")


@cache.command(name="ls")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "json_mode", is_flag=True)
def ls(limit: int, json_mode: bool) -> None:
    """Your cache entries, most recently used first."""
    rows = make_client(get_settings()).cache_entries(limit)
    if json_mode:
        print_json(rows)
        return
    if not rows:
        note("no cache entries")
        return
    for line in table_lines(
        ("CACHE", "KEY", "RUNTIME", "BYTES", "USES", "LAST USED (UTC)"),
        (
            (
                row["cache"],
                row["key"][:16],
                row["runtime"] or "",
                "" if row["bytes"] is None else human_bytes(row["bytes"]),
                str(row["use_count"]),
                _when(row["last_used_at"]),
            )
            for row in rows
        ),
    ):
        click.echo(line)


@cache.command()
@click.option("--older-than", "older_than", metavar="AGE", help="unused for AGE: 7d, 12h, 30m")
@click.option("--all", "everything", is_flag=True, help="every entry")
@click.option("--json", "json_mode", is_flag=True)
def purge(older_than: str | None, everything: bool, json_mode: bool) -> None:
    """Remove your cache entries unused for AGE (or all): the next run that needed one is a
    miss and builds or uploads again."""
    seconds = parse_age(older_than) if older_than is not None else None
    if everything == (seconds is not None):
        raise BadInput("give either --older-than AGE or --all")
    removed = make_client(get_settings()).cache_purge(seconds, everything)
    if json_mode:
        print_json({"removed": removed})
        return
    parts = [
        f"{removed.get('script_cache', 0)} script",
        f"{removed.get('dependency_cache', 0)} dependency",
        f"{removed.get('blobs', 0)} input file ({human_bytes(removed.get('blob_bytes', 0))})",
        f"{removed.get('output_cache', 0)} reusable run",
    ]
    if "environments" in removed:
        parts.append(
            f"{removed['environments']} environment folder(s) "
            f"({human_bytes(removed['environment_bytes'])})"
        )
    click.echo("removed " + ", ".join(parts) + " entries")


@cache.command(name="why")
@click.argument("execution_id")
@click.option("--json", "json_mode", is_flag=True)
def cache_why(execution_id: str, json_mode: bool) -> None:
    """Why EXECUTION_ID ran again (or was reused): the same as `rgrid why`."""
    from rgrid.cli.why import show_why

    show_why(execution_id, json_mode)
