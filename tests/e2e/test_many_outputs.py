"""Issue 24, item 3, through the real `rgrid` CLI: 2,000 outputs come back, against the stack
and embedded; a run that a limit ended after its script exited 0 says the limit."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import run_cli

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
