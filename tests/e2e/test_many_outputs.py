"""Issue 24, item 3, through the real `rgrid` CLI: 2,000 outputs come back, against the stack
and embedded; a run that a limit ended after its script exited 0 says the limit; many small
outputs (packed) round-trip byte for byte, all, one or some; a lost pack names the outputs it
held; the purge keeps a pack that a live output-cache entry still reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import assert_one_line_error, run_cli, run_json

TILES = """
import os
os.makedirs('/work/outputs/tiles', exist_ok=True)
for i in range(2000):
    with open(f'/work/outputs/tiles/{i:05}.txt', 'w') as fh:
        fh.write(f'tile {i}\\n')
print('wrote 2000 tiles')
"""


def _fetched(cwd: Path) -> dict[str, str]:
    (folder,) = (cwd / "rgrid-outputs").iterdir()
    return {p.name: p.read_text() for p in (folder / "tiles").iterdir()}


def _check_tiles(result, cwd: Path) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote 2000 tiles\n"
    assert "output file limit" not in result.stderr
    tiles = _fetched(cwd)
    assert len(tiles) == 2000
    assert tiles["00000.txt"] == "tile 0\n" and tiles["01999.txt"] == "tile 1999\n"


def test_2000_outputs_come_back_from_the_stack(stack_env, tmp_path):
    (tmp_path / "tiles.py").write_text(TILES)
    result = run_cli("run", "tiles.py", env=stack_env, cwd=tmp_path, timeout=600)
    _check_tiles(result, tmp_path)


def test_2000_outputs_come_back_embedded(embedded_env, tmp_path):
    (tmp_path / "tiles.py").write_text(TILES)
    result = run_cli("run", "tiles.py", env=embedded_env, cwd=tmp_path, timeout=600)
    _check_tiles(result, tmp_path)


def test_the_summary_names_the_limit_that_ended_a_run_whose_script_exited_0(embedded_env, tmp_path):
    (tmp_path / "tiles.py").write_text(TILES)
    env = {**embedded_env, "RGRID_MAX_OUTPUT_FILES": "100"}
    result = run_cli("run", "tiles.py", env=env, cwd=tmp_path, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("failed")]
    assert len(summary) == 1, result.stderr
    assert summary[0].startswith(
        "failed · output file limit reached: more than 100 files in /work/outputs · "
    )
    assert "exit 0" not in result.stderr
    assert not (tmp_path / "rgrid-outputs").exists() or not any(
        (tmp_path / "rgrid-outputs").rglob("*.txt")
    )


# Many small outputs are packed (store/output_blobs.py): one object holds them, each keeps its own
# digest. Sizes around the packing bound (64 KiB) and an empty file, binary bytes, nested
# folders, two files of the same bytes, and one large file that stays an object of its own.
MIXED = """
import hashlib, os
TOKEN = {token!r}
def body(i):
    size = 65536 + i % 5000 if i % 250 == 7 else (i * 7919) % 3000
    seed = hashlib.sha256(f'{{TOKEN}}-{{i}}'.encode()).digest()
    return (seed * (size // 32 + 1))[:size]
for i in range({count}):
    folder = f'/work/outputs/part-{{i % 3}}/deep' if i % 2 else '/work/outputs/tiles'
    os.makedirs(folder, exist_ok=True)
    with open(f'{{folder}}/{{i:05}}.bin', 'wb') as fh:
        fh.write(body(i))
open('/work/outputs/same-a.bin', 'wb').write(body(3))
open('/work/outputs/same-b.bin', 'wb').write(body(3))
open('/work/outputs/large.bin', 'wb').write(hashlib.sha256(TOKEN.encode()).digest() * 98304)
print('wrote', {count})
"""


def _mixed(token: str, count: int) -> dict[str, bytes]:
    """What MIXED writes, computed here: the bytes every fetched file must equal."""
    import hashlib

    def body(i: int) -> bytes:
        size = 65536 + i % 5000 if i % 250 == 7 else (i * 7919) % 3000
        seed = hashlib.sha256(f"{token}-{i}".encode()).digest()
        return (seed * (size // 32 + 1))[:size]

    files = {}
    for i in range(count):
        folder = f"part-{i % 3}/deep" if i % 2 else "tiles"
        files[f"{folder}/{i:05}.bin"] = body(i)
    files["same-a.bin"] = files["same-b.bin"] = body(3)
    files["large.bin"] = hashlib.sha256(token.encode()).digest() * 98304
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(params=["embedded", "stack"])
def user_env(request) -> dict[str, str]:
    return request.getfixturevalue(f"{request.param}_env")


def test_many_small_outputs_round_trip_byte_exactly(user_env, tmp_path):
    import uuid

    token, count = uuid.uuid4().hex, 1500
    (tmp_path / "mixed.py").write_text(MIXED.format(token=token, count=count))
    ran, result = run_json("run", "mixed.py", env=user_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ran["status"] == "succeeded" and len(ran["outputs"]) == count + 3
    expected = _mixed(token, count)
    assert _tree(tmp_path / ran["outputs_dir"]) == expected
    assert not list((tmp_path / ran["outputs_dir"]).rglob(".rgrid-*"))  # no partial left

    # Again, into another folder: the same bytes; then one output alone (a ranged GET of
    # its pack), a folder of them and a glob.
    again = run_cli("outputs", ran["execution_id"], "-o", "again", env=user_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _tree(tmp_path / "again") == expected
    one = run_cli(
        "outputs", ran["execution_id"], "tiles/00010.bin", "-o", "one", env=user_env, cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr
    assert _tree(tmp_path / "one") == {"tiles/00010.bin": expected["tiles/00010.bin"]}
    some = run_cli(
        "outputs", ran["execution_id"], "part-1", "*.bin", "-o", "some", env=user_env, cwd=tmp_path
    )
    assert some.returncode == 0, some.stderr
    wanted = {
        path: data
        for path, data in expected.items()
        if path.startswith("part-1/") or "/" not in path
    }
    assert _tree(tmp_path / "some") == wanted
    none = run_cli("outputs", ran["execution_id"], "nope/*", env=user_env, cwd=tmp_path)
    assert_one_line_error(none, "no output matches 'nope/*'")


def _packs(env: dict[str, str]) -> dict[str, bytes]:
    """Every pack in the store this user's RGrid writes to, by key."""
    if "RGRID_S3_ENDPOINT_URL" in env:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["RGRID_S3_ENDPOINT_URL"])
        bucket = env["RGRID_S3_BUCKET"]
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="packs/")
        return {
            item["Key"]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for page in pages
            for item in page.get("Contents", [])
        }
    store = Path(env["RGRID_DATA_DIR"]) / "store"
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in (store / "packs").rglob("*")
        if p.is_file()
    }


def _delete(env: dict[str, str], key: str) -> None:
    if "RGRID_S3_ENDPOINT_URL" in env:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["RGRID_S3_ENDPOINT_URL"])
        s3.delete_object(Bucket=env["RGRID_S3_BUCKET"], Key=key)
    else:
        (Path(env["RGRID_DATA_DIR"]) / "store" / key).unlink()


def test_a_lost_pack_names_the_outputs_it_held(user_env, tmp_path):
    import json
    import uuid

    token = uuid.uuid4().hex
    (tmp_path / "mixed.py").write_text(MIXED.format(token=token, count=40))
    ran, result = run_json("run", "mixed.py", env=user_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = _mixed(token, 40)
    (key,) = [k for k, data in _packs(user_env).items() if expected["tiles/00010.bin"] in data]
    _delete(user_env, key)
    status = run_cli("status", ran["execution_id"], "--json", env=user_env, cwd=tmp_path)
    lost = json.loads(status.stdout)["lost_outputs"]
    # Every packed output (all but the one over 64 KiB and the large one) is named. The empty
    # file is in this pack only if no earlier run of the account stored empty bytes.
    packed = {p for p, data in expected.items() if 0 < len(data) <= 64 * 1024}
    assert packed <= set(lost) <= packed | {"tiles/00000.bin"}
    fetched = run_cli("outputs", ran["execution_id"], "-o", "again", env=user_env, cwd=tmp_path)
    assert fetched.returncode == 125
    assert_one_line_error(fetched, "are lost from the object store")
    one = run_cli("outputs", ran["execution_id"], "tiles/00010.bin", env=user_env, cwd=tmp_path)
    assert one.returncode == 125
    assert_one_line_error(one, "output tiles/00010.bin is lost from the object store")
    # Not lost: an output of its own object still comes back.
    big = run_cli(
        "outputs", ran["execution_id"], "large.bin", "-o", "big", env=user_env, cwd=tmp_path
    )
    assert big.returncode == 0, big.stderr
    assert (tmp_path / "big" / "large.bin").read_bytes() == expected["large.bin"]


def test_purge_keeps_a_pack_a_live_entry_still_reads(embedded_env, tmp_path):
    """Run A packs tiles 0-39; run B writes tiles 20-59 (20-39 are A's blobs, used again).
    A month later only A's own tiles and A's output-cache entry are stale: `rgrid cache purge
    --older-than 30d` drops them, keeps A's pack (B reads it), and B's repeat is still
    answered from its entry with the same bytes."""
    import contextlib
    import json
    import sqlite3
    import uuid

    env, token = embedded_env, uuid.uuid4().hex
    # No large file: what is stale is small outputs and their packs.
    script = MIXED.format(token=token, count=40).replace(
        "open('/work/outputs/large.bin', 'wb')", "open(os.devnull, 'wb')"
    )
    (tmp_path / "a.py").write_text(script)
    (tmp_path / "b.py").write_text(script.replace("range(40)", "range(20, 60)"))
    a, result = run_json("run", "--reuse", "a.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    b, result = run_json("run", "--reuse", "b.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    packs_before = set(_packs(env))
    assert len(packs_before) == 2
    only_a = {o["sha256"] for o in a["outputs"]} - {o["sha256"] for o in b["outputs"]}
    with contextlib.closing(sqlite3.connect(Path(env["RGRID_DATA_DIR"]) / "rgrid.db")) as db:
        marks = ",".join("?" * len(only_a))
        db.execute(
            f"UPDATE blobs SET last_used_at = '2020-01-01 00:00:00' WHERE digest IN ({marks})",
            list(only_a),
        )
        db.execute(
            "UPDATE output_cache SET last_used_at = '2020-01-01 00:00:00' WHERE execution_id = ?",
            (a["execution_id"],),
        )
        db.commit()
    purged = run_cli("cache", "purge", "--older-than", "30d", "--json", env=env, cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    removed = json.loads(purged.stdout)["removed"]
    assert removed["blobs"] == len(only_a) and removed["output_cache"] == 1
    assert set(_packs(env)) == packs_before  # both still read by B's blobs
    again, result = run_json("run", "--reuse", "b.py", env=env, cwd=tmp_path)
    assert again["reused_from"] == b["execution_id"], result.stderr
    assert _tree(tmp_path / again["outputs_dir"]) == _tree(tmp_path / b["outputs_dir"])
    # Everything: no pack is left.
    purged = run_cli("cache", "purge", "--all", env=env, cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert _packs(env) == {}
