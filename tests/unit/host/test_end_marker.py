"""The supervisor's end-of-run marker: found at the end of a stream whatever the frames'
boundaries, never eating the script's own output, and holding back only what could be it."""

from __future__ import annotations

from rgrid.host.sandbox_streams import EndMarker
from rgrid.host.sandbox_supervisor import END_PREFIX

MARKER = END_PREFIX + "0123456789abcdef"


def _feed(frames: list[bytes]) -> tuple[bytes, bool]:
    end = EndMarker(MARKER)
    out = b"".join(end.feed(frame) for frame in frames)
    return out + end.flush(), end.seen


def test_the_marker_ends_the_stream_and_is_not_output():
    assert _feed([b"hello\n", MARKER.encode()]) == (b"hello\n", True)
    assert _feed([b"hello\n" + MARKER.encode()]) == (b"hello\n", True)


def test_a_marker_split_over_frames_is_still_found():
    data = b"tail without newline" + MARKER.encode()
    for cut in range(1, len(data)):
        assert _feed([data[:cut], data[cut:]]) == (b"tail without newline", True)


def test_ordinary_output_is_never_held_back():
    end = EndMarker(MARKER)
    assert end.feed(b"tick 1\n") == b"tick 1\n"
    assert end.feed(b"no newline") == b"no newline"
    assert end.held == b""


def test_a_nul_that_is_not_the_marker_comes_out_with_the_next_frame():
    end = EndMarker(MARKER)
    assert end.feed(b"binary\x00") == b"binary"
    assert end.feed(b"\x01more") == b"\x00\x01more"
    assert not end.seen


def test_another_jobs_marker_is_just_output():
    other = (END_PREFIX + "ffffffffffffffff").encode()
    assert _feed([b"x", other]) == (b"x" + other, False)
