"""cancel, status, logs, outputs, list: the same against the embedded default or a remote API;
and how a run is followed and its outputs fetched, which `rgrid run` (rgrid/cli/run.py) shares."""

from __future__ import annotations

from pathlib import Path

import click

from rgrid.cli import cli
from rgrid.cli.output import (
    LogPrinter,
    executions_table,
    note,
    outputs_folder,
    print_json,
    progress,
)
from rgrid.client.downloads import select_outputs
from rgrid.client.protocol import Client, make_client
from rgrid.core.config import get_settings
from rgrid.core.errors import BadInput
from rgrid.core.statuses import TERMINAL_STATUSES
from rgrid.core.units import human_bytes


def _client() -> Client:
    return make_client(get_settings())


def outputs_dir_for(execution_id: str) -> Path:
    """``./rgrid-outputs/<id>/``, absolute."""
    return outputs_folder(execution_id, r"[0-9a-f]{16}", "execution")


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
