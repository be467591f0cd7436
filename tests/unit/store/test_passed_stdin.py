"""The agent's copy of a client's stdin (rgrid/store/channels.py ``PassedStdin``), on real pipes:
it reads what is written, ends at the writer's EOF, and a close wakes a read blocked on a pipe
nobody writes to, then gives the descriptor up (so the pipe's writer sees its reader go)."""

from __future__ import annotations

import os
import threading

import pytest

from rgrid.store.channels import MemoryChannels, PassedStdin


@pytest.fixture
def handed_pipe():
    """A pipe: its read end goes to the test (which hands it over), its write end is closed
    here (a handed-over descriptor is never closed twice: its number may be reused)."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(write_end)


def test_reads_what_is_written_then_the_writers_eof():
    read_end, write_end = os.pipe()
    source = PassedStdin(read_end)
    os.write(write_end, b"first chunk\n")
    assert source.read(65536) == b"first chunk\n"
    os.close(write_end)
    assert source.read(65536) == b""
    source.close()


def test_close_wakes_a_blocked_read_and_releases_the_descriptor(handed_pipe):
    read_end, write_end = handed_pipe
    source = PassedStdin(read_end)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(source.read(65536)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # nothing written: the read waits
    source.close()
    reader.join(10)
    assert not reader.is_alive() and got == [b""]
    # The only reader is gone: the writer is told so, as when a shell pipe's reader exits.
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"more")
    assert source.read(65536) == b""
    source.close()  # twice is harmless


def test_an_execution_forgotten_before_it_read_gives_its_stdin_up(handed_pipe):
    read_end, write_end = handed_pipe
    channels = MemoryChannels()
    channels.attach_stdin("e1", PassedStdin(read_end))
    channels.forget("e1")
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"more")
