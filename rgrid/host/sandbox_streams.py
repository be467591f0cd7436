"""The output plumbing between a sandbox and its runner: piped input in, both streams out.

A run's output arrives as frames on the attach socket (``forward_frames``), each stream decoded
as UTF-8 and cut at the supervisor's end marker (``EndMarker``), so the runner stops reading
when the script is over, not when the engine has wound the container down. The supervisor
also keeps the output in the sandbox's folder (``KeptOutput``), for a runner that re-attaches
after the first one died; ``Skipping`` hands on only what the log has not seen yet.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import socket
import struct
from collections.abc import Callable

from docker.utils.socket import frames_iter

from rgrid.host.sandbox import OUTPUT_FILE, Box
from rgrid.store.channels import StdinSource

#: The two output streams, by their number on the attach socket and in the kept output.
STREAM_NAMES = {1: "stdout", 2: "stderr"}


class EndMarker:
    """Finds the supervisor's end marker at the end of one stream. Bytes that could be the
    start of the marker are held back until the next frame tells whether they are."""

    def __init__(self, marker: str):
        self.marker = marker.encode()
        self.held = b""
        self.seen = False

    def feed(self, data: bytes) -> bytes:
        if self.seen:
            return b""  # nothing follows the marker
        data = self.held + data
        self.held = b""
        at = data.find(self.marker)
        if at >= 0:
            self.seen = True
            return data[:at]
        for size in range(min(len(self.marker) - 1, len(data)), 0, -1):
            if self.marker.startswith(data[-size:]):
                self.held = data[-size:]
                return data[:-size]
        return data

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return held


def forward_frames(sock, marker: str, on_output: Callable[[str, str], None]) -> bool:
    """Hand each stream's text on as it arrives on the attach socket ``sock``, up to the
    supervisor's end ``marker``; returns whether both streams showed it (the supervisor is
    done, its container's exit is not waited for)."""
    ends = {1: EndMarker(marker), 2: EndMarker(marker)}
    decoders = {
        number: codecs.getincrementaldecoder("utf-8")(errors="replace") for number in STREAM_NAMES
    }
    for stream, data in frames_iter(sock, tty=False):
        if stream not in decoders:
            continue
        if text := decoders[stream].decode(ends[stream].feed(data)):
            on_output(STREAM_NAMES[stream], text)
        if all(end.seen for end in ends.values()):
            break  # the supervisor is done; its container's exit is not waited for
    for stream, decoder in decoders.items():
        if tail := decoder.decode(ends[stream].flush(), final=True):
            on_output(STREAM_NAMES[stream], tail)
    return all(end.seen for end in ends.values())


def pump_stdin(source: StdinSource, raw: socket.socket) -> None:
    """Piped input for the script, then EOF. A script that exits early closes the socket: the
    rest is dropped, as with a shell pipe."""
    with contextlib.suppress(OSError):
        while chunk := source.read(64 * 1024):
            raw.sendall(chunk)
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)


#: A frame of the kept output: its stream (1 or 2) and length, then that many bytes.
_FRAME = struct.Struct(">BI")


class KeptOutput:
    """Reads the output the supervisor kept (``OUTPUT_FILE``), as it grows, decoded per stream
    like the live stream is. The file is the script's to write too (it runs as the same
    user), so it is opened without following links and read only as far as it is well
    formed: a script can spoil only its own log."""

    NAMES = STREAM_NAMES

    def __init__(self, box: Box):
        self.path = box.meta / OUTPUT_FILE
        self.position = 0
        self.broken = False
        self.decoders = {
            number: codecs.getincrementaldecoder("utf-8")(errors="replace") for number in self.NAMES
        }

    def read(self) -> list[tuple[str, str]]:
        """The (stream, text) pieces written since the last read."""
        if self.broken:
            return []
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return []
        pieces = []
        with os.fdopen(fd, "rb") as fh:
            fh.seek(self.position)
            while header := fh.read(_FRAME.size):
                if len(header) < _FRAME.size:
                    break
                number, size = _FRAME.unpack(header)
                if number not in self.NAMES:
                    self.broken = True
                    break
                data = fh.read(size)
                if len(data) < size:
                    break  # the supervisor is half way through writing it
                self.position += _FRAME.size + size
                if text := self.decoders[number].decode(data):
                    pieces.append((self.NAMES[number], text))
        return pieces

    def flush(self) -> list[tuple[str, str]]:
        """The last pieces, once the supervisor is done."""
        pieces = self.read()
        for number, decoder in self.decoders.items():
            if tail := decoder.decode(b"", final=True):
                pieces.append((self.NAMES[number], tail))
        return pieces


class Skipping:
    """Hands on the part of each stream's text past what was already forwarded (``seen``:
    characters per stream), so that re-reading the kept output from its start adds each
    line to the log once."""

    def __init__(self, on_output: Callable[[str, str], None], seen: dict[str, int]):
        self.on_output = on_output
        self.skip = dict(seen)

    def __call__(self, pieces: list[tuple[str, str]]) -> None:
        for stream, text in pieces:
            skip = self.skip.get(stream, 0)
            if skip >= len(text):
                self.skip[stream] = skip - len(text)
                continue
            self.skip[stream] = 0
            self.on_output(stream, text[skip:])
