"""run, status, logs, outputs, list: the same against the embedded default or a remote API."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console

from rgrid.cli import cli
from rgrid.cli.output import (
    emit_chunk,
    executions_table,
    print_json,
    print_summary,
    stderr_console,
)
from rgrid.client import Client, make_client
from rgrid.config import DEFAULT_RUNTIME, get_settings
from rgrid.errors import BadInput

OUTPUTS_ROOT = Path("rgrid-outputs")

#: ``rgrid run``'s exit status for each way an execution ends (a failed script: its own code).
EXIT_STATUS = {"succeeded": 0, "timed_out": 124, "build_failed": 1, "error": 1, "cancelled": 130}


def _client() -> Client:
    return make_client(get_settings())


def read_script(path: Path) -> str:
    if not path.exists():
        raise BadInput(f"script not found: {path}")
    if not path.is_file():
        raise BadInput(f"not a file: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"script is not UTF-8 text: {path} (byte {exc.start})") from exc


def follow(client: Client, execution_id: str, json_mode: bool) -> None:
    """Print log chunks as they arrive until the execution's whole log is stored."""
    offset = 0
    while True:
        page = client.logs(execution_id, offset)
        for stream, text in page["chunks"]:
            emit_chunk(stream, text, json_mode)
        offset = page["next_offset"]
        if page["complete"]:
            return
        if not page["chunks"]:
            time.sleep(client.poll_interval_s)


def fetch_outputs(client: Client, execution: dict, dest: Path) -> list[Path]:
    if not execution["outputs"]:
        return []
    return client.download_outputs(execution, dest)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
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
def run(
    script: Path,
    args: tuple[str, ...],
    runtime: str,
    timeout_s: int | None,
    requirements_file: Path | None,
    refresh_deps: bool,
    json_mode: bool,
):
    """Run SCRIPT (with ARGS) in a sandboxed container, stream its output, fetch its outputs."""
    text = read_script(script)
    if timeout_s is not None and timeout_s < 1:
        raise BadInput("--timeout must be at least 1 second")
    requirements = None
    if requirements_file is not None:
        from rgrid.requirements import normalise, read_requirements_file

        requirements = read_requirements_file(requirements_file)
        normalise(requirements)  # a malformed line is reported here, before anything is sent
    client = _client()
    submitted = client.submit(
        script=text,
        script_name=script.name,
        runtime=runtime,
        timeout_s=timeout_s,
        args=list(args),
        requirements=requirements,
        refresh_deps=refresh_deps,
    )
    execution_id = submitted["execution_id"]
    if not json_mode:
        stderr_console.print(f"[dim]execution {execution_id}[/dim]")
    follow(client, execution_id, json_mode)
    execution = client.get(execution_id)
    dest = OUTPUTS_ROOT / execution_id
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
        "dependency_image",
        "image_ref",
        "script_cache_hit",
        "dependency_cache_hit",
        "input_cache_hit",
        "deps_build_s",
        "build_s",
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
    if follow_logs:
        follow(client, execution_id, json_mode=False)
        return
    for stream, text in client.logs(execution_id, 0)["chunks"]:
        emit_chunk(stream, text, json_mode=False)


@cli.command()
@click.argument("execution_id")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Where to put them.")
def outputs(execution_id: str, output_dir: Path | None):
    """Download an execution's output files (again)."""
    client = _client()
    execution = client.get(execution_id)
    dest = output_dir or OUTPUTS_ROOT / execution_id
    written = fetch_outputs(client, execution, dest)
    for path in written:
        click.echo(str(path))
    if not written:
        stderr_console.print("no outputs")


@cli.command(name="list")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "json_mode", is_flag=True)
def list_(limit: int, json_mode: bool):
    """List your recent executions, newest first."""
    rows = _client().list(limit)
    if json_mode:
        print_json(rows)
    else:
        Console().print(executions_table(rows)) if rows else click.echo("no executions")
