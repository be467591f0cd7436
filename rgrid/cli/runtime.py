"""Runtime base images: list them, build them (there is no registry to pull from)."""

from __future__ import annotations

import click

from rgrid.cli import cli
from rgrid.cli.output import note


@cli.group()
def runtime() -> None:
    """Runtime base images."""


@runtime.command("list")
def list_runtimes() -> None:
    """Show each runtime, its image, and whether the image is built on this Docker host."""
    from rgrid.host.docker_engine import get_docker
    from rgrid.host.runtimes import RUNTIMES, runtime_image_exists

    client = get_docker()
    for name, spec in RUNTIMES.items():
        state = "built" if runtime_image_exists(spec, client) else "not built"
        click.echo(f"{name:14} {spec.image:30} {state}")


@runtime.command("build")
@click.argument("name")
@click.option("--if-missing", is_flag=True, help="Do nothing if the image already exists.")
def build(name: str, if_missing: bool) -> None:
    """Build the base image for runtime NAME from Debian packages."""
    from rgrid.host.docker_engine import get_docker
    from rgrid.host.runtimes import build_runtime, resolve_runtime, runtime_image_exists

    spec = resolve_runtime(name)
    client = get_docker()
    if if_missing and runtime_image_exists(spec, client):
        click.echo(f"{spec.image} already built")
        return
    image_id = build_runtime(
        spec,
        client,
        log=lambda line: note(line.rstrip()),
    )
    click.echo(f"built {spec.image} ({image_id[:19]})")
