"""gunicorn settings for the API (``gunicorn --config python:rgrid.api.gunicorn_conf``): the
hooks prometheus-client's multiprocess mode needs, so that /metrics adds up every worker
process's numbers whichever process answers (see rgrid/core/metrics.py)."""

from __future__ import annotations

from rgrid.core import metrics


def on_starting(_server) -> None:
    """Before any worker process starts: forget the files of an earlier start."""
    folder = metrics.multiprocess_dir()
    if folder is not None:
        metrics.fresh_multiprocess_dir(folder)


def child_exit(_server, worker) -> None:
    metrics.process_exited(worker.pid)
