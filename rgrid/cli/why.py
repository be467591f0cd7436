"""``rgrid why ID``: why an execution ran again, or that it was reused."""

from __future__ import annotations

import click

from rgrid.cli import cli
from rgrid.cli.output import print_json
from rgrid.client.protocol import make_client
from rgrid.core.config import get_settings


def show_why(execution_id: str, json_mode: bool) -> None:
    data = make_client(get_settings()).why(execution_id)
    if json_mode:
        print_json(data)
        return
    click.echo(f"{data['execution_id']} {data['verdict']}")
    if data["compared_with"]:
        click.echo(f"compared with {data['compared_with']} ({data['compared_status']}):")
        for line in data["differences"] or ["every part of the action key is the same"]:
            click.echo(f"  {line}")
    for line in data["reasons"]:
        click.echo(line)


@cli.command()
@click.argument("execution_id")
@click.option("--json", "json_mode", is_flag=True)
def why(execution_id: str, json_mode: bool) -> None:
    """Why EXECUTION_ID ran instead of being reused: its action key compared, part by part,
    with the nearest earlier run of the same script name (inputs, arguments, --env values,
    the script, the requirements' resolution, the runtime image)."""
    show_why(execution_id, json_mode)
