"""The CLI's side of packed outputs (rgrid/client/downloads.py): spans of a pack, split
into files byte for byte and verified; which outputs a pattern names; a ranged GET against a
server that
honours the range and one that ignores it."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading

import pytest

from rgrid.client import downloads
from rgrid.client.downloads import _spans, save_outputs, select_outputs
from rgrid.client.remote import RemoteClient
from rgrid.core.errors import BadInput, RGridError


def _pack(blobs: list[bytes]) -> tuple[bytes, list[int]]:
    offsets, data = [], b""
    for blob in blobs:
        offsets.append(len(data))
        data += blob
    return data, offsets


def _listing(names_and_blobs: list[tuple[str, int]], blobs: list[bytes], offsets: list[int]):
    return {
        "outputs": [
            {
                "path": path,
                "sha256": hashlib.sha256(blobs[index]).hexdigest(),
                "size": len(blobs[index]),
                "pack": 0,
                "offset": offsets[index],
            }
            for path, index in names_and_blobs
        ],
        "packs": [{"url": "unused"}],
    }


def _memory_fetcher(pack: bytes, asked: list[tuple[int, int]]):
    @contextlib.contextmanager
    def fetch_span(_pack, offset, length, _paths):
        asked.append((offset, length))
        data = pack[offset : offset + length]
        yield iter([data[i : i + 7] for i in range(0, len(data), 7)])  # odd chunk sizes

    return fetch_span


def test_spans_keep_neighbours_together_and_split_far_or_long_ones(monkeypatch):
    monkeypatch.setattr(downloads, "SPAN_GAP_BYTES", 10)
    monkeypatch.setattr(downloads, "SPAN_MAX_BYTES", 100)
    members = [
        {"path": "a", "offset": 0, "size": 5},
        {"path": "b", "offset": 5, "size": 5},
        {"path": "b2", "offset": 5, "size": 5},  # the same blob under another name
        {"path": "c", "offset": 18, "size": 5},  # a gap of 8: read through
        {"path": "d", "offset": 60, "size": 5},  # a gap of 37: a span of its own
        {"path": "e", "offset": 65, "size": 96},  # 101 bytes from d on: another
    ]
    spans = [[o["path"] for o in span] for span in _spans(list(reversed(members)))]
    assert spans == [["a", "b", "b2", "c"], ["d"], ["e"]]


def test_a_pack_is_split_into_files_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "SPAN_MAX_BYTES", 3000)
    blobs = [bytes([i]) * (i * 37 % 1500) for i in range(60)] + [b""]
    pack, offsets = _pack(blobs)
    # Blob 5 is not wanted (a gap), blob 9 has two names, one output is empty.
    wanted = [(f"d{i % 3}/f{i:02}.bin", i) for i in range(60) if i != 5]
    wanted += [("twin.bin", 9), ("empty", 60)]
    listing = _listing(wanted, blobs, offsets)
    asked: list[tuple[int, int]] = []
    progress: list[int] = []
    written = save_outputs(
        listing, tmp_path / "out", None, progress.append, _memory_fetcher(pack, asked)
    )
    assert len(written) == len(wanted) and len(asked) > 1
    for path, index in wanted:
        assert (tmp_path / "out" / path).read_bytes() == blobs[index]
    assert sum(progress) == sum(len(blobs[i]) for _, i in wanted)
    assert not list((tmp_path / "out").rglob(".rgrid-*"))
    # Fetched again over the same folder: every file replaced, none refused as a twin.
    again = save_outputs(listing, tmp_path / "out", None, lambda n: None, _memory_fetcher(pack, []))
    assert len(again) == len(wanted)


def test_a_link_where_an_output_goes_is_replaced_not_followed(tmp_path):
    blobs = [b"new bytes"]
    pack, offsets = _pack(blobs)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").symlink_to(outside)
    listing = _listing([("x.txt", 0)], blobs, offsets)
    save_outputs(listing, tmp_path / "out", None, lambda n: None, _memory_fetcher(pack, []))
    assert outside.read_bytes() == b"keep me"
    assert not (tmp_path / "out" / "x.txt").is_symlink()
    assert (tmp_path / "out" / "x.txt").read_bytes() == b"new bytes"


def test_bytes_that_do_not_match_their_digest_are_refused(tmp_path):
    blobs = [b"one", b"two"]
    pack, offsets = _pack(blobs)
    listing = _listing([("a", 0), ("b", 1)], blobs, offsets)
    corrupt = pack.replace(b"two", b"tw0")
    with pytest.raises(RGridError, match="failed verification"):
        save_outputs(listing, tmp_path / "out", None, lambda n: None, _memory_fetcher(corrupt, []))
    assert not (tmp_path / "out" / "b").exists()


def test_patterns_name_a_path_a_folder_or_a_glob():
    listing = {"outputs": [{"path": p} for p in ("a.bin", "x/b.bin", "x/y/c.bin", "t/1.png")]}

    def chosen(*patterns: str) -> list[str]:
        return [o["path"] for o in select_outputs(listing, patterns)["outputs"]]

    assert chosen() == ["a.bin", "x/b.bin", "x/y/c.bin", "t/1.png"]
    assert chosen("x/b.bin") == ["x/b.bin"]
    assert chosen("x") == ["x/b.bin", "x/y/c.bin"]
    assert chosen("*.bin") == ["a.bin"]  # `*` stays within a folder
    assert chosen("**.bin") == ["a.bin", "x/b.bin", "x/y/c.bin"]
    assert chosen("t/*.png", "a.bin") == ["a.bin", "t/1.png"]
    with pytest.raises(BadInput, match="no output matches 'nope'"):
        chosen("nope")


@pytest.fixture(params=[True, False], ids=["ranges", "no-ranges"])
def pack_server(request):
    """A store serving one pack at /pack: honouring ``Range`` (206), or ignoring it (200)."""
    blobs = [f"blob {i} ".encode() * (i + 1) for i in range(50)]
    pack, offsets = _pack(blobs)
    honour = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            wanted = self.headers.get("Range")
            body, status = pack, 200
            if honour and wanted:
                first, last = wanted.removeprefix("bytes=").split("-")
                body, status = pack[int(first) : int(last) + 1], 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/pack", blobs, offsets
    server.shutdown()


def test_a_ranged_get_fetches_one_output_and_a_whole_pack_answer_is_cut(pack_server, tmp_path):
    url, blobs, offsets = pack_server
    listing = _listing([(f"f{i:02}", i) for i in range(50)], blobs, offsets)
    listing["packs"] = [{"url": url}]
    remote = RemoteClient("http://unused", None)
    one = select_outputs(listing, ["f17"])
    assert save_outputs(one, tmp_path / "one", None, lambda n: None, remote._fetch_span)
    assert (tmp_path / "one" / "f17").read_bytes() == blobs[17]
    # Then the rest, on the same kept-alive connection (a cut answer closes it first).
    save_outputs(listing, tmp_path / "all", None, lambda n: None, remote._fetch_span)
    for i in range(50):
        assert (tmp_path / "all" / f"f{i:02}").read_bytes() == blobs[i]
