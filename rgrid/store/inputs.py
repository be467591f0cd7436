"""The CLI's side of input files: which paths become which names in /work, and their digests.

Names are the paths as given, relative to the working folder: ``rgrid run p.py data/a.csv``
puts the file at ``/work/data/a.csv`` and passes ``data/a.csv`` to the script. Anything that
would reach outside the working folder is refused before a byte is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rgrid.core.config import Settings
from rgrid.core.errors import BadInput
from rgrid.core.hashing import sha256_file

#: The folder in /work whose files come back as outputs: no input may be placed there.
OUTPUTS_DIR = "outputs"


@dataclass
class InputFile:
    name: str  # posix path relative to /work
    path: Path
    size: int
    sha256: str = ""

    def manifest_entry(self) -> dict:
        return {"path": self.name, "sha256": self.sha256, "size": self.size}


def input_name(arg: str) -> str:
    """The name an input argument has in /work, which is also what the script is passed."""
    return PurePosixPath(*Path(os.path.normpath(arg)).parts).as_posix()


def _relative_name(arg: str) -> str:
    if os.path.isabs(arg):
        raise BadInput(f"input path must be relative to the working folder: {arg}")
    normal = os.path.normpath(arg)
    if normal == ".." or normal.startswith("../"):
        raise BadInput(f"input path escapes the working folder: {arg}")
    if normal == ".":
        raise BadInput("the working folder itself cannot be an input: name a file or subfolder")
    return input_name(arg)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _files_under(folder: Path, name: str) -> list[tuple[str, Path]]:
    found = []
    for current, dirs, files in os.walk(folder):  # links to folders are not followed
        dirs.sort()
        for file_name in sorted(files):
            path = Path(current) / file_name
            relative = path.relative_to(folder).as_posix()
            found.append((f"{name}/{relative}", path))
    if not found:
        raise BadInput(f"input folder is empty: {name}")
    return found


def collect(args: list[str], cwd: Path, settings: Settings) -> list[InputFile]:
    """Expand and check the input arguments; raises BadInput with one line for the first
    problem: a missing path, an escape, a link outside, two inputs with one name, a limit."""
    root = cwd.resolve()
    seen: dict[str, str] = {}
    files: list[InputFile] = []
    for arg in args:
        name = _relative_name(arg)
        path = cwd / name
        if not path.exists() and not path.is_symlink():
            raise BadInput(
                f"input not found: {arg} (arguments for the script go after --:"
                f" rgrid run SCRIPT -- {arg})"
            )
        if not _inside(path, root):
            raise BadInput(f"input {arg} is a link pointing outside the working folder")
        pairs = _files_under(path, name) if path.is_dir() else [(name, path)]
        for file_name, file_path in pairs:
            if file_path.is_symlink() and not _inside(file_path, root):
                raise BadInput(f"input {file_name} is a link pointing outside the working folder")
            if not file_path.is_file():
                raise BadInput(f"input {file_name} is not a regular file")
            if file_name == OUTPUTS_DIR or file_name.startswith(OUTPUTS_DIR + "/"):
                raise BadInput(f"input {file_name}: 'outputs/' is where the script's outputs go")
            if file_name in seen:
                raise BadInput(
                    f"two inputs map to the same name {file_name}: {seen[file_name]} and {arg}"
                )
            seen[file_name] = arg
            size = file_path.stat().st_size
            if size > settings.max_input_file_bytes:
                raise BadInput(
                    f"input {file_name} is {size} bytes, over the per-file limit of "
                    f"{settings.max_input_file_bytes}"
                )
            files.append(InputFile(name=file_name, path=file_path, size=size))
    if len(files) > settings.max_input_files:
        raise BadInput(f"{len(files)} input files, over the limit of {settings.max_input_files}")
    total = sum(f.size for f in files)
    if total > settings.max_input_total_bytes:
        raise BadInput(
            f"inputs total {total} bytes, over the limit of {settings.max_input_total_bytes}"
        )
    return files


def hash_files(files: list[InputFile], advance: Callable[[int], None] = lambda n: None) -> None:
    """Fill in each file's sha256, reading in chunks (constant memory, any size)."""
    for item in files:
        item.sha256, _ = sha256_file(item.path, lambda chunk: advance(len(chunk)))


#: The longest input path accepted (PATH_MAX on Linux is 4096; a tar header needs less).
MAX_NAME_CHARS = 1024


def check_manifest(manifest: object, settings: Settings) -> list[dict]:
    """The server's check of a manifest it was sent: safe, unique names and real digests."""
    from rgrid.store.blobs import check_digest, check_size

    if not isinstance(manifest, list):
        raise BadInput("'inputs' must be a list of {path, sha256, size}")
    if len(manifest) > settings.max_input_files:
        raise BadInput(f"{len(manifest)} input files, over the limit of {settings.max_input_files}")
    names: set[str] = set()
    clean = []
    for item in manifest:
        if not isinstance(item, dict):
            raise BadInput("'inputs' must be a list of {path, sha256, size}")
        name = item.get("path")
        if not isinstance(name, str) or not name:
            raise BadInput("every input needs a path")
        # The raw segments, not PurePosixPath's: it quietly folds "a/./b" and "a//b".
        parts = name.split("/")
        bad_part = any(part in ("", ".", "..") for part in parts)
        unsafe = "\\" in name or any(ord(c) < 32 for c in name) or len(name) > MAX_NAME_CHARS
        if bad_part or unsafe or parts[0] == OUTPUTS_DIR:
            raise BadInput(f"bad input name {name!r}")
        if name in names:
            raise BadInput(f"two inputs map to the same name {name}")
        names.add(name)
        clean.append(
            {
                "path": name,
                "sha256": check_digest(item.get("sha256")),
                "size": check_size(settings, item.get("size")),
            }
        )
    for name in names:
        parents = PurePosixPath(name).parents
        clash = next((str(p) for p in parents if str(p) in names), None)
        if clash:
            raise BadInput(f"input {clash} is both a file and the folder of {name}")
    if sum(i["size"] for i in clean) > settings.max_input_total_bytes:
        raise BadInput(f"inputs total over the limit of {settings.max_input_total_bytes} bytes")
    return clean
