import os
from dataclasses import replace

import pytest

from rgrid.core.cache_keys import input_hash
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput
from rgrid.store.inputs import check_manifest, collect, hash_files, input_name

SETTINGS = Settings()
DIGEST = "a" * 64


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("a\n")
    (tmp_path / "data" / "sub" / "b.csv").write_text("bb\n")
    (tmp_path / "top.txt").write_text("top\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _names(files):
    return [f.name for f in files]


def test_files_and_folders_keep_their_relative_names(work):
    assert _names(collect(["top.txt", "data/"], work, SETTINGS)) == [
        "top.txt",
        "data/a.csv",
        "data/sub/b.csv",
    ]
    assert _names(collect(["./data/sub/../a.csv"], work, SETTINGS)) == ["data/a.csv"]
    assert input_name("data/") == "data" and input_name("./x/../y.csv") == "y.csv"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("missing.csv", "input not found"),
        ("../outside.csv", "escapes the working folder"),
        ("/etc/passwd", "must be relative"),
        (".", "working folder itself"),
    ],
)
def test_bad_paths_are_refused(work, arg, message):
    with pytest.raises(BadInput, match=message):
        collect([arg], work, SETTINGS)


def test_links_pointing_outside_are_refused(work, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, work / "link.txt")
    with pytest.raises(BadInput, match="link pointing outside"):
        collect(["link.txt"], work, SETTINGS)
    os.symlink(outside, work / "data" / "inner-link.txt")
    with pytest.raises(BadInput, match="link pointing outside"):
        collect(["data"], work, SETTINGS)


def test_a_link_inside_the_folder_is_fine(work):
    os.symlink(work / "top.txt", work / "alias.txt")
    assert _names(collect(["alias.txt"], work, SETTINGS)) == ["alias.txt"]


def test_two_inputs_with_one_name_are_refused(work):
    with pytest.raises(BadInput, match="same name data/a.csv"):
        collect(["data", "data/a.csv"], work, SETTINGS)


def test_outputs_is_reserved(work):
    (work / "outputs").mkdir()
    (work / "outputs" / "x").write_text("x")
    with pytest.raises(BadInput, match="outputs"):
        collect(["outputs"], work, SETTINGS)


def test_empty_folder_is_refused(work):
    (work / "empty").mkdir()
    with pytest.raises(BadInput, match="empty"):
        collect(["empty"], work, SETTINGS)


def test_size_and_count_limits(work):
    with pytest.raises(BadInput, match="per-file limit"):
        collect(["data"], work, replace(SETTINGS, max_input_file_bytes=2))
    with pytest.raises(BadInput, match="inputs total"):
        collect(["data"], work, replace(SETTINGS, max_input_total_bytes=4))
    with pytest.raises(BadInput, match="over the limit of 1"):
        collect(["data"], work, replace(SETTINGS, max_input_files=1))


def test_hashes_are_sha256_of_the_bytes(work):
    files = collect(["data/a.csv"], work, SETTINGS)
    seen = []
    hash_files(files, seen.append)
    assert files[0].sha256 == "87428fc522803d31065e7bce3cf03fe475096631e5e07bbd7a0fde60c4cf25c7"
    assert sum(seen) == 2


def test_input_hash_is_order_free_and_renames_change_it():
    a = [{"path": "x.csv", "sha256": "1" * 64}, {"path": "y.csv", "sha256": "2" * 64}]
    assert input_hash(a) == input_hash(list(reversed(a)))
    renamed = [{"path": "z.csv", "sha256": "1" * 64}, {"path": "y.csv", "sha256": "2" * 64}]
    assert input_hash(renamed) != input_hash(a)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", "bad input name"),
        ("/abs", "bad input name"),
        ("outputs/x", "bad input name"),
        ("a/./b", "bad input name"),
        ("", "needs a path"),
    ],
)
def test_server_refuses_unsafe_manifest_names(name, message):
    with pytest.raises(BadInput, match=message):
        check_manifest([{"path": name, "sha256": DIGEST, "size": 1}], SETTINGS)


def test_server_refuses_a_file_that_is_also_a_folder_and_bad_digests():
    with pytest.raises(BadInput, match="both a file and the folder"):
        check_manifest(
            [
                {"path": "d", "sha256": DIGEST, "size": 1},
                {"path": "d/x", "sha256": DIGEST, "size": 1},
            ],
            SETTINGS,
        )
    with pytest.raises(BadInput, match="not a sha256"):
        check_manifest([{"path": "x", "sha256": "nope", "size": 1}], SETTINGS)
    with pytest.raises(BadInput, match="over the"):
        check_manifest([{"path": "x", "sha256": DIGEST, "size": 10**13}], SETTINGS)
