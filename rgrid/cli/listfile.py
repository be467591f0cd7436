"""Line-per-entry files the user names on the command line (``--batch-file``,
``--env-file``): read the same way, with the same one-line errors."""

from __future__ import annotations

from pathlib import Path

from rgrid.core.errors import BadInput


def entries(path: Path, option: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of each line that is neither blank nor a ``#`` comment.
    ``option`` names the flag in the error when the file cannot be read as UTF-8 text."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BadInput(f"cannot read {option} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"{option} {path} is not UTF-8 text") from exc
    found = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            found.append((number, line))
    return found
