"""Which files a batch is made of: `--batch GLOB|FOLDER|FILE` and `--batch-file`, checked
before anything is sent."""

from __future__ import annotations

import os

import pytest

from rgrid.cli.batch import expand
from rgrid.cli.batch_follow import outputs_root
from rgrid.core.errors import BadInput, RGridError


@pytest.fixture
def tree(tmp_path):
    for name in ("data/a.csv", "data/b.csv", "data/sub/c.csv", "other/a.csv", "x.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_globs_folders_files_and_lists(tree):
    assert expand(("data/*.csv",), None, tree) == ["data/a.csv", "data/b.csv"]
    assert expand(("data/**/*.csv",), None, tree) == ["data/a.csv", "data/b.csv", "data/sub/c.csv"]
    assert expand(("data",), None, tree) == ["data/a.csv", "data/b.csv", "data/sub/c.csv"]
    assert expand(("x.txt",), None, tree) == ["x.txt"]
    (tree / "list.txt").write_text("# inputs\ndata/b.csv\n\n./x.txt\n")
    assert expand((), tree / "list.txt", tree) == ["data/b.csv", "x.txt"]


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (("nothing/*.csv",), "matches no files"),
        (("data/*",), "matches a folder: data/sub"),
        (("empty",), "has no files"),
        (("missing.csv",), "no such file or folder"),
        (("data/*.csv", "other/*.csv"), "two batch inputs are named a.csv"),
        (("x.txt", "./x.txt"), "given twice"),
        (("../elsewhere",), "no such file or folder"),
        ((), "the batch has no inputs"),
    ],
)
def test_bad_batches_are_refused_with_one_line(tree, patterns, message):
    with pytest.raises(BadInput, match=message):
        expand(patterns, None, tree)


def test_links_outside_and_the_outputs_folder_are_refused(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("no")
    os.symlink(outside, tree / "link.txt")
    with pytest.raises(BadInput, match="link pointing outside"):
        expand(("link.txt",), None, tree)
    (tree / "outputs").mkdir()
    (tree / "outputs" / "old.txt").write_text("old")
    with pytest.raises(BadInput, match="'outputs/' is where"):
        expand(("outputs",), None, tree)
    (tree / "list.txt").write_text("data/a.csv\nnope.csv\n")
    with pytest.raises(BadInput, match="list.txt:2: not a file: nope.csv"):
        expand((), tree / "list.txt", tree)


@pytest.mark.parametrize("batch_id", ["7302747478", "a1b2c3d4e5", "ffffffffff"])
def test_any_hex_batch_id_names_its_outputs_folder(batch_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert outputs_root(batch_id) == tmp_path / "rgrid-outputs" / batch_id


@pytest.mark.parametrize("batch_id", ["", "../etc", "ABC", "a/b", "0" * 17, "12 34"])
def test_a_batch_id_that_is_no_safe_folder_name_is_refused(batch_id):
    with pytest.raises(RGridError, match="odd batch id"):
        outputs_root(batch_id)
