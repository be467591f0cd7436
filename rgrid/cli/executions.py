"""run, status, logs, outputs, list: the same against the embedded default or a remote API."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from rgrid.cli import cli
from rgrid.cli.output import (
    LogPrinter,
    executions_table,
    human_bytes,
    note,
    print_json,
    print_summary,
    progress,
)
from rgrid.client import Client, make_client
from rgrid.config import DEFAULT_RUNTIME, get_settings
from rgrid.errors import BadInput, RGridError
from rgrid.inputs import InputFile, hash_files, input_name
from rgrid.inputs import collect as collect_inputs
from rgrid.statuses import TERMINAL_STATUSES

OUTPUTS_ROOT = Path("rgrid-outputs")

#: ``rgrid run``'s exit status for each way an execution ends (a failed script: its own code).
EXIT_STATUS = {"succeeded": 0, "timed_out": 124, "build_failed": 1, "error": 1, "cancelled": 130}


def _client() -> Client:
    return make_client(get_settings())


def outputs_dir_for(execution_id: str) -> Path:
    """``./rgrid-outputs/<id>/``; the id comes from a server, so it must look like one."""
    if not re.fullmatch(r"[0-9a-f]{16}", execution_id):
        raise RGridError(f"the server sent an odd execution id {execution_id!r}")
    return OUTPUTS_ROOT / execution_id


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


def fetch_outputs(client: Client, execution: dict, dest: Path) -> list[Path]:
    if not execution["outputs"]:
        return []
    total = sum(output["size"] for output in execution["outputs"])
    with progress("downloading outputs", total) as advance:
        return client.download_outputs(execution, dest, advance)


def send_inputs(client: Client, files: list[InputFile], json_mode: bool) -> tuple[int, int]:
    """Hash every input, ask which digests the account lacks, upload only those (each distinct
    content once). Returns (files uploaded, bytes uploaded)."""
    total = sum(item.size for item in files)
    with progress("hashing inputs", total) as advance:
        hash_files(files, advance)
    missing = set(client.missing([item.sha256 for item in files]))
    to_send = list({item.sha256: item for item in files if item.sha256 in missing}.values())
    sent_bytes = sum(item.size for item in to_send)
    with progress("uploading inputs", sent_bytes) as advance:
        for item in to_send:
            client.upload(item, advance)
    if not json_mode:
        note(
            f"inputs: {len(files)} file(s), {len(to_send)} uploaded "
            f"({human_bytes(sent_bytes)}), {len(files) - len(to_send)} already stored"
        )
    return len(to_send), sent_bytes


@cli.command()
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1)
@click.option(
    "-a", "--arg", "extra_args", multiple=True, help="An argument for the script (repeatable)."
)
@click.option("--runtime", default=DEFAULT_RUNTIME, show_default=True, help="Runtime image.")
@click.option("--timeout", "timeout_s", type=int, help="Wall-clock limit in seconds.")
@click.option(
    "-r",
    "--requirements",
    "requirements_file",
    type=click.Path(path_type=Path),
    help="A requirements file (or use PEP 723 '# /// script' metadata in the script).",
)
@click.option(
    "--refresh-deps", is_flag=True, help="Resolve unpinned requirements again (new versions)."
)
@click.option("--json", "json_mode", is_flag=True, help="One JSON object on stdout at the end.")
@click.option("-v", "--verbose", is_flag=True, help="Show the installer's own output too.")
@click.option(
    "-d", "--detach", is_flag=True, help="Submit, print the execution id and return at once."
)
def run(
    script: Path,
    inputs: tuple[str, ...],
    extra_args: tuple[str, ...],
    runtime: str,
    timeout_s: int | None,
    requirements_file: Path | None,
    refresh_deps: bool,
    json_mode: bool,
    verbose: bool,
    detach: bool,
):
    """Run SCRIPT in a sandboxed container with INPUTS (files or folders) placed under /work,
    stream its output and fetch what it writes to /work/outputs.

    The script receives the inputs' names as arguments, then any --arg values. Stopping
    rgrid (Ctrl-C, SIGTERM, SIGHUP, or its output closed as by `| head`) cancels the
    execution and exits 130, 143, 129 or 141; with --detach the execution goes on."""
    text = read_script(script)
    settings = get_settings()
    files = collect_inputs(list(inputs), Path.cwd(), settings)
    if timeout_s is not None and timeout_s < 1:
        raise BadInput("--timeout must be at least 1 second")
    requirements = None
    if requirements_file is not None:
        from rgrid.requirements import normalise, read_requirements_file

        requirements = read_requirements_file(requirements_file)
        normalise(requirements)  # a malformed line is reported here, before anything is sent
    if detach and settings.embedded:
        raise BadInput(
            "--detach needs an RGrid API (RGRID_API_URL): the embedded default runs the script"
            " in this process"
        )
    client = make_client(settings)
    files_uploaded, bytes_uploaded = send_inputs(client, files, json_mode) if files else (0, 0)
    script_args = [input_name(arg) for arg in inputs] + list(extra_args)
    submitted = client.submit(
        script=text,
        script_name=script.name,
        runtime=runtime,
        timeout_s=timeout_s,
        args=script_args,
        requirements=requirements,
        refresh_deps=refresh_deps,
        inputs=[item.manifest_entry() for item in files],
        files_uploaded=files_uploaded,
        bytes_uploaded=bytes_uploaded,
    )
    execution_id = submitted["execution_id"]
    if detach:
        print_json(submitted) if json_mode else click.echo(execution_id)
        return
    if not json_mode:
        note(f"execution {execution_id}")
    try:
        with stop_signals():
            execution = follow(client, execution_id, LogPrinter(json_mode, verbose))
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
        print_summary(execution, outputs_dir)
    status = execution["status"]
    if status == "failed":
        raise SystemExit(execution["exit_code"] or 1)
    raise SystemExit(EXIT_STATUS.get(status, 1))


class Stopped(Exception):
    """`rgrid run` was told to stop by a signal other than Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop a followed run the way Ctrl-C does."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    """Show an execution's state."""
    execution = _client().get(execution_id)
    if json_mode:
        print_json(execution)
        return
    for key in (
        "execution_id",
        "status",
        "exit_code",
        "error",
        "script_name",
        "runtime",
        "script_hash",
        "dependency_hash",
        "environment",
        "runtime_image",
        "sandbox_warm",
        "script_cache_hit",
        "dependency_cache_hit",
        "input_cache_hit",
        "deps_build_s",
        "run_s",
        "duration_s",
        "created_at",
        "finished_at",
    ):
        if execution.get(key) is not None:
            click.echo(f"{key:22} {execution[key]}")
    for pin in execution.get("resolved_dependencies") or []:
        click.echo(f"{'dependency':22} {pin}")
    for output in execution["outputs"]:
        click.echo(f"{'output':22} {output['path']} ({output['size']} bytes)")


@cli.command()
@click.argument("execution_id")
@click.option(
    "--follow/--no-follow", "follow_logs", default=True, help="Wait for a running execution."
)
def logs(execution_id: str, follow_logs: bool):
    """Print an execution's log (stdout to stdout, stderr and RGrid's notes to stderr)."""
    client = _client()
    printer = LogPrinter(verbose=True)
    if follow_logs:
        follow(client, execution_id, printer)
        return
    for stream, text in client.logs(execution_id, 0)["chunks"]:
        printer.emit(stream, text)
    printer.close()


@cli.command()
@click.argument("execution_id")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Where to put them.")
def outputs(execution_id: str, output_dir: Path | None):
    """Download an execution's output files (again)."""
    client = _client()
    execution = client.get(execution_id)
    dest = output_dir or outputs_dir_for(execution["execution_id"])
    written = fetch_outputs(client, execution, dest)
    for path in written:
        click.echo(str(path))
    if not written:
        note("no outputs")


@cli.command(name="list")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "json_mode", is_flag=True)
def list_(limit: int, json_mode: bool):
    """List your recent executions, newest first."""
    rows = _client().list(limit)
    if json_mode:
        print_json(rows)
    else:
        from rich.console import Console

        Console().print(executions_table(rows)) if rows else click.echo("no executions")
