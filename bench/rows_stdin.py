"""Section 1b of bench/run.py: a warm script fed 64 KiB through a pipe, against ``docker run
-i`` fed the same, and the same script with stdin at /dev/null.
"""

from __future__ import annotations

from bench.harness import (
    STDIN_FLOOR,
    Measure,
    Row,
    bare_run,
    measure_with_retries,
    rgrid_row,
    rows_of,
    run_rounds,
)
from bench.session import Env, cli_run
from bench.workload import STDIN_DATA


def stdin_warm_up(env: Env) -> None:
    """Untimed, before the piped-stdin section: each mode's stdin script once (its script
    cache miss) and the piped floor once."""
    row = env.warmup
    for mode in env.modes:
        script = env.stdin_script[mode.name]
        measure_with_retries(
            row, lambda m=mode, s=script: cli_run(env, m, s, stdin_data=STDIN_DATA)
        )
    measure_with_retries(row, lambda: bare_run(env.stdin_script["stack"], stdin_data=STDIN_DATA))


def stdin_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1b: a warm script that reads stdin, fed 64 KiB through a pipe (as from a
    Python ``subprocess.run``, a heredoc or CI), next to ``docker run -i`` fed the same; and
    the same script with stdin at /dev/null (as from a terminal), to see both paths at once."""
    floor_script = env.stdin_script["stack"]
    rows: list[tuple[Row, Measure]] = [
        (
            Row(
                STDIN_FLOOR, "floor: `docker run -i --rm --network none`, stdin piped", STDIN_FLOOR
            ),
            lambda: bare_run(floor_script, stdin_data=STDIN_DATA),
        ),
    ]
    for mode in env.modes:
        script = env.stdin_script[mode.name]
        rows.append(
            (
                rgrid_row(
                    f"stdin-{mode.name}", f"`rgrid run`, {mode.label}, stdin piped", STDIN_FLOOR
                ),
                lambda m=mode, s=script: cli_run(env, m, s, script_hit=True, stdin_data=STDIN_DATA),
            )
        )
    embedded = next(mode for mode in env.modes if mode.name == "embedded")
    rows.append(
        (
            Row(
                "stdin-embedded-devnull",
                "`rgrid run`, embedded default, stdin /dev/null",
                STDIN_FLOOR,
            ),
            lambda: cli_run(env, embedded, env.stdin_script["embedded"], script_hit=True),
        )
    )
    return rows


def section(env: Env, repeat: int) -> list[tuple[str, list[Row]]]:
    """Section 1b: its warm-up, then its own rounds."""
    stdin_warm_up(env)
    piped = stdin_rows(env)
    run_rounds(piped, repeat, "piped stdin")
    return [("1b. Warm run with 64 KiB piped to stdin (all caches hit)", rows_of(piped))]
