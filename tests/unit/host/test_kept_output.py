"""The output a sandbox's supervisor keeps (frames of stream, length, bytes) read back as the
live stream was, and re-read from its start without adding a line twice."""

from __future__ import annotations

import struct
from pathlib import Path

from rgrid.host import sandbox, sandbox_streams


def _box(tmp_path: Path) -> sandbox.Box:
    box = sandbox.Box("rgrid-run-x", "", tmp_path)
    box.meta.mkdir(parents=True)
    return box


def _frames(*frames: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack(">BI", number, len(data)) + data for number, data in frames)


def test_frames_are_read_as_they_grow_and_a_split_character_waits(tmp_path):
    box = _box(tmp_path)
    path = box.meta / sandbox.OUTPUT_FILE
    snow = "☃".encode()
    whole = _frames((1, b"tick 0\n" + snow[:1]), (2, b"oops\n"), (1, snow[1:] + b"\n"))
    kept = sandbox_streams.KeptOutput(box)
    path.write_bytes(whole[:-3])  # the last frame half written
    assert kept.read() == [("stdout", "tick 0\n"), ("stderr", "oops\n")]
    path.write_bytes(whole)
    assert kept.flush() == [("stdout", "☃\n")]


def test_a_malformed_frame_ends_the_reading(tmp_path):
    box = _box(tmp_path)
    (box.meta / sandbox.OUTPUT_FILE).write_bytes(_frames((1, b"a\n"), (9, b"forged\n")))
    assert sandbox_streams.KeptOutput(box).flush() == [("stdout", "a\n")]


def test_skipping_hands_on_only_what_was_not_forwarded():
    got: list[tuple[str, str]] = []
    forward = sandbox_streams.Skipping(
        lambda stream, text: got.append((stream, text)), {"stdout": 9}
    )
    forward([("stdout", "tick 0\n"), ("stderr", "e\n"), ("stdout", "tick 1\ntick 2\n")])
    # 9 characters of stdout were forwarded: "tick 0\n" and "ti".
    assert got == [("stderr", "e\n"), ("stdout", "ck 1\ntick 2\n")]
