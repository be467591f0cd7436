from rgrid.cli.output import human_bytes, summary_line
from rgrid.logbuffer import MemoryLogBuffer, decode_log, encode_log


def _execution(**overrides):
    base = {
        "status": "succeeded",
        "exit_code": 0,
        "duration_s": 1.234,
        "script_cache_hit": True,
        "dependency_cache_hit": False,
        "input_cache_hit": False,
        "bytes_uploaded": 0,
        "error": None,
        "dependency_hash": None,
        "input_hash": None,
    }
    return {**base, **overrides}


def test_summary_line_names_status_exit_duration_and_caches():
    line = summary_line(_execution(), "rgrid-outputs/abc")
    assert line.startswith("succeeded · exit 0 · 1.23s · script cache hit")
    assert "uploaded 0 B" in line
    assert "deps - · inputs -" in line  # neither applies to a script without them
    assert line.endswith("outputs rgrid-outputs/abc")


def test_summary_line_reports_dependency_and_input_caches_when_they_apply():
    line = summary_line(
        _execution(dependency_hash="d" * 64, dependency_cache_hit=True, input_hash="i" * 64), None
    )
    assert "deps hit · inputs miss" in line


def test_summary_line_shows_the_error_of_a_failed_execution():
    line = summary_line(
        _execution(status="timed_out", exit_code=None, error="timed out after 2s"), None
    )
    assert line.splitlines() == [line.splitlines()[0], "timed out after 2s"]
    assert "exit -" in line


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(2048) == "2.0 KB"
    assert human_bytes(5 * 1024**3) == "5.0 GB"


def test_log_roundtrip_keeps_streams_and_unicode():
    chunks = [("stdout", "héllo\n"), ("stderr", "warn\n"), ("system", "built\n")]
    assert decode_log(encode_log(chunks)) == chunks


def test_memory_log_buffer_reads_from_offset():
    buf = MemoryLogBuffer()
    for i in range(3):
        buf.append("e1", "stdout", f"{i}\n")
    assert buf.read("e1", 1) == [("stdout", "1\n"), ("stdout", "2\n")]
    buf.clear("e1")
    assert buf.read("e1") == []
