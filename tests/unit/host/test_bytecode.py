"""Sharing compiled bytecode between an account's environment folders (rgrid/host/bytecode.py),
on real files in a temporary folder: only beside the very same source file, only from the
account's own compiled folders, and never a wheel's own bytecode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rgrid.host import bytecode

MARKER = ".compiled"


def _folder(root: Path, name: str, account: int, dists: list[str]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for dist in dists:
        (folder / f"{dist}-1.0.dist-info").mkdir()
    bytecode.mark_account(folder, account)
    return folder


def _compile(folder: Path, relative: str) -> Path:
    """What the compile container leaves: ``__pycache__/<module>.cpython-311.pyc``."""
    source = folder / relative
    cache = source.parent / "__pycache__"
    cache.mkdir(exist_ok=True)
    pyc = cache / f"{source.stem}.cpython-311.pyc"
    pyc.write_bytes(b"compiled " + source.read_bytes())
    return pyc


def test_bytecode_is_linked_only_beside_the_same_source_file(tmp_path):
    root = tmp_path / "environments"
    giver = _folder(root, "old", 7, ["pkg"])
    (giver / "pkg").mkdir()
    (giver / "pkg" / "same.py").write_text("A = 1\n")
    (giver / "pkg" / "other.py").write_text("B = 1\n")
    (giver / MARKER).touch()
    pycs = [_compile(giver, "pkg/same.py"), _compile(giver, "pkg/other.py")]

    taker = _folder(root, ".tmp-new", 7, ["pkg"])
    (taker / "pkg").mkdir()
    os.link(giver / "pkg" / "same.py", taker / "pkg" / "same.py")  # as uv links from its cache
    shutil.copy2(giver / "pkg" / "other.py", taker / "pkg" / "other.py")  # equal, not the same

    givers = bytecode.givers(root, taker, 7, MARKER)
    assert givers == [giver]
    assert bytecode.share(taker, givers) == 1
    linked = taker / "pkg" / "__pycache__" / "same.cpython-311.pyc"
    assert linked.read_bytes() == pycs[0].read_bytes()
    assert os.stat(linked).st_ino == os.stat(pycs[0]).st_ino
    assert not (taker / "pkg" / "__pycache__" / "other.cpython-311.pyc").exists()


def test_only_the_accounts_own_folders_give_the_compiled_first(tmp_path):
    root = tmp_path / "environments"
    mine = _folder(root, "mine", 7, ["pkg", "dep"])
    theirs = _folder(root, "theirs", 8, ["pkg", "dep"])
    compiling = _folder(root, "a-compiling", 7, ["pkg", "dep"])
    fewer = _folder(root, "fewer", 7, ["dep"])
    unrelated = _folder(root, "unrelated", 7, ["else"])
    _folder(root, "later", 7, ["dep"])
    for folder in (mine, theirs, fewer, unrelated):
        (folder / MARKER).touch()
    taker = _folder(root, ".tmp-new", 7, ["pkg", "dep"])
    assert bytecode.givers(root, taker, 7, MARKER) == [mine, compiling, fewer]
    assert bytecode.givers(root, taker, 9, MARKER) == []


def test_a_folder_still_compiling_gives_its_whole_pyc_files_only(tmp_path):
    """py_compile writes ``<name>.pyc.<id>`` and renames it: a name not ending ``.pyc`` is
    one being written, never linked."""
    root = tmp_path / "environments"
    giver = _folder(root, "compiling", 7, ["pkg"])
    (giver / "pkg").mkdir()
    for name in ("done", "writing"):
        (giver / "pkg" / f"{name}.py").write_text("A = 1\n")
    _compile(giver, "pkg/done.py")
    half = giver / "pkg" / "__pycache__" / "writing.cpython-311.pyc.140001"
    half.write_bytes(b"half")
    taker = _folder(root, ".tmp-new", 7, ["pkg"])
    (taker / "pkg").mkdir()
    for name in ("done", "writing"):
        os.link(giver / "pkg" / f"{name}.py", taker / "pkg" / f"{name}.py")
    assert bytecode.share(taker, bytecode.givers(root, taker, 7, MARKER)) == 1
    assert sorted(p.name for p in (taker / "pkg" / "__pycache__").iterdir()) == [
        "done.cpython-311.pyc"
    ]


def test_a_wheels_own_bytecode_is_dropped(tmp_path):
    folder = tmp_path / "new"
    (folder / "pkg" / "__pycache__").mkdir(parents=True)
    (folder / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"crafted")
    (folder / "pkg" / "mod.py").write_text("A = 1\n")
    bytecode.drop_shipped(folder)
    assert not (folder / "pkg" / "__pycache__").exists()
    assert (folder / "pkg" / "mod.py").read_text() == "A = 1\n"
