"""The ``rgrid`` command line.

Exit codes follow ``docker run``: a script's own exit code passes through, so RGrid's own
outcomes use codes a script rarely does (``EXIT_*`` below, listed in ``rgrid run --help``).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys

import click

from rgrid.core.errors import RGridError

#: RGrid could not run the script: bad input, a failed dependency install, an unreachable
#: service (``docker run``'s 125).
EXIT_RGRID = 125
#: The script ran past its timeout (``timeout(1)``'s 124).
EXIT_TIMED_OUT = 124
#: Stopped by Ctrl-C, or cancelled.
EXIT_INTERRUPTED = 130
#: Whoever read the output went away (``| head``): 128 + SIGPIPE, as a shell reports a
#: command the signal ended.
EXIT_OUTPUT_CLOSED = 141


def json_requested(args: list[str]) -> bool:
    """Whether the command line asked for ``--json`` (before any ``--``): then even a failure
    before anything ran is answered with a JSON object on stdout."""
    options = args[: args.index("--")] if "--" in args else args
    return "--json" in options


def fail(message: str, code: int = EXIT_RGRID) -> None:
    """One line on stderr (and the JSON error object with ``--json``), then exit."""
    if json_requested(sys.argv[1:]):
        from rgrid.cli.output import print_json

        print_json({"status": "error", "error": message})
    click.echo(f"rgrid: error: {message}", err=True)
    sys.exit(code)


#: The module of each command, imported when the command is used: a warm `rgrid run` does
#: not import every other command first (~25 ms of its start-up, measured).
COMMAND_MODULES = {
    "admin": "admin",
    "agent": "agent",
    "batch": "batch",
    "cache": "cache",
    "runtime": "runtime",
    "why": "why",
    "run": "run",
    **{name: "executions" for name in ("cancel", "status", "logs", "outputs", "list")},
}


class RGridGroup(click.Group):
    """Turns every RGridError into one line on stderr and a non-zero exit, never a traceback.
    Loads each command's module on first use (click's lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"rgrid.cli.{COMMAND_MODULES[cmd_name]}")
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RGridError as exc:
            fail(exc.message)
        except KeyboardInterrupt:
            click.echo("rgrid: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Before click's own answer to it (exit 1): `rgrid list | head -1` ends as
            # `rgrid run ... | head -1` does.
            silence(sys.stdout)
            silence(sys.stderr)
            sys.exit(EXIT_OUTPUT_CLOSED)


def silence(stream) -> None:
    """Nobody reads ``stream`` any more (``| head``): point it at /dev/null, so that nothing
    left to write or flush raises again at exit (Python's documented recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


@click.group(cls=RGridGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rgrid")
def cli() -> None:
    """Run Python scripts on RGrid. With RGRID_API_URL unset, everything runs locally."""


def main() -> None:
    # A short-lived CLI: skip the collector's final pass over every object at exit, which
    # measured ~0.3 s of a 1 s warm `rgrid run`.
    atexit.register(gc.freeze)
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:
        # A usage error exits 125 like any RGrid failure, not 2, which scripts use.
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} -h')"
        fail(exc.format_message() + hint)
    except click.Abort:
        click.echo("rgrid: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
