"""Section 1 of bench/run.py: a warm run (every cache hit) against a bare ``docker run``
of the same script, with and without RGrid's sandbox flags, and the CLI's start-up alone; and
the untimed warm-up that every later section relies on.
"""

from __future__ import annotations

from bench.harness import (
    FLOOR,
    RGRID,
    SANDBOX_FLOOR,
    Measure,
    Row,
    Sample,
    bare_run,
    measure_with_retries,
    rgrid_row,
    rows_of,
    run_rounds,
    timed,
)
from bench.session import Env, cli_run


def warm_up(env: Env) -> None:
    """Untimed, before section 1: each mode's warm script once (a script cache miss, which
    also starts the warm pool's sandbox for the runtime), and both floors once, so every timed
    run is a cache hit on an engine with the image's layers in the page cache. Each mode has a
    script of its own, new to this run."""
    row = env.warmup
    for mode in env.modes:
        script = env.warm_script[mode.name]
        measure_with_retries(row, lambda m=mode, s=script: cli_run(env, m, s))
    floor_script = env.warm_script["stack"]
    measure_with_retries(row, lambda: bare_run(floor_script))
    measure_with_retries(row, lambda: bare_run(floor_script, sandboxed=True))


def cli_start() -> Sample:
    """Diagnostic: ``rgrid --version`` does no work at all, so its time is the CLI's fixed cost
    (interpreter start and imports), which every ``rgrid run`` pays before submitting."""
    elapsed, _ = timed([str(RGRID), "--version"])
    return elapsed, {}


def warm_floor(env: Env) -> tuple[Row, Measure]:
    """The warm floor: a bare ``docker run`` of the stack row's script (sections 1 and 1c)."""
    floor_script = env.warm_script["stack"]
    return (
        Row(FLOOR, "floor: `docker run --rm --network none`, script bind-mounted", FLOOR),
        lambda: bare_run(floor_script),
    )


def warm_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1: the same script, every cache hit, next to a bare ``docker run`` of it."""
    floor_script = env.warm_script["stack"]
    rows: list[tuple[Row, Measure]] = [
        warm_floor(env),
        (
            Row(SANDBOX_FLOOR, "floor + RGrid's sandbox flags", FLOOR, SANDBOX_FLOOR),
            lambda: bare_run(floor_script, sandboxed=True),
        ),
    ]
    for mode in env.modes:
        script = env.warm_script[mode.name]
        rows.append(
            (
                rgrid_row(f"warm-{mode.name}", f"`rgrid run`, {mode.label}", FLOOR, SANDBOX_FLOOR),
                lambda m=mode, s=script: cli_run(env, m, s, script_hit=True),
            )
        )
    rows.append(
        (Row("cli-start", "diagnostic: `rgrid --version` (CLI start-up only)", FLOOR), cli_start)
    )
    return rows


def section(env: Env, repeat: int) -> list[tuple[str, list[Row]]]:
    """Section 1, timed in its own rounds (after :func:`warm_up`)."""
    warm = warm_rows(env)
    run_rounds(warm, repeat, "warm")
    return [("1. Warm run (all caches hit), no dependencies", rows_of(warm))]
