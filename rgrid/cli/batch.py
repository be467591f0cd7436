"""`rgrid run SCRIPT --batch ...` and `rgrid batch status|cancel|outputs|retry`.

A batch is sent in pages: the inputs are expanded to a list of names first (checked before
anything is sent), then hashed, uploaded (each distinct content once, as for any run) and
added to the batch a page at a time, so the CLI holds one page of files, never the whole
batch. Nothing runs before the batch is started, in one request after the last page.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import click

from rgrid.cli import cli, listfile
from rgrid.cli.batch_follow import UPLOAD_THREADS, follow_and_summarise, outputs_root
from rgrid.cli.output import (
    note,
    print_json,
)
from rgrid.client.protocol import Client, make_client
from rgrid.core.config import Settings, get_settings
from rgrid.core.errors import BadInput, RGridError
from rgrid.core.spec import RunSpec
from rgrid.store.inputs import OUTPUTS_DIR, InputFile, hash_files, input_name
from rgrid.store.inputs import collect as collect_inputs

#: Inputs hashed, uploaded and added per request (the API's most per request).
PAGE_SIZE = 1000
_GLOB_CHARS = set("*?[")


def _names_under(folder: Path) -> Iterator[Path]:
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(current) / name


def _relative(path: Path, cwd: Path, given: str) -> str:
    """The input's name in /work: its path relative to the working folder, which it must be
    inside (as for any input)."""
    resolved = (cwd / path).absolute()
    try:
        relative = os.path.relpath(resolved, cwd)
    except ValueError:
        relative = str(resolved)
    if os.path.isabs(relative) or relative.startswith(".."):
        raise BadInput(f"batch input {given} is outside the working folder")
    if not resolved.resolve().is_relative_to(cwd.resolve()):
        raise BadInput(f"batch input {given} is a link pointing outside the working folder")
    name = input_name(relative)
    if name == OUTPUTS_DIR or name.startswith(OUTPUTS_DIR + "/"):
        raise BadInput(f"batch input {name}: 'outputs/' is where the script's outputs go")
    return name


def expand(patterns: tuple[str, ...], batch_file: Path | None, cwd: Path) -> list[str]:
    """Every batch input's name, in order, checked: a pattern matching nothing or a folder,
    a missing file, a name given twice or two inputs with one basename (their outputs
    folders would collide) are refused here, before anything is sent."""
    paths: list[tuple[Path, str]] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, root_dir=cwd, recursive=True))
            if not matches:
                raise BadInput(f"--batch {pattern!r} matches no files")
            for match in matches:
                if (cwd / match).is_dir():
                    raise BadInput(
                        f"--batch {pattern!r} matches a folder: {match} (batch inputs are"
                        " files; give the folder itself to take every file in it)"
                    )
                paths.append((Path(match), match))
        elif (cwd / pattern).is_dir():
            found = [(path.relative_to(cwd), pattern) for path in _names_under(cwd / pattern)]
            if not found:
                raise BadInput(f"--batch folder {pattern} has no files")
            paths += found
        elif (cwd / pattern).is_file():
            paths.append((Path(pattern), pattern))
        else:
            raise BadInput(f"--batch {pattern}: no such file or folder")
    if batch_file is not None:
        for number, line in listfile.entries(batch_file, "--batch-file"):
            if not (cwd / line).is_file():
                raise BadInput(f"{batch_file}:{number}: not a file: {line}")
            paths.append((Path(line), line))
    if not paths:
        raise BadInput("the batch has no inputs")
    names: list[str] = []
    seen: dict[str, str] = {}
    by_basename: dict[str, str] = {}
    for path, given in paths:
        name = _relative(path, cwd, given)
        if name in seen:
            raise BadInput(f"batch input {name} is given twice")
        seen[name] = given
        base = PurePosixPath(name).name
        if base in by_basename:
            raise BadInput(
                f"two batch inputs are named {base}: {by_basename[base]} and {name}"
                " (their outputs folders would collide)"
            )
        by_basename[base] = name
        names.append(name)
    return names


def _upload(client: Client, items: list[InputFile]) -> None:
    fork = getattr(client, "fork", None)
    if len(items) < 2 or fork is None:
        for item in items:
            client.upload(item, lambda n: None)
        return
    local = threading.local()

    def one(item: InputFile) -> None:
        if not hasattr(local, "client"):
            local.client = fork()
        local.client.upload(item, lambda n: None)

    with ThreadPoolExecutor(min(UPLOAD_THREADS, len(items))) as pool:
        list(pool.map(one, items))


def _send_page(
    client: Client, batch_id: str, names: list[str], cwd: Path, settings: Settings
) -> tuple[int, int, int]:
    """Hash, upload what the account lacks and add one page; returns (files, bytes) sent and
    how many of the page were answered from earlier runs at once (--reuse)."""
    files = []
    for name in names:
        path = cwd / name
        size = path.stat().st_size
        if size > settings.max_input_file_bytes:
            raise BadInput(
                f"batch input {name} is {size} bytes, over the per-file limit of"
                f" {settings.max_input_file_bytes}"
            )
        files.append(InputFile(name=name, path=path, size=size))
    hash_files(files)
    missing = set(client.missing([item.sha256 for item in files]))
    to_send = list({item.sha256: item for item in files if item.sha256 in missing}.values())
    _upload(client, to_send)
    added = client.add_batch_inputs(batch_id, [item.manifest_entry() for item in files])
    return len(to_send), sum(item.size for item in to_send), int(added.get("reused") or 0)


def submit_batch(
    client: Client,
    settings: Settings,
    spec: RunSpec,
    *,
    names: list[str],
    shared: list[InputFile],
    json_mode: bool,
    sources: list[InputFile] = (),
    parallel: int | None = None,
) -> dict:
    """Create the batch, add its inputs page by page, start it. A failure before the start
    cancels the batch, so nothing of it ever runs."""
    from rgrid.cli.uploads import send_inputs

    if shared or sources:
        send_inputs(client, shared, json_mode, sources)
    cwd = Path.cwd()
    spec = dataclasses.replace(
        spec,
        inputs=[item.manifest_entry() for item in shared],
        sources=[item.manifest_entry() for item in sources] or None,
    )
    batch = client.create_batch(spec, parallel=parallel, size=len(names))
    batch_id = batch["batch_id"]
    try:
        sent_files = sent_bytes = reused = 0
        for start in range(0, len(names), PAGE_SIZE):
            files, size, answered = _send_page(
                client, batch_id, names[start : start + PAGE_SIZE], cwd, settings
            )
            sent_files, sent_bytes = sent_files + files, sent_bytes + size
            reused += answered
        if not json_mode:
            note(
                f"batch {batch_id}: {len(names)} input(s), {sent_files} uploaded"
                f" ({sent_bytes} bytes), {len(names) - sent_files} already stored"
                + (f"; {reused} answered from earlier runs (--reuse)" if reused else "")
            )
        return client.start_batch(batch_id)
    except BaseException:
        try:
            client.cancel_batch(batch_id)
        except RGridError:
            pass
        raise


def run_batch(
    spec: RunSpec,
    *,
    patterns: tuple[str, ...],
    batch_file: Path | None,
    parallel: int | None,
    shared_inputs: tuple[str, ...],
    json_mode: bool,
    detach: bool,
    sources: list[InputFile] = (),
) -> int:
    """``spec``: what every execution shares, its arguments after the shared inputs' names;
    ``sources``: the script's shipped modules, sent once for the whole batch."""
    settings = get_settings()
    cwd = Path.cwd()
    names = expand(patterns, batch_file, cwd)
    shared = collect_inputs(list(shared_inputs), cwd, settings)
    clash = {item.name for item in shared} & set(names)
    if clash:
        raise BadInput(f"{sorted(clash)[0]} is both a shared input and a batch input")
    if spec.script_name in names:
        raise BadInput(f"the script {spec.script_name} cannot also be one of its batch's inputs")
    client = make_client(settings)
    spec = dataclasses.replace(spec, args=[*(input_name(arg) for arg in shared_inputs), *spec.args])
    batch = submit_batch(
        client,
        settings,
        spec,
        names=names,
        shared=shared,
        json_mode=json_mode,
        sources=list(sources),
        parallel=parallel,
    )
    batch_id = batch["batch_id"]
    if detach:
        print_json(batch) if json_mode else click.echo(batch_id)
        return 0
    if not json_mode:
        limit = f", at most {parallel} at once" if parallel else ""
        note(f"batch {batch_id}: {batch['total']} execution(s){limit}")
    return follow_and_summarise(client, batch_id, json_mode)


def _client() -> Client:
    return make_client(get_settings())


@cli.group()
def batch() -> None:
    """Follow, cancel, fetch or retry a batch (`rgrid run SCRIPT --batch ...`)."""


@batch.command(name="status")
@click.argument("batch_id")
@click.option("--json", "json_mode", is_flag=True)
def batch_status(batch_id: str, json_mode: bool):
    """A batch's executions counted per status."""
    status = _client().batch(batch_id)
    if json_mode:
        print_json(status)
        return
    for key in ("batch_id", "script_name", "parallel", "total", "finished", "created_at"):
        if status.get(key) is not None:
            click.echo(f"{key:14} {status[key]}")
    for state, count in sorted(status["counts"].items()):
        click.echo(f"{state:14} {count}")
    if status["cancelled"]:
        click.echo(f"{'cancelled_at':14} {status['cancelled_at']}")
    if not status["done"]:
        note(f"batch {status['batch_id']} is still running")


@batch.command(name="cancel")
@click.argument("batch_id")
def batch_cancel(batch_id: str):
    """Cancel every queued and running execution of a batch."""
    result = _client().cancel_batch(batch_id)
    click.echo(f"cancelled batch {result['batch_id']}: {result['stopped']} execution(s) stopped")


@batch.command(name="outputs")
@click.argument("batch_id")
def batch_outputs(batch_id: str):
    """Download every output of a batch to ./rgrid-outputs/<batch-id>/<input name>/."""
    client = _client()
    status = client.batch(batch_id)
    batch_id = status["batch_id"]
    count = 0
    after = ""
    while True:
        rows = client.batch_executions(batch_id, after=after, limit=500)
        for row in rows:
            if row["outputs"]:
                dest = outputs_root(batch_id) / PurePosixPath(row["batch_item"]).name
                count += len(client.download_outputs(row, dest))
        if len(rows) < 500:
            break
        after = rows[-1]["execution_id"]
    if count:
        click.echo(str(outputs_root(batch_id)))
    else:
        note("no outputs")
    if not status["done"]:
        note(f"batch {batch_id} is still running: only finished executions' outputs are here")


@batch.command(name="retry")
@click.argument("batch_id")
@click.option("--json", "json_mode", is_flag=True)
@click.option("-d", "--detach", is_flag=True, help="Retry and return at once.")
def batch_retry(batch_id: str, json_mode: bool, detach: bool):
    """Run a batch's failed executions again (successes are not run again), and follow."""
    client = _client()
    result = client.retry_batch(batch_id)
    batch_id = result["batch_id"]
    if not result["retried"]:
        note(f"batch {batch_id}: nothing failed, nothing to retry")
        return
    if not json_mode:
        note(f"batch {batch_id}: running {len(result['retried'])} failed execution(s) again")
    if detach:
        return
    raise SystemExit(
        follow_and_summarise(client, batch_id, json_mode, only=set(result["new_executions"]))
    )


def batches_table(rows: list[dict]) -> list[dict]:
    """Batches as rows of `rgrid list`: one each, its counts in the status column."""
    listed = []
    for row in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(row["counts"].items()))
        listed.append(
            {
                "execution_id": f"{row['batch_id']} (batch)",
                "status": counts or "empty",
                "exit_code": None,
                "script_name": row["script_name"],
                "script_cache_hit": None,
                "duration_s": None,
                "created_at": row["created_at"],
                "batch": row,
            }
        )
    return listed
