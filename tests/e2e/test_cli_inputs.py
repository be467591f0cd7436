"""Input and output files through the real CLI, against the running stack and embedded."""

import json
import os

import pytest

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json

PROCESS = """\
import os, sys
total = 0
for name in sys.argv[1:]:
    paths = [os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs] if os.path.isdir(name) \\
        else [name]
    for path in sorted(paths):
        total += len(open(path, 'rb').read())
print('files', sys.argv[1:], 'bytes', total)
os.makedirs('outputs/report', exist_ok=True)
open('outputs/report/total.txt', 'w').write(str(total))
"""


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "process.py").write_text(PROCESS)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "data" / "b.csv").write_text("x,y\n3,4\n")
    return tmp_path


def test_inputs_upload_once_and_outputs_come_back(stack_env, workdir):
    args = ("run", "process.py", "data/a.csv", "data/b.csv")
    first, result = run_json(*args, env=stack_env, cwd=workdir)
    assert first["status"] == "succeeded", result.stderr
    assert "files ['data/a.csv', 'data/b.csv'] bytes 16" in result.stderr
    assert first["bytes_uploaded"] == 16 and first["files_uploaded"] == 2
    assert first["input_cache_hit"] is False
    assert (workdir / first["outputs_dir"] / "report" / "total.txt").read_text() == "16"

    second, _ = run_json(*args, env=stack_env, cwd=workdir)
    assert second["bytes_uploaded"] == 0 and second["input_cache_hit"] is True
    assert second["input_hash"] == first["input_hash"]

    human = run_cli(*args, env=stack_env, cwd=workdir)
    assert "2 file(s), 0 uploaded (0 B), 2 already stored" in human.stderr
    assert "uploaded 0 B (0 of 2 files)" in human.stderr

    again = run_cli("outputs", second["execution_id"], "-o", "fetched", env=stack_env, cwd=workdir)
    assert again.returncode == 0
    assert (workdir / "fetched" / "report" / "total.txt").read_text() == "16"


def test_a_folder_of_a_hundred_files_uploads_only_the_changed_one(stack_env, workdir):
    folder = workdir / "many"
    folder.mkdir()
    for i in range(100):
        (folder / f"part-{i:03}.txt").write_text(f"row {i} of a hundred\n")
    first, result = run_json("run", "process.py", "many/", env=stack_env, cwd=workdir)
    assert first["status"] == "succeeded", result.stderr
    assert first["files_uploaded"] == 100 and len(first["inputs"]) == 100
    assert {item["path"] for item in first["inputs"]} == {
        f"many/part-{i:03}.txt" for i in range(100)
    }

    (folder / "part-042.txt").write_text("changed!\n")
    second, _ = run_json("run", "process.py", "many/", env=stack_env, cwd=workdir)
    assert second["files_uploaded"] == 1 and second["bytes_uploaded"] == len("changed!\n")
    assert second["input_cache_hit"] is False and second["input_hash"] != first["input_hash"]

    os.rename(folder, workdir / "renamed")  # same content, new names: new manifest, no upload
    third, _ = run_json("run", "process.py", "renamed", env=stack_env, cwd=workdir)
    assert third["bytes_uploaded"] == 0 and third["input_hash"] != second["input_hash"]


def test_bad_inputs_are_one_line_and_store_nothing(stack_env, workdir, tmp_path_factory):
    before = len(
        json.loads(run_cli("list", "--json", "--limit", "500", env=stack_env, cwd=workdir).stdout)
    )
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("not yours")
    os.symlink(outside, workdir / "link.txt")
    cases = [
        (("missing.csv",), "input not found: missing.csv"),
        (("../escape.csv",), "escapes the working folder"),
        ((str(workdir / "data" / "a.csv"),), "must be relative"),
        (("link.txt",), "link pointing outside"),
        (("data", "data/a.csv"), "same name data/a.csv"),
    ]
    for inputs, message in cases:
        assert_one_line_error(
            run_cli("run", "process.py", *inputs, env=stack_env, cwd=workdir), message
        )
    limited = {**stack_env, "RGRID_MAX_INPUT_FILE_BYTES": "4"}
    assert_one_line_error(
        run_cli("run", "process.py", "data/a.csv", env=limited, cwd=workdir),
        "over the per-file limit",
    )
    after = len(
        json.loads(run_cli("list", "--json", "--limit", "500", env=stack_env, cwd=workdir).stdout)
    )
    assert after == before


def test_another_account_uploads_its_own_copy_and_sees_nothing_of_ours(stack_env, workdir):
    mine, _ = run_json("run", "process.py", "data/a.csv", env=stack_env, cwd=workdir)
    created = run_cli(
        "admin",
        "create-account",
        f"other-{mine['execution_id']}",
        "--with-key",
        "--json",
        env=stack_env,
        cwd=workdir,
    )
    other_env = {**stack_env, "RGRID_API_KEY": json.loads(created.stdout)["api_key"]}
    theirs, _ = run_json("run", "process.py", "data/a.csv", env=other_env, cwd=workdir)
    assert theirs["bytes_uploaded"] == 8 and theirs["input_cache_hit"] is False
    for command in ("status", "logs", "outputs"):
        result = run_cli(command, mine["execution_id"], env=other_env, cwd=workdir)
        assert_one_line_error(result, f"no execution {mine['execution_id']}")


def test_embedded_inputs(workdir, embedded_env):
    env = embedded_env
    first, result = run_json("run", "process.py", "data", env=env, cwd=workdir)
    assert first["status"] == "succeeded", result.stderr
    assert first["files_uploaded"] == 2 and first["bytes_uploaded"] == 16
    assert (workdir / first["outputs_dir"] / "report" / "total.txt").read_text() == "16"
    second, _ = run_json("run", "process.py", "data", env=env, cwd=workdir)
    assert second["bytes_uploaded"] == 0 and second["input_cache_hit"] is True
