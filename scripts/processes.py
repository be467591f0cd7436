"""Stopping the process groups the launchers start (the stack's roles, extra Docker engines).

A module of its own so that ``stack.py`` and ``hosts.py``, which both stop what they start,
share it without importing each other."""

from __future__ import annotations

import os
import signal
import time

#: How long a stopped process may take before it is killed.
STOP_TIMEOUT_S = 20.0


def stop_group(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """TERM the process group ``pid`` leads, then KILL it if it outlives ``timeout_s``.
    False when there was nothing to stop."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # Reaps it if it is our child; a zombie would otherwise look alive.
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    return True
