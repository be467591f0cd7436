"""The ``rgrid`` command line."""

from __future__ import annotations

import atexit
import gc
import sys

import click

from rgrid.errors import RGridError


class RGridGroup(click.Group):
    """Turns every RGridError into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RGridError as exc:
            click.echo(f"rgrid: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("rgrid: interrupted", err=True)
            sys.exit(130)


@click.group(cls=RGridGroup)
@click.version_option(package_name="rgrid")
def cli() -> None:
    """Run Python scripts on RGrid. With RGRID_API_URL unset, everything runs locally."""


def main() -> None:
    from rgrid.cli import admin, executions, runtime  # noqa: F401 - registers the commands

    # A short-lived CLI: skip the collector's final pass over every object at exit, which
    # measured ~0.3 s of a 1 s warm `rgrid run`.
    atexit.register(gc.freeze)
    cli()
