"""Section 1c of bench/run.py: an identical repeat answered from its outputs (``--reuse``)
against a bare ``docker run`` of the script.
"""

from __future__ import annotations

from bench.harness import (
    FLOOR,
    Measure,
    Row,
    measure_with_retries,
    rgrid_row,
    rows_of,
    run_rounds,
)
from bench.rows_warm import warm_floor
from bench.session import Env, cli_run


def reuse_rows(env: Env) -> list[tuple[Row, Measure]]:
    """Section 1c: a repeat of an identical succeeded run with ``--reuse``, answered from the
    output cache (no sandbox, no script run), next to a bare ``docker run`` of the script.
    Untimed first, each mode's warm script once with ``--reuse``: every succeeded run records
    its entry, so this one is answered from the warm-up's run, or runs and records it."""
    for mode in env.modes:
        script = env.warm_script[mode.name]
        measure_with_retries(env.warmup, lambda m=mode, s=script: cli_run(env, m, s, reuse=True))
    rows: list[tuple[Row, Measure]] = [warm_floor(env)]
    for mode in env.modes:
        script = env.warm_script[mode.name]
        rows.append(
            (
                rgrid_row(f"reuse-{mode.name}", f"`rgrid run --reuse`, {mode.label}", FLOOR),
                lambda m=mode, s=script: cli_run(env, m, s, reuse=True, reused=True),
            )
        )
    return rows


def section(env: Env, repeat: int) -> list[tuple[str, list[Row]]]:
    """Section 1c in its own rounds (its untimed first runs are in :func:`reuse_rows`)."""
    reuse = reuse_rows(env)
    run_rounds(reuse, repeat, "reused repeat")
    return [("1c. Identical repeat answered from its outputs (`--reuse`)", rows_of(reuse))]
