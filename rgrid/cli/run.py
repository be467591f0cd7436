"""`rgrid run`: a script (or ``-m MODULE``) with its inputs, shipped modules and options
made into one ``RunSpec``, submitted, followed while it runs, its outputs fetched; or, with
``--batch``, handed to rgrid/cli/batch.py as a batch's template."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
import time
from pathlib import Path

import click

from rgrid.cli import (
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_CLOSED,
    EXIT_RGRID,
    EXIT_TIMED_OUT,
    cli,
    listfile,
    silence,
)
from rgrid.cli.executions import fetch_outputs, follow, outputs_dir_for
from rgrid.cli.output import LogPrinter, note, print_json, print_summary
from rgrid.cli.signals import Stopped, stop_signals
from rgrid.cli.uploads import send_inputs
from rgrid.client.protocol import Client, make_run_client
from rgrid.client.sources import SourceTree, collect_sources, project_dependencies
from rgrid.core.config import DEFAULT_RUNTIME, Settings, get_settings
from rgrid.core.errors import BadInput
from rgrid.core.spec import RunSpec
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.core.units import parse_bytes
from rgrid.store.channels import FdReader, StdinSource
from rgrid.store.inputs import InputFile, input_name
from rgrid.store.inputs import collect as collect_inputs

#: ``rgrid run``'s exit status for each way an execution ends (a failed script: its own code).
EXIT_STATUS = {
    "succeeded": 0,
    "timed_out": EXIT_TIMED_OUT,
    "build_failed": EXIT_RGRID,
    "error": EXIT_RGRID,
    "cancelled": EXIT_INTERRUPTED,
}


def read_env(pairs: tuple[str, ...], files: tuple[Path, ...]) -> dict[str, str]:
    """``--env-file`` files first (``NAME=VALUE`` lines, ``#`` comments, an optional
    ``export``, quotes around a value removed), then ``--env NAME=VALUE`` / ``--env NAME``
    (the value of this shell's NAME), later ones winning, as ``docker run`` reads them."""
    env: dict[str, str] = {}
    for path in files:
        for number, line in listfile.entries(path, "--env-file"):
            name, sep, value = line.removeprefix("export ").partition("=")
            if not sep:
                raise BadInput(f"{path}:{number}: expected NAME=VALUE")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[name.strip()] = value
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            if name not in os.environ:
                raise BadInput(f"--env {name}: {name} is not set in this shell")
            value = os.environ[name]
        env[name] = value
    return env


def stdin_to_forward(interactive: bool) -> StdinSource | None:
    """What the script reads on stdin, as under ``uv run``: whatever is piped in. A terminal
    is forwarded only with ``-i`` (else the script reads EOF at once), and nothing is sent
    for a closed stdin or /dev/null."""
    try:
        info = os.fstat(0)
    except OSError:
        return None
    if os.isatty(0):
        return FdReader(0) if interactive else None
    if stat.S_ISCHR(info.st_mode) and os.path.samestat(info, os.stat(os.devnull)):
        return None
    return FdReader(0)


def read_script(path: Path) -> str:
    if not path.exists():
        raise BadInput(f"script not found: {path}")
    if not path.is_file():
        raise BadInput(f"not a file: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"script is not UTF-8 text: {path} (byte {exc.start})") from exc


class RunCommand(click.Command):
    """Everything after ``--`` goes to the script unchanged, as with ``uv run`` and
    ``docker run``, even words that look like rgrid's own options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            split = args.index("--")
            ctx.meta["rgrid.script_args"] = args[split + 1 :]
            args = args[:split]
        return super().parse_args(ctx, args)


RUN_EPILOG = f"""\b
Exit status (as with docker run):
  the script's own   it ran; 137 when killed at its memory limit
  {EXIT_TIMED_OUT}                it ran past --timeout
  {EXIT_RGRID}                RGrid could not run it: bad input, a failed install, a service down
  130/143/129/141    rgrid was stopped (Ctrl-C, SIGTERM, SIGHUP, output closed): cancelled
"""


@cli.command(cls=RunCommand, epilog=RUN_EPILOG)
@click.argument("script", type=click.Path(path_type=Path), required=False)
@click.argument("inputs", nargs=-1)
@click.option(
    "-m",
    "--module",
    "module",
    metavar="MODULE",
    help="Run a local module as `python -m MODULE` does (from this folder); then every"
    " positional argument is an input.",
)
@click.option(
    "-a", "--arg", "extra_args", multiple=True, help="An argument for the script (repeatable)."
)
@click.option(
    "-e",
    "--env",
    "env_pairs",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="An environment variable for the script; NAME alone passes this shell's value."
    " Values are secrets: never stored, logged or shown.",
)
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A file of NAME=VALUE lines, read like --env.",
)
@click.option(
    "-i",
    "--interactive",
    is_flag=True,
    help="Send what is typed at this terminal to the script's stdin (piped stdin is always sent).",
)
@click.option("--runtime", default=DEFAULT_RUNTIME, show_default=True, help="Runtime image.")
@click.option(
    "--timeout",
    "timeout_s",
    type=int,
    help=f"Wall-clock limit in seconds.  [default: {Settings.default_timeout_s}]",
)
@click.option(
    "--memory",
    help=f"Memory limit, e.g. 512m or 2g.  [default: {Settings.memory_limit},"
    f" at most {Settings.max_memory_limit}]",
)
@click.option(
    "--cpus",
    type=float,
    help=f"CPU limit, e.g. 0.5 or 2.  [default: {Settings.cpu_limit:g},"
    f" at most {Settings.max_cpu_limit:g}]",
)
@click.option(
    "-r",
    "--requirements",
    "requirements_file",
    type=click.Path(path_type=Path),
    help="A requirements file (or use PEP 723 '# /// script' metadata in the script).",
)
@click.option(
    "--extra",
    "extras",
    multiple=True,
    metavar="NAME",
    help="Also install this optional dependency group of the project's pyproject.toml.",
)
@click.option(
    "--refresh-deps", is_flag=True, help="Resolve unpinned requirements again (new versions)."
)
@click.option(
    "--batch",
    "batch_patterns",
    multiple=True,
    metavar="GLOB|FOLDER",
    help="Run SCRIPT once per file matched (quote the glob); each file is its first argument,"
    " and its outputs land in ./rgrid-outputs/<batch-id>/<file name>/.",
)
@click.option(
    "--batch-file",
    type=click.Path(path_type=Path),
    help="A file listing the batch's input files, one per line.",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    help="With --batch: at most this many executions at once.  [default: what the grid takes]",
)
@click.option(
    "--reuse/--no-reuse",
    default=None,
    help="Answer from a previous succeeded run whose every input is unchanged, without"
    " running the script (`rgrid why ID` says why one ran).  [default: RGRID_REUSE_DEFAULT]",
)
@click.option("--refresh", is_flag=True, help="Run even if it could be reused, and keep this run.")
@click.option("--json", "json_mode", is_flag=True, help="One JSON object on stdout at the end.")
@click.option(
    "--with-module",
    "with_modules",
    multiple=True,
    metavar="NAME|PATH",
    help="Ship a local module the import scan cannot see (a dynamic import): a dotted name or"
    " a path (repeatable).",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Show the installer's own output and the shipped files."
)
@click.option(
    "-d", "--detach", is_flag=True, help="Submit, print the execution id and return at once."
)
@click.pass_context
# Long only in its signature: click passes each of the 24 options as a parameter; the body
# is the steps below, in order (its docstring is the command's --help).
def run(
    ctx: click.Context,
    script: Path | None,
    inputs: tuple[str, ...],
    module: str | None,
    extra_args: tuple[str, ...],
    env_pairs: tuple[str, ...],
    env_files: tuple[Path, ...],
    interactive: bool,
    runtime: str,
    timeout_s: int | None,
    memory: str | None,
    cpus: float | None,
    requirements_file: Path | None,
    extras: tuple[str, ...],
    refresh_deps: bool,
    batch_patterns: tuple[str, ...],
    batch_file: Path | None,
    parallel: int | None,
    reuse: bool | None,
    refresh: bool,
    json_mode: bool,
    with_modules: tuple[str, ...],
    verbose: bool,
    detach: bool,
):
    """Run SCRIPT in a sandboxed container with INPUTS (files or folders) beside it in /work,
    stream its output and fetch what it writes to /work/outputs.

    \b
      rgrid run train.py data.csv -- --epochs 3
      cat items.txt | rgrid run count.py
      rgrid run fetch.py -e API_TOKEN --memory 2g

    The local modules and packages SCRIPT imports (found statically, under its project root:
    the nearest folder up with pyproject.toml or .git) are shipped with it at their paths, so
    they import as they do locally; they are no arguments. The script's arguments are the
    inputs' names, then any --arg values, then everything after --. Piped stdin reaches the
    script. Stopping rgrid (Ctrl-C, SIGTERM, SIGHUP, or its output closed as by `| head`)
    cancels the execution; with --detach it goes on."""
    script, inputs = _script_and_inputs(script, module, inputs)
    text = read_script(script)
    settings = get_settings()
    files = collect_inputs(list(inputs), Path.cwd(), settings)
    tree = collect_sources(script, settings, with_modules, as_module=module is not None)
    # A module also given as an input (the habit before trees were shipped) goes as that input.
    given = {item.name for item in files}
    tree.files = [item for item in tree.files if item.name not in given]
    _check_limits(timeout_s, memory)
    env = read_env(env_pairs, env_files)
    requirements, dependency_source = _dependencies(script, text, tree, requirements_file, extras)
    spec = RunSpec(
        script=text,
        script_name=tree.entry,
        runtime=runtime,
        timeout_s=timeout_s,
        args=[*extra_args, *ctx.meta.get("rgrid.script_args", [])],
        requirements=requirements,
        refresh_deps=refresh_deps,
        memory=memory,
        cpus=cpus,
        module=module,
        dependency_source=dependency_source,
        reuse=reuse,
        refresh=refresh,
    )
    if batch_patterns or batch_file is not None:
        batch = (batch_patterns, batch_file, parallel)
        raise SystemExit(_run_as_batch(spec, env, tree, inputs, batch, json_mode, detach))
    _check_single(parallel, detach, settings)
    client = make_run_client(settings)
    spec = dataclasses.replace(spec, args=[*(input_name(arg) for arg in inputs), *spec.args])
    submitted = _submit(client, spec, files, tree, env, json_mode, verbose, detach, interactive)
    if detach:
        print_json(submitted) if json_mode else click.echo(submitted["execution_id"])
        return
    _follow_and_finish(client, submitted["execution_id"], dependency_source, json_mode, verbose)


def _run_as_batch(
    spec: RunSpec,
    env: dict[str, str],
    tree: SourceTree,
    inputs: tuple[str, ...],
    batch: tuple[tuple[str, ...], Path | None, int | None],
    json_mode: bool,
    detach: bool,
) -> int:
    """``--batch``: the spec is the batch's template; ``inputs`` are shared by every run.
    ``batch``: the patterns, the batch file and ``--parallel``."""
    if env:
        raise BadInput("--env cannot be given with --batch: a batch keeps no secrets yet")
    from rgrid.cli.batch import run_batch

    patterns, batch_file, parallel = batch
    return run_batch(
        spec,
        sources=tree.files,
        patterns=patterns,
        batch_file=batch_file,
        parallel=parallel,
        shared_inputs=inputs,
        json_mode=json_mode,
        detach=detach,
    )


def _check_single(parallel: int | None, detach: bool, settings: Settings) -> None:
    """Options a single run (no --batch) cannot take here."""
    if parallel is not None:
        raise BadInput("--parallel needs --batch or --batch-file")
    if detach and settings.embedded:
        raise BadInput(
            "--detach needs an RGrid API (RGRID_API_URL): the embedded default runs the script"
            " in this process"
        )


def _check_limits(timeout_s: int | None, memory: str | None) -> None:
    """What can be told wrong before anything is sent (the server checks the maximums)."""
    if timeout_s is not None and timeout_s < 1:
        raise BadInput("--timeout must be at least 1 second")
    if memory is not None:
        parse_bytes(memory, "--memory")


def _script_and_inputs(
    script: Path | None, module: str | None, inputs: tuple[str, ...]
) -> tuple[Path, tuple[str, ...]]:
    """The script to run and the inputs: with ``-m``, the module's file, and every
    positional argument is an input."""
    if module is not None:
        from rgrid.client.sources import module_file

        inputs = (str(script), *inputs) if script is not None else inputs
        return module_file(module, Path.cwd()), inputs
    if script is None:
        raise BadInput("name a SCRIPT to run, or a module with -m MODULE")
    return script, inputs


def _dependencies(
    script: Path, text: str, tree: SourceTree, requirements_file: Path | None, extras
) -> tuple[str | None, str | None]:
    """The requirements and where they were found: ``-r FILE``, else the script's PEP 723
    block or its project's pyproject.toml."""
    if requirements_file is not None:
        from rgrid.host.requirements import read_requirements_file

        # A malformed line is reported here, naming its file and line, before anything is sent.
        return read_requirements_file(requirements_file), f"-r {requirements_file}"
    found = project_dependencies(script, text, tree.root, extras)
    return found.requirements, found.source


def _submit(
    client: Client,
    spec: RunSpec,
    files: list[InputFile],
    tree: SourceTree,
    env: dict[str, str],
    json_mode: bool,
    verbose: bool,
    detach: bool,
    interactive: bool,
) -> dict:
    """Upload what the account lacks (small files go inline), then submit the run."""
    stdin_source = None if detach else stdin_to_forward(interactive)
    inline: list[dict] = []
    files_uploaded, bytes_uploaded = (
        send_inputs(client, files, json_mode, tree.files, verbose, inline)
        if files or tree.files
        else (0, 0)
    )
    spec = dataclasses.replace(
        spec,
        inputs=[item.manifest_entry() for item in files],
        sources=[item.manifest_entry() for item in tree.files] or None,
        files_uploaded=files_uploaded,
        bytes_uploaded=bytes_uploaded,
        inline=inline or None,
        env=env or None,
    )
    return client.submit(spec, stdin_source=stdin_source)


def _follow_and_finish(
    client: Client,
    execution_id: str,
    dependency_source: str | None,
    json_mode: bool,
    verbose: bool,
) -> None:
    """Follow the run's log to its end (a stop cancels it), fetch its outputs, say how it
    went and exit with its status."""
    if not json_mode:
        note(f"execution {execution_id}")
        # Said once the submission is accepted: a refused one gets its one line alone.
        if dependency_source:
            note(f"dependencies: from {dependency_source}")
    printer = LogPrinter(json_mode, verbose)
    try:
        with stop_signals():
            execution = follow(client, execution_id, printer)
    except (KeyboardInterrupt, Stopped, BrokenPipeError) as exc:
        codes = {KeyboardInterrupt: EXIT_INTERRUPTED, BrokenPipeError: EXIT_OUTPUT_CLOSED}
        code = codes.get(type(exc)) or exc.exit_code
        if isinstance(exc, BrokenPipeError):
            silence(sys.stdout)
        status = cancel_and_wait(client, execution_id)
        try:
            click.echo(f"rgrid: stopped; execution {execution_id} {status}", err=True)
        except BrokenPipeError:  # stderr went with stdout: `rgrid run ... 2>&1 | head`
            silence(sys.stderr)
        raise SystemExit(code) from None
    dest = outputs_dir_for(execution_id)
    written = fetch_outputs(client, execution, dest)
    outputs_dir = str(dest) if written else None
    if json_mode:
        print_json({**execution, "outputs_dir": outputs_dir})
    else:
        print_summary(execution, outputs_dir, printer.shown)
    status = execution["status"]
    if status == "failed":
        raise SystemExit(execution["exit_code"] or 1)
    raise SystemExit(EXIT_STATUS.get(status, EXIT_RGRID))


#: How long a stopped `rgrid run` waits for its execution to end before it leaves anyway.
CANCEL_WAIT_S = 15.0


def cancel_and_wait(client: Client, execution_id: str) -> str:
    """Cancel the execution and wait (bounded) until it has ended; returns its status. A
    second Ctrl-C leaves at once: the cancel is already recorded, and the sandbox's own
    deadline and the next start's recovery end the rest."""
    try:
        client.cancel(execution_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            status = client.get(execution_id)["status"]
            if status in TERMINAL_STATUSES:
                return status
            time.sleep(0.1)
        return "is being cancelled"
    except KeyboardInterrupt:
        return "is being cancelled"
