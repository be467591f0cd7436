"""Following a batch: its progress while it runs (a bar at a terminal, a JSON line per
finished execution with --json), each finished execution's outputs fetched as it ends, a
stop (Ctrl-C) that asks before cancelling, and the summary at the end."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

import click

from rgrid.cli import EXIT_INTERRUPTED
from rgrid.cli.output import note, outputs_folder, print_json, stderr_is_terminal, table_lines
from rgrid.client.protocol import Client
from rgrid.core.statuses import TERMINAL_STATUSES

#: How often a followed batch is looked at.
POLL_S = 0.5
#: A finished execution is looked for again this long after the newest one seen, so one whose
#: commit landed a moment after a later one's is not missed (duplicates are dropped by id).
FINISHED_OVERLAP = timedelta(seconds=2)
#: How many failed executions the summary shows with their last log line.
SHOW_FAILED = 10


def outputs_root(batch_id: str) -> Path:
    """The folder a batch's outputs go to. Any hex id is good, one of only digits too."""
    return outputs_folder(batch_id, r"[0-9a-f]{1,16}", "batch")


#: Uploads of a page run on this many connections at once: a small file's upload is three
#: round trips (plan, PUT, complete), and one after the other 300 small files took 41 s.
UPLOAD_THREADS = 8


@dataclass
class Follower:
    """Watches a batch until every execution has ended: counts from the batch, finished
    executions as they finish (their outputs fetched at once, a JSON line each)."""

    client: Client
    batch_id: str
    json_mode: bool
    fetch_outputs: bool = True
    #: Report only these executions (a retry's new ones); None: every one of the batch.
    only: set[str] | None = None
    seen: set[str] = field(default_factory=set)
    finished: list[dict] = field(default_factory=list)
    newest: str | None = None
    started: float = field(default_factory=time.monotonic)
    status: dict = field(default_factory=dict)

    def _finished_since(self) -> Iterator[dict]:
        since = None
        if self.newest is not None:
            since = (datetime.fromisoformat(self.newest) - FINISHED_OVERLAP).isoformat()
        since = since or "1970-01-01T00:00:00+00:00"
        after = ""
        while True:
            rows = self.client.batch_executions(
                self.batch_id, after=after, finished_since=since, limit=500
            )
            for row in rows:
                wanted = self.only is None or row["execution_id"] in self.only
                if wanted and row["execution_id"] not in self.seen:
                    yield row
            if len(rows) < 500:
                return
            since, after = rows[-1]["finished_at"], rows[-1]["execution_id"]

    def poll(self) -> bool:
        """One look; returns whether the batch is over."""
        self.status = self.client.batch(self.batch_id)
        rows = list(self._finished_since())
        fetched = self._fetch_all(rows)
        for row in rows:
            self.seen.add(row["execution_id"])
            if self.newest is None or row["finished_at"] > self.newest:
                self.newest = row["finished_at"]
            self._finished(row, fetched.get(row["execution_id"]))
        return bool(self.status["done"])

    def _dest(self, row: dict) -> Path:
        return outputs_root(self.batch_id) / PurePosixPath(row["batch_item"]).name

    def _fetch_all(self, rows: list[dict]) -> dict[str, str | None]:
        """The outputs of the executions that just finished, fetched on several connections
        at once (as uploads are): a batch answered from earlier runs (--reuse) finishes a
        page at a time, and one after the other 1,000 small fetches took over a minute.
        Returns each execution's outputs folder (None: nothing fetched)."""
        wanted = [row for row in rows if self.fetch_outputs and row["outputs"]]
        fork = getattr(self.client, "fork", None)
        if len(wanted) < 2 or fork is None:
            return {
                row["execution_id"]: str(self._dest(row))
                if self.client.download_outputs(row, self._dest(row))
                else None
                for row in wanted
            }
        local = threading.local()

        def one(row: dict) -> str | None:
            if not hasattr(local, "client"):
                local.client = fork()
            return (
                str(self._dest(row))
                if local.client.download_outputs(row, self._dest(row))
                else None
            )

        with ThreadPoolExecutor(min(UPLOAD_THREADS, len(wanted))) as pool:
            return dict(
                zip((row["execution_id"] for row in wanted), pool.map(one, wanted), strict=True)
            )

    def _finished(self, row: dict, outputs_dir: str | None = None) -> None:
        self.finished.append(
            {
                "execution_id": row["execution_id"],
                "input": row["batch_item"],
                "status": row["status"],
                "exit_code": row["exit_code"],
                "duration_s": row["duration_s"],
                "error": row["error"],
            }
        )
        if self.json_mode:
            print_json({**row, "outputs_dir": outputs_dir})

    def counts_text(self) -> str:
        counts = self.status.get("counts", {})
        failed = sum(n for s, n in counts.items() if s in TERMINAL_STATUSES and s != "succeeded")
        running = counts.get("running", 0) + counts.get("building", 0)
        reused = int(self.status.get("reused") or 0)
        # Reused ones (answered from earlier runs, nothing ran) are counted apart.
        head = f"{reused} reused · " if reused else ""
        return (
            f"{head}{counts.get('succeeded', 0) - reused} done · {failed} failed"
            f" · {running} running · {counts.get('queued', 0)} queued"
        )

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return len(self.finished) / elapsed if elapsed > 0 else 0.0


def follow(follower: Follower) -> None:
    """Poll until the batch is over, with a live progress bar on a terminal (plain lines
    every few seconds otherwise, none with --json)."""
    if follower.json_mode or not stderr_is_terminal():
        last_line = 0.0
        while not follower.poll():
            if not follower.json_mode and time.monotonic() - last_line >= 5:
                note(f"batch {follower.batch_id}: {follower.counts_text()}")
                last_line = time.monotonic()
            time.sleep(POLL_S)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rgrid.cli.output import err_console

    columns = (
        TextColumn(f"batch {follower.batch_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console(), transient=True) as bar:
        task = bar.add_task("batch", total=None, counts="", rate="")
        while True:
            over = follower.poll()
            bar.update(
                task,
                total=follower.status["total"],
                completed=follower.status["finished"],
                counts=follower.counts_text(),
                rate=f"{follower.rate():.1f}/s",
            )
            if over:
                return
            time.sleep(POLL_S)


def _last_log_line(client: Client, execution_id: str, fallback: str | None) -> str:
    """The last line the script wrote to stderr (where tracebacks and sys.exit messages go),
    else to stdout, else the error RGrid recorded."""
    last = {"stderr": "", "stdout": ""}
    offset = 0
    for _ in range(50):  # a bounded read: a failed script's log is rarely long
        page = client.logs(execution_id, offset)
        for stream, text in page["chunks"]:
            lines = [line for line in text.splitlines() if line.strip()]
            if stream in last and lines:
                last[stream] = lines[-1]
        offset = page["next_offset"]
        if page["complete"] or not page["chunks"]:
            break
    return (last["stderr"] or last["stdout"] or fallback or "")[:120]


def summarise(follower: Follower, interrupted: bool) -> int:
    """The summary (a table, or one JSON object); returns the exit status: 0 when every
    execution succeeded, 130 when stopped, else 1."""
    client = follower.client
    counts = follower.status.get("counts", {})
    failed = [row for row in follower.finished if row["status"] != "succeeded"]
    slowest = sorted(
        (row for row in follower.finished if row["duration_s"] is not None),
        key=lambda row: row["duration_s"],
        reverse=True,
    )[:3]
    root = outputs_root(follower.batch_id)
    outputs_dir = str(root) if root.is_dir() else None
    shown = [
        {**row, "last_line": _last_log_line(client, row["execution_id"], row["error"])}
        for row in failed[:SHOW_FAILED]
    ]
    if follower.json_mode:
        _print_summary_json(follower, slowest, shown, outputs_dir)
    else:
        _print_summary(follower, slowest, shown, len(failed), outputs_dir)
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if set(counts) <= {"succeeded"} else 1


def _print_summary_json(
    follower: Follower, slowest: list[dict], shown: list[dict], outputs_dir: str | None
) -> None:
    status = follower.status
    total = status.get("total") or 0
    reused = int(status.get("reused") or 0)
    print_json(
        {
            "batch_id": follower.batch_id,
            "summary": True,
            "total": status.get("total"),
            "counts": status.get("counts", {}),
            # Answered from earlier runs without running (--reuse), and the rest.
            "reused": reused,
            "ran": total - reused,
            "wall_s": round(time.monotonic() - follower.started, 3),
            "executions_per_s": round(follower.rate(), 3),
            "slowest": slowest,
            "failed": shown,
            "outputs_dir": outputs_dir,
        }
    )


def _print_summary(
    follower: Follower,
    slowest: list[dict],
    shown: list[dict],
    failed: int,
    outputs_dir: str | None,
) -> None:
    """The summary on stderr: the counts, the slowest, the failed ones' last log lines."""
    status = follower.status
    counts = status.get("counts", {})
    total = status.get("total") or 0
    reused = int(status.get("reused") or 0)
    elapsed = time.monotonic() - follower.started
    note(
        f"batch {follower.batch_id}: {status.get('total')} execution(s) in {elapsed:.1f}s"
        f" ({follower.rate():.1f}/s)"
        + (f": {reused} reused · {total - reused} ran" if reused else "")
    )
    for line in table_lines(("STATUS", "COUNT"), sorted((s, str(n)) for s, n in counts.items())):
        click.echo(line, err=True)
    if slowest:
        note("slowest: " + ", ".join(f"{row['input']} {row['duration_s']:.2f}s" for row in slowest))
    if shown:
        for line in table_lines(
            ("FAILED", "INPUT", "STATUS", "EXIT", "LAST LOG LINE"),
            (
                (
                    row["execution_id"],
                    row["input"],
                    row["status"],
                    "" if row["exit_code"] is None else str(row["exit_code"]),
                    row["last_line"],
                )
                for row in shown
            ),
        ):
            click.echo(line, err=True)
        if failed > len(shown):
            note(f"... and {failed - len(shown)} more failed")
        note(f"run them again: rgrid batch retry {follower.batch_id}")
    if outputs_dir:
        note(f"outputs: {outputs_dir}/<input name>/")


#: How long a stopped batch is followed while its executions end.
CANCEL_WAIT_S = 60.0


def _ask_to_cancel(batch_id: str) -> bool:
    """Ctrl-C: at a terminal, ask; otherwise (nobody to ask) cancel."""
    if not sys.stdin.isatty():
        return True
    try:
        return click.confirm(f"\ncancel batch {batch_id}?", default=True, err=True)
    except (KeyboardInterrupt, click.Abort, EOFError):
        return True


def follow_and_summarise(
    client: Client, batch_id: str, json_mode: bool, only: set[str] | None = None
) -> int:
    from rgrid.cli.signals import Stopped, stop_signals

    follower = Follower(client, batch_id, json_mode, only=only)
    try:
        with stop_signals():
            follow(follower)
    except (KeyboardInterrupt, Stopped) as exc:
        if isinstance(exc, KeyboardInterrupt) and not _ask_to_cancel(batch_id):
            click.echo(
                f"rgrid: batch {batch_id} goes on; `rgrid batch status {batch_id}` shows it",
                err=True,
            )
            return EXIT_INTERRUPTED
        result = client.cancel_batch(batch_id)
        click.echo(
            f"rgrid: cancelling batch {batch_id} ({result.get('stopped', 0)} unfinished)",
            err=True,
        )
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not follower.poll() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return summarise(follower, interrupted=True)
    return summarise(follower, interrupted=False)
