"""How the CLI shows things: live log chunks, the summary line, tables."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import click

from rgrid.core.errors import RGridError
from rgrid.core.units import human_bytes

if TYPE_CHECKING:
    from rich.console import Console


#: Downloaded outputs go under the current folder: one folder per execution or batch.
OUTPUTS_ROOT = Path("rgrid-outputs")


def outputs_folder(server_id: str, pattern: str, what: str) -> Path:
    """``./rgrid-outputs/<id>/``, absolute. The id comes from a server and becomes a path, so
    anything that does not match ``pattern`` (hex digits) is refused, naming ``what`` it is."""
    if not re.fullmatch(pattern, server_id):
        raise RGridError(f"the server sent an odd {what} id {server_id!r}")
    return Path.cwd() / OUTPUTS_ROOT / server_id


@cache
def err_console() -> Console:
    """rich, for what needs it (live phase lines, progress bars, tables): imported on first
    use, because a warm run needs none of it and the import costs ~40 ms of every start."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def note(text: str) -> None:
    """A dim line of RGrid's own on stderr (plain when stderr is not a terminal)."""
    click.echo(click.style(text, dim=True), err=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class LogPrinter:
    """Shows an execution's log as it arrives.

    The script's stdout goes to stdout (stderr with --json, which owns stdout); its stderr and
    RGrid's own notes go to stderr. A phase (resolving, installing, starting) is one line that
    counts its elapsed time in place on a terminal and is closed with its duration when the
    next thing arrives; elsewhere it is printed once, closed. An installer's raw output is
    shown only when ``verbose``; it is always kept in the stored log."""

    def __init__(self, json_mode: bool = False, verbose: bool = False):
        self.json_mode, self.verbose = json_mode, verbose
        self._phase: str | None = None
        self._phase_started = 0.0
        self._live = None
        #: RGrid's own lines shown so far, so the summary does not repeat one.
        self.shown: list[str] = []

    def emit(self, stream: str, text: str) -> None:
        if stream == "phase":
            self._close_phase()
            self._open_phase(text.strip())
            return
        if stream == "detail" and not self.verbose:
            return
        self._close_phase()
        if stream == "stdout" and not self.json_mode:
            sys.stdout.write(text)
            sys.stdout.flush()
        elif stream in ("system", "detail"):
            if stream == "system":
                self.shown.append(text)
            for line in text.splitlines():
                note(f"│ {line}")
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def close(self) -> None:
        self._close_phase()

    def _open_phase(self, text: str) -> None:
        self._phase, self._phase_started = text, time.monotonic()
        if stderr_is_terminal():
            from rich.live import Live

            self._live = Live(
                _Elapsed(text, self._phase_started),
                console=err_console(),
                transient=True,
                refresh_per_second=10,
            )
            self._live.start()

    def _close_phase(self) -> None:
        if self._phase is None:
            return
        if self._live is not None:
            self._live.stop()
            self._live = None
        elapsed = time.monotonic() - self._phase_started
        note(f"│ {self._phase} · {elapsed:.2f}s")
        self._phase = None


class _Elapsed:
    """A phase line whose elapsed time is recomputed at each refresh."""

    def __init__(self, text: str, started: float):
        self.text, self.started = text, started

    def __rich__(self) -> str:
        from rich.markup import escape

        elapsed = time.monotonic() - self.started
        return f"[cyan]…[/cyan] {escape(self.text)} [dim]{elapsed:.1f}s[/dim]"


#: Transfers smaller than this finish too fast for a progress bar to help.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr for long transfers; yields the function to advance it."""
    if total < PROGRESS_MIN_BYTES or not stderr_is_terminal():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _hit(value: bool | None) -> str:
    """A cache that does not apply to this execution is null: ``-``."""
    if value is None:
        return "-"
    return "hit" if value else "miss"


def summary_line(execution: dict, outputs_dir: str | None, shown: Iterable[str] = ()) -> str:
    """The line after a run. Its error is left out when the log already showed it
    (``shown``): each message once."""
    status = execution["status"]
    exit_code = execution.get("exit_code")
    duration = execution.get("duration_s")
    error = execution.get("error")
    # A limit ended a run whose script exited 0: the limit is the reason, not the exit code.
    limit_reason = status == "failed" and exit_code == 0 and bool(error)
    parts = [
        status,
        error if limit_reason else f"exit {exit_code if exit_code is not None else '-'}",
        f"{duration:.2f}s" if duration is not None else "-",
        f"script cache {_hit(execution.get('script_cache_hit'))}",
        f"deps {_hit(execution.get('dependency_cache_hit'))}",
        f"inputs {_hit(execution.get('input_cache_hit'))}",
        f"uploaded {human_bytes(execution.get('bytes_uploaded') or 0)}",
    ]
    if execution.get("inputs") or execution.get("sources"):
        # Shipped modules are sent as inputs are: both count here.
        total = len(execution.get("inputs") or []) + len(execution.get("sources") or [])
        parts[-1] += f" ({execution.get('files_uploaded') or 0} of {total} files)"
    if execution.get("sources"):
        parts.insert(-1, f"sources {len(execution['sources']) + 1} files")
    if execution.get("reused_from"):
        # Answered from the output cache: nothing was built, uploaded for it or run.
        reused = execution["reused_from"][:8]
        parts[2:] = [f"reused {reused}…", f"{execution.get('run_s') or 0:.1f}s run"]
    if outputs_dir:
        parts.append(f"outputs {outputs_dir}")
    if execution.get("log_incomplete"):
        parts.append("log incomplete")
    line = " · ".join(parts)
    if execution.get("log_incomplete") and not any(execution["log_incomplete"] in t for t in shown):
        line += f"\nlog incomplete: {execution['log_incomplete']}"
    if limit_reason:
        return line
    if error and status != "succeeded" and not any(error in text for text in shown):
        line += f"\n{error}"
    return line


def print_summary(execution: dict, outputs_dir: str | None, shown: Iterable[str] = ()) -> None:
    colour = "green" if execution["status"] == "succeeded" else "red"
    first, *rest = summary_line(execution, outputs_dir, shown).split("\n")
    click.echo(click.style(first, fg=colour, bold=True), err=True)
    for line in rest:
        click.echo(line, err=True)


def print_json(data: dict | list) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=True))


def table_lines(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, as ``docker ps`` prints them: one line per row
    whatever the terminal's width, so ``| grep`` and ``| awk`` see whole rows."""
    cells = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _cache(hit: bool | None) -> str:
    return "" if hit is None else "hit" if hit else "miss"


def executions_table(rows: list[dict]) -> list[str]:
    return table_lines(
        ("ID", "STATUS", "EXIT", "SCRIPT", "CACHE", "HOST", "DURATION", "CREATED (UTC)"),
        (
            (
                row["execution_id"],
                row["status"],
                "" if row["exit_code"] is None else str(row["exit_code"]),
                row["script_name"],
                _cache(row["script_cache_hit"]),
                row.get("host") or "",
                "" if row["duration_s"] is None else f"{row['duration_s']:.2f}s",
                (row["created_at"] or "")[:19].replace("T", " "),
            )
            for row in rows
        ),
    )
