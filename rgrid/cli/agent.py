"""`rgrid agent`: see and stop the embedded default's agent (rgrid/client/agent.py), the
local process that keeps the pipeline loaded between runs. It starts by itself and idles out by
itself; these
are for the user who wants it gone now (or to know it is there)."""

from __future__ import annotations

import click

from rgrid.cli import cli
from rgrid.cli.output import print_json
from rgrid.client.agent_client import AgentClient, agent_sockets, log_path, stop_agents
from rgrid.core.config import get_settings
from rgrid.core.errors import RGridError


@cli.group()
def agent() -> None:
    """The local agent that keeps warm runs fast when no RGrid API is configured."""


@agent.command()
@click.option("--json", "json_mode", is_flag=True)
def status(json_mode: bool) -> None:
    """Show the agents running for this data folder."""
    settings = get_settings()
    found = []
    for path in agent_sockets(settings):
        try:
            client = AgentClient.connect(path, timeout_s=2.0)
        except OSError:
            continue
        try:
            found.append(client.ping())
        except RGridError:
            continue  # it stopped as we asked
        finally:
            client.close()
    if json_mode:
        print_json({"agents": found, "idle_timeout_s": settings.agent_idle_s})
        return
    if not found:
        click.echo("no agent running (the next `rgrid run` starts one)")
        return
    for item in found:
        click.echo(f"agent pid {item['pid']} on {item['socket']}")
    click.echo(f"each stops after {settings.agent_idle_s}s idle; log: {log_path(settings)}")


@agent.command()
def stop() -> None:
    """Stop this data folder's agents now, cancelling whatever they still run."""
    count = stop_agents(get_settings())
    click.echo(f"stopped {count} agent(s)" if count else "no agent was running")
