from rgrid.cli.output import LogPrinter, summary_line
from rgrid.core.units import human_bytes, parse_bytes
from rgrid.store.file_logs import FileLogBuffer
from rgrid.store.logbuffer import decode_log, encode_log


def _execution(**overrides):
    base = {
        "status": "succeeded",
        "exit_code": 0,
        "duration_s": 1.234,
        "script_cache_hit": True,
        "dependency_cache_hit": None,
        "input_cache_hit": None,
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
    line = summary_line(_execution(dependency_cache_hit=True, input_cache_hit=False), None)
    assert "deps hit · inputs miss" in line


def test_summary_line_shows_the_error_of_a_failed_execution():
    line = summary_line(
        _execution(status="timed_out", exit_code=None, error="timed out after 2s"), None
    )
    assert line.splitlines() == [
        "timed_out · exit - · 1.23s · script cache hit · deps - · inputs - · uploaded 0 B",
        "timed out after 2s",
    ]


def test_summary_line_does_not_repeat_an_error_the_log_showed():
    execution = _execution(status="build_failed", exit_code=None, error="uv: no such package")
    assert summary_line(execution, None, ["dependency install failed: uv: no such package\n"])
    assert "no such package" not in summary_line(
        execution, None, ["dependency install failed: uv: no such package\n"]
    )


def test_log_printer_shows_phases_closed_with_their_time_and_hides_raw_installer_output(capsys):
    printer = LogPrinter()
    printer.emit("phase", "resolving and installing 2 requirement(s)")
    printer.emit("detail", "Installed 2 packages in 3ms\n")
    printer.emit("system", "installed 2 package(s) in 0.20s\n")
    printer.emit("stdout", "hello\n")
    printer.close()
    out, err = capsys.readouterr()
    assert out == "hello\n"
    lines = err.splitlines()
    assert lines[0].startswith("│ resolving and installing 2 requirement(s) · ")
    assert lines[0].endswith("s")
    assert lines[1:] == ["│ installed 2 package(s) in 0.20s"]
    assert "Installed 2 packages" not in err


def test_log_printer_shows_raw_installer_output_when_verbose(capsys):
    printer = LogPrinter(verbose=True)
    printer.emit("detail", "Installed 2 packages in 3ms\n")
    printer.close()
    assert "Installed 2 packages in 3ms" in capsys.readouterr().err


def test_log_printer_json_mode_keeps_stdout_for_the_json(capsys):
    printer = LogPrinter(json_mode=True)
    printer.emit("stdout", "script output\n")
    printer.close()
    out, err = capsys.readouterr()
    assert out == "" and err == "script output\n"


def test_sizes_are_shown_and_read_in_binary_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(2048) == "2.0 KiB"
    assert human_bytes(5 * 1024**3) == "5.0 GiB"
    assert parse_bytes("512m") == 512 * 1024**2
    assert parse_bytes("1.5GiB") == 1536 * 1024**2
    assert parse_bytes("2g") == 2 * 1024**3


def test_log_roundtrip_keeps_streams_and_unicode():
    chunks = [("stdout", "héllo\n"), ("stderr", "warn\n"), ("system", "built\n")]
    assert decode_log(encode_log(chunks)) == chunks


def test_file_log_buffer_is_read_live_by_another_process(tmp_path):
    writer, reader = FileLogBuffer(tmp_path), FileLogBuffer(tmp_path)
    for i in range(3):
        writer.append("e1", "stdout", f"{i}\n")
    assert writer.read("e1", 1) == [("stdout", "1\n"), ("stdout", "2\n")]
    # `reader` stands for a second `rgrid logs` process: it reads the file, page by page.
    assert reader.read("e1", 1, limit=1) == [("stdout", "1\n")]
    writer.append("e1", "stderr", "3\n")
    assert reader.read("e1", 2) == [("stdout", "2\n"), ("stderr", "3\n")]
    writer.clear("e1")
    assert writer.read("e1") == [] and reader.read("e1") == []


def test_summary_line_names_the_limit_that_ended_a_run_whose_script_exited_0():
    """Issue 24: ``failed · exit 0`` read as if exit 0 were the reason."""
    reason = "output file limit reached: more than 1000 files in /work/outputs"
    line = summary_line(_execution(status="failed", exit_code=0, error=reason), None)
    assert line == (
        f"failed · {reason} · 1.23s · script cache hit · deps - · inputs - · uploaded 0 B"
    )
    assert "exit 0" not in line
