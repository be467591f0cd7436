"""How the CLI shows things: live log chunks, the summary line, tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from rgrid.cache_keys import has_dependencies

stderr_console = Console(stderr=True, highlight=False)


def emit_chunk(stream: str, text: str, json_mode: bool) -> None:
    """The script's stdout goes to stdout (stderr with --json, which owns stdout); RGrid's own
    messages and the script's stderr go to stderr."""
    if stream == "stdout" and not json_mode:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif stream == "system":
        for line in text.splitlines():
            stderr_console.print(f"[dim]│ {line}[/dim]", markup=True, soft_wrap=True)
    else:
        sys.stderr.write(text)
        sys.stderr.flush()


#: Transfers smaller than this finish too fast for a progress bar to help.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr for long transfers; yields the function to advance it."""
    if total < PROGRESS_MIN_BYTES or not stderr_console.is_terminal:
        yield lambda n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _hit(value: bool | None, applies: bool = True) -> str:
    if not applies:
        return "-"
    return "hit" if value else "miss"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def summary_line(execution: dict, outputs_dir: str | None) -> str:
    status = execution["status"]
    exit_code = execution.get("exit_code")
    with_deps = has_dependencies(execution.get("dependency_hash"))
    duration = execution.get("duration_s")
    parts = [
        status,
        f"exit {exit_code if exit_code is not None else '-'}",
        f"{duration:.2f}s" if duration is not None else "-",
        f"script cache {_hit(execution.get('script_cache_hit'))}",
        f"deps {_hit(execution.get('dependency_cache_hit'), with_deps)}",
        f"inputs {_hit(execution.get('input_cache_hit'), execution.get('input_hash') is not None)}",
        f"uploaded {human_bytes(execution.get('bytes_uploaded') or 0)}",
    ]
    if execution.get("inputs"):
        total = len(execution["inputs"])
        parts[-1] += f" ({execution.get('files_uploaded') or 0} of {total} files)"
    if outputs_dir:
        parts.append(f"outputs {outputs_dir}")
    line = " · ".join(parts)
    if execution.get("error") and status != "succeeded":
        line += f"\n{execution['error']}"
    return line


def print_summary(execution: dict, outputs_dir: str | None) -> None:
    colour = "green" if execution["status"] == "succeeded" else "red"
    first, *rest = summary_line(execution, outputs_dir).split("\n")
    stderr_console.print(f"[bold {colour}]{first}[/]", soft_wrap=True)
    for line in rest:
        stderr_console.print(line, soft_wrap=True, markup=False)


def print_json(data: dict | list) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=True))


def executions_table(rows: list[dict]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "STATUS", "EXIT", "SCRIPT", "CACHE", "DURATION", "CREATED"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["execution_id"],
            row["status"],
            "" if row["exit_code"] is None else str(row["exit_code"]),
            row["script_name"],
            "hit" if row["script_cache_hit"] else "miss",
            "" if row["duration_s"] is None else f"{row['duration_s']:.2f}s",
            (row["created_at"] or "")[:19].replace("T", " "),
        )
    return table
