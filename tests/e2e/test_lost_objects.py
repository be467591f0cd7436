"""After the object store lost an execution's log or an output, through the real CLI, on the
embedded default (its local store) and against a running stack (the S3 endpoint): `rgrid logs`
and `rgrid outputs` say in one line what is lost (exit 125), `rgrid status` marks it, and the
rest is shown as before. Loss is simulated by deleting the objects from the store itself."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json


@pytest.fixture(params=["embedded", "stack"])
def user_env(request) -> dict[str, str]:
    return request.getfixturevalue(f"{request.param}_env")


def _delete_stored(env: dict[str, str], key: str | None = None, content: bytes | None = None):
    """Delete one object from the store this user's RGrid writes to: by key, or the one
    holding ``content`` (an output's blob is named by its upload, not its digest)."""
    if "RGRID_S3_ENDPOINT_URL" in env:
        s3 = boto3.client("s3", endpoint_url=env["RGRID_S3_ENDPOINT_URL"])
        bucket = env["RGRID_S3_BUCKET"]
        if key is None:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="blobs/")
            (key,) = [
                item["Key"]
                for page in pages
                for item in page.get("Contents", [])
                if s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() == content
            ]
        s3.delete_object(Bucket=bucket, Key=key)
        return
    store = Path(env["RGRID_DATA_DIR"]) / "store"
    if key is not None:
        (store / key).unlink()
        return
    (path,) = [p for p in (store / "blobs").rglob("*") if p.is_file() and p.read_bytes() == content]
    path.unlink()


def test_a_lost_log_and_output_are_said_to_be_lost(user_env, tmp_path):
    token = uuid.uuid4().hex
    (tmp_path / "count.py").write_text(
        "import os\n"
        f"print('counted {token}')\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        f"open('outputs/count.txt', 'w').write('{token} 3\\n')\n"
        f"open('outputs/kept.txt', 'w').write('{token} kept\\n')\n"
    )
    ran, result = run_json("run", "count.py", env=user_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    execution_id = ran["execution_id"]
    status = run_cli("status", execution_id, env=user_env, cwd=tmp_path)
    assert status.returncode == 0 and "lost" not in status.stdout

    _delete_stored(user_env, key=f"logs/{execution_id}.jsonl")
    lost_line = f"the log of execution {execution_id} is lost from the object store"
    for follow in ("--follow", "--no-follow"):
        logs = run_cli("logs", execution_id, follow, env=user_env, cwd=tmp_path)
        assert logs.returncode == 125
        assert logs.stdout == ""
        assert_one_line_error(logs, lost_line)
    status = run_cli("status", execution_id, env=user_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "log                    lost from the object store" in status.stdout.splitlines()
    assert "output                 count.txt (35 B)" in status.stdout.splitlines()

    _delete_stored(user_env, content=f"{token} 3\n".encode())
    status = run_cli("status", execution_id, "--json", env=user_env, cwd=tmp_path)
    checked = json.loads(status.stdout)
    assert checked["log_lost"] is True and checked["lost_outputs"] == ["count.txt"]
    status = run_cli("status", execution_id, env=user_env, cwd=tmp_path)
    lines = status.stdout.splitlines()
    assert "output                 count.txt (35 B) lost from the object store" in lines
    assert "output                 kept.txt (38 B)" in lines
    fetched = run_cli("outputs", execution_id, "-o", "again", env=user_env, cwd=tmp_path)
    assert fetched.returncode == 125
    assert_one_line_error(fetched, "output count.txt is lost from the object store")
