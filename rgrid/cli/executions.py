"""run, status, logs, outputs, list: the same against the embedded default or a remote API."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import click

from rgrid.cli import EXIT_INTERRUPTED, EXIT_RGRID, EXIT_TIMED_OUT, cli, listfile
from rgrid.cli.output import (
    LogPrinter,
    executions_table,
    note,
    outputs_folder,
    print_json,
    print_summary,
    progress,
)
from rgrid.cli.signals import Stopped, stop_signals
from rgrid.cli.uploads import send_inputs
from rgrid.client.downloads import select_outputs
from rgrid.client.remote import Client, make_client, make_run_client
from rgrid.client.sources import collect_sources, project_dependencies
from rgrid.core.config import DEFAULT_RUNTIME, Settings, get_settings
from rgrid.core.errors import BadInput
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.core.units import human_bytes, parse_bytes
from rgrid.store.channels import FdReader, StdinSource
from rgrid.store.inputs import collect as collect_inputs
from rgrid.store.inputs import input_name

#: ``rgrid run``'s exit status for each way an execution ends (a failed script: its own code).
EXIT_STATUS = {
    "succeeded": 0,
    "timed_out": EXIT_TIMED_OUT,
    "build_failed": EXIT_RGRID,
    "error": EXIT_RGRID,
    "cancelled": EXIT_INTERRUPTED,
}


def _client() -> Client:
    return make_client(get_settings())


def outputs_dir_for(execution_id: str) -> Path:
    """``./rgrid-outputs/<id>/``, absolute."""
    return outputs_folder(execution_id, r"[0-9a-f]{16}", "execution")


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


def follow(client: Client, execution_id: str, printer: LogPrinter) -> dict:
    """Print log chunks as they arrive until the execution's whole log is stored; returns the
    finished execution."""
    offset = 0
    try:
        while True:
            page = client.logs(execution_id, offset, wait=True)
            for stream, text in page["chunks"]:
                printer.emit(stream, text)
            offset = page["next_offset"]
            if page["complete"]:
                return page.get("execution") or client.get(execution_id)
    finally:
        printer.close()


def fetch_outputs(
    client: Client, execution: dict, dest: Path, paths: list[str] | None = None
) -> list[Path]:
    """``paths``: only the outputs they name (a path, a folder or a glob)."""
    if not execution["outputs"]:
        if paths:
            raise BadInput(f"{execution['execution_id']} has no outputs")
        return []
    chosen = select_outputs({"outputs": execution["outputs"]}, paths)["outputs"]
    total = sum(output["size"] for output in chosen)
    with progress("downloading outputs", total) as advance:
        if paths:
            return client.download_outputs(execution, dest, advance, paths=paths)
        return client.download_outputs(execution, dest, advance)


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
    if module is not None:
        from rgrid.client.sources import module_file

        inputs = (str(script), *inputs) if script is not None else inputs
        script = module_file(module, Path.cwd())
    elif script is None:
        raise BadInput("name a SCRIPT to run, or a module with -m MODULE")
    text = read_script(script)
    settings = get_settings()
    files = collect_inputs(list(inputs), Path.cwd(), settings)
    tree = collect_sources(script, settings, with_modules, as_module=module is not None)
    # A module also given as an input (the habit before trees were shipped) goes as that input.
    given = {item.name for item in files}
    tree.files = [item for item in tree.files if item.name not in given]
    if timeout_s is not None and timeout_s < 1:
        raise BadInput("--timeout must be at least 1 second")
    if memory is not None:
        parse_bytes(memory, "--memory")  # the format here; the server checks its maximum
    env = read_env(env_pairs, env_files)
    requirements = None
    if requirements_file is not None:
        from rgrid.host.requirements import read_requirements_file

        # A malformed line is reported here, naming its file and line, before anything is sent.
        requirements = read_requirements_file(requirements_file)
        dependency_source = f"-r {requirements_file}"
    else:
        found = project_dependencies(script, text, tree.root, extras)
        requirements, dependency_source = found.requirements, found.source
    if batch_patterns or batch_file is not None:
        if env:
            raise BadInput("--env cannot be given with --batch: a batch keeps no secrets yet")
        from rgrid.cli.batch import run_batch

        raise SystemExit(
            run_batch(
                script_text=text,
                script_name=tree.entry,
                sources=tree.files,
                module=module,
                dependency_source=dependency_source,
                patterns=batch_patterns,
                batch_file=batch_file,
                parallel=parallel,
                shared_inputs=inputs,
                args=[*extra_args, *ctx.meta.get("rgrid.script_args", [])],
                json_mode=json_mode,
                detach=detach,
                runtime=runtime,
                timeout_s=timeout_s,
                requirements=requirements,
                refresh_deps=refresh_deps or None,
                memory=memory,
                cpus=cpus,
                reuse=reuse,
                refresh=refresh or None,
            )
        )
    if parallel is not None:
        raise BadInput("--parallel needs --batch or --batch-file")
    if detach and settings.embedded:
        raise BadInput(
            "--detach needs an RGrid API (RGRID_API_URL): the embedded default runs the script"
            " in this process"
        )
    stdin_source = None if detach else stdin_to_forward(interactive)
    client = make_run_client(settings)
    inline: list[dict] = []
    files_uploaded, bytes_uploaded = (
        send_inputs(client, files, json_mode, tree.files, verbose, inline)
        if files or tree.files
        else (0, 0)
    )
    script_args = [
        *(input_name(arg) for arg in inputs),
        *extra_args,
        *ctx.meta.get("rgrid.script_args", []),
    ]
    submitted = client.submit(
        script=text,
        script_name=tree.entry,
        sources=[item.manifest_entry() for item in tree.files] or None,
        module=module,
        dependency_source=dependency_source,
        runtime=runtime,
        timeout_s=timeout_s,
        args=script_args,
        requirements=requirements,
        refresh_deps=refresh_deps,
        inputs=[item.manifest_entry() for item in files],
        files_uploaded=files_uploaded,
        bytes_uploaded=bytes_uploaded,
        memory=memory,
        cpus=cpus,
        env=env or None,
        stdin_source=stdin_source,
        reuse=reuse,
        refresh=refresh or None,
        inline=inline or None,
    )
    execution_id = submitted["execution_id"]
    if detach:
        print_json(submitted) if json_mode else click.echo(execution_id)
        return
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
        code = {KeyboardInterrupt: 130, BrokenPipeError: 141}.get(type(exc)) or exc.exit_code
        if isinstance(exc, BrokenPipeError):
            silence_stdout()
        status = cancel_and_wait(client, execution_id)
        click.echo(f"rgrid: stopped; execution {execution_id} {status}", err=True)
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


def silence_stdout() -> None:
    """Nobody reads stdout any more (``| head``): point it at /dev/null, so that nothing left
    to flush raises again at exit (Python's documented recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


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


@cli.command()
@click.argument("execution_id")
def cancel(execution_id: str):
    """Cancel an execution: it ends `cancelled` and its sandbox is stopped. A finished one is
    left as it is."""
    result = _client().cancel(execution_id)
    if result.get("cancelled"):
        click.echo(f"cancelled {result['execution_id']}")
    else:
        click.echo(f"{result['execution_id']} already finished ({result['status']}): nothing to do")


@cli.command()
@click.argument("execution_id")
@click.option("--json", "json_mode", is_flag=True)
def status(execution_id: str, json_mode: bool):
    """Show an execution's state, and whether the object store still has its log and outputs."""
    execution = _client().get(execution_id, check_store=True)
    if json_mode:
        print_json(execution)
        return
    for key in (
        "execution_id",
        "status",
        "exit_code",
        "error",
        "log_incomplete",
        "script_name",
        "runtime",
        "script_hash",
        "source_digest",
        "dependency_hash",
        "dependency_source",
        "environment",
        "runtime_image",
        "sandbox_warm",
        "script_cache_hit",
        "dependency_cache_hit",
        "input_cache_hit",
        "deps_build_s",
        "run_s",
        "duration_s",
        "timeout_s",
        "cpus",
        "created_at",
        "started_at",
        "finished_at",
    ):
        if execution.get(key) is not None:
            click.echo(f"{key:22} {execution[key]}")
    if execution.get("memory_bytes"):
        click.echo(f"{'memory':22} {human_bytes(execution['memory_bytes'])}")
    if execution.get("env_names"):
        click.echo(f"{'env':22} {' '.join(execution['env_names'])} (values not kept)")
    if execution.get("sources"):
        shipped = execution["sources"]
        size = human_bytes(sum(item["size"] for item in shipped))
        click.echo(f"{'sources':22} {len(shipped)} module file(s) beside the script ({size})")
        for item in shipped:
            click.echo(f"{'source':22} {item['path']} ({human_bytes(item['size'])})")
    for pin in execution.get("resolved_dependencies") or []:
        click.echo(f"{'dependency':22} {pin}")
    if execution.get("log_lost"):
        click.echo(f"{'log':22} lost from the object store")
    lost = set(execution.get("lost_outputs") or [])
    for output in execution["outputs"]:
        gone = " lost from the object store" if output["path"] in lost else ""
        click.echo(f"{'output':22} {output['path']} ({human_bytes(output['size'])}){gone}")
    if execution["status"] not in TERMINAL_STATUSES:
        note(f"{execution['execution_id']} is still {execution['status']}")


@cli.command()
@click.argument("execution_id")
@click.option(
    "--follow/--no-follow", "follow_logs", default=True, help="Wait for a running execution."
)
def logs(execution_id: str, follow_logs: bool):
    """Print an execution's log (stdout to stdout, stderr and RGrid's notes to stderr)."""
    client = _client()
    execution_id = client.get(execution_id)["execution_id"]  # a prefix or `last`: once
    printer = LogPrinter(verbose=True)
    if follow_logs:
        follow(client, execution_id, printer)
        return
    offset = 0
    while True:
        page = client.logs(execution_id, offset)
        for stream, text in page["chunks"]:
            printer.emit(stream, text)
        offset = page["next_offset"]
        if page["complete"] or not page["chunks"]:
            break
    printer.close()
    if not page["complete"]:
        note(f"{execution_id} is still {page['status']}: `rgrid logs {execution_id}` follows it")


@cli.command()
@click.argument("execution_id")
@click.argument("paths", nargs=-1)
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Where to put them.")
def outputs(execution_id: str, paths: tuple[str, ...], output_dir: Path | None):
    """Download an execution's output files (again): all, or those PATHS name (an output's
    path, a folder, or a glob such as 'tiles/*.png')."""
    client = _client()
    execution = client.get(execution_id)
    if execution["status"] not in TERMINAL_STATUSES:
        raise BadInput(
            f"{execution['execution_id']} is still {execution['status']}: its outputs can be"
            " fetched when it ends"
        )
    dest = output_dir or outputs_dir_for(execution["execution_id"])
    written = fetch_outputs(client, execution, dest, list(paths))
    for path in written:
        click.echo(str(path))
    if not written:
        note("no outputs")


@cli.command(name="list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--json", "json_mode", is_flag=True)
def list_(limit: int, json_mode: bool):
    """List your recent executions, newest first."""
    client = _client()
    rows = client.list(limit, standalone=True)
    for row in rows:
        fetched = outputs_dir_for(row["execution_id"])
        row["outputs_dir"] = str(fetched) if fetched.is_dir() else None
    if hasattr(client, "list_batches"):
        from rgrid.cli.batch import batches_table

        # Each batch is one row with its counts; its executions are not listed one by one.
        rows += batches_table(client.list_batches(limit))
        rows.sort(key=lambda row: row["created_at"] or "", reverse=True)
        rows = rows[:limit]
    if json_mode:
        # One array, newest first; "kind" tells an execution from a batch (which has counts
        # in place of an exit code).
        print_json(
            [
                {"kind": "batch", **row["batch"]}
                if "batch" in row
                else {"kind": "execution", **row}
                for row in rows
            ]
        )
    elif rows:
        for line in executions_table(rows):
            click.echo(line)
    else:
        note("no executions")
