"""What bench/run.py's rows run: the scripts (plain, with dependencies, reading stdin, a
PEP 723 pandas script), a new copy of a script per run, and requirements sets nobody has
installed before (the tiny pad package, a new version every time, as a local wheel or from a
loopback HTTP server).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import threading
import uuid
import zipfile
from pathlib import Path

#: The small script: one line on stdout, one file under outputs/ (relative: the working
#: directory is /work in RGrid's sandbox and in the runtime image, a folder of its own for
#: ``uv run``).
SCRIPT = """\
import os

print("hello from the rgrid benchmark")
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write("ok\\n")
"""


#: The same with dependencies: it imports numpy and six and uses numpy for its output.
DEPS_SCRIPT = """\
import os

import numpy
import six

print("hello from the rgrid benchmark: numpy", numpy.__version__, "six", six.__version__)
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{numpy.arange(10).sum()}\\n")
"""


#: The small script for the piped-stdin rows: it reads all of stdin (EOF is the pipe's own end)
#: and writes what it counted.
STDIN_SCRIPT = """\
import os
import sys
data = sys.stdin.read()
print("hello from the rgrid benchmark:", len(data.splitlines()), "lines on stdin")
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{len(data)}\\n")
"""


#: What the piped-stdin rows pipe in: real bytes, 64 KiB of lines.
STDIN_DATA = "".join(f"record {i:06d} of the benchmark's piped input\n" for i in range(1430))
#: A small pandas script whose dependencies are PEP 723 inline metadata: pandas from the
#: package index, and the pad package (a new version every time, see :func:`pad_url`) so
#: that each run is the first run of a new set, for RGrid and for ``uv run`` alike.
PANDAS_SCRIPT = """\
# /// script
# dependencies = [
#   "pandas",
#   "{pad} @ {url}",
# ]
# ///
import os

import pandas as pd

frame = pd.DataFrame({{"a": range(100), "b": range(100)}})
total = int(frame.to_numpy().sum())
print("hello from the rgrid benchmark: pandas", pd.__version__, "sum", total)
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as fh:
    fh.write(f"{{total}}\\n")
"""


#: A tiny local package, a new version for every requirements set (see :func:`pad_wheel`).
PAD_PACKAGE = "rgrid-bench-pad"


def unique_script(root: Path, tag: str, body: str = SCRIPT) -> Path:
    """The script plus one comment line nobody has hashed before: the edit loop's one changed
    line, and a guaranteed script-cache miss. Each in a folder of its own (``script.py``)."""
    folder = root / f"{tag}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    path = folder / "script.py"
    path.write_text(f"{body}# bench {uuid.uuid4().hex}\n")
    return path


def new_version() -> str:
    return f"1.{int(uuid.uuid4().hex[:8], 16)}"


def new_requirements(root: Path, tag: str) -> Path:
    """A requirements set nobody has installed before: numpy and six, plus the pad package of a
    new version from a new ``--find-links`` folder. The new version changes what is installed,
    so no step anywhere (RGrid's environment folder, Docker's layer cache for the floor's pip
    layer) can reuse an earlier set's work, while numpy stays the bulk."""
    folder = root / f"req-{tag}-{uuid.uuid4().hex[:12]}"
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    pad_wheel(wheels, new_version())
    path = folder / "requirements.txt"
    path.write_text(f"numpy\nsix\n{PAD_PACKAGE}\n--find-links {wheels}\n")
    return path


def pad_wheel(folder: Path, version: str) -> Path:
    """A valid pure-Python wheel of ``rgrid-bench-pad`` (one small module), written by hand."""
    dist = PAD_PACKAGE.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}.py": f'"""Padding for the RGrid benchmark."""\nVERSION = "{version}"\n'.encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PAD_PACKAGE}\nVersion: {version}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: rgrid-bench\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,", ""]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def start_pad_server(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server on loopback for the pad wheels of the PEP 723 rows: a PEP 723 block can
    only name a package index or a URL (RGrid takes http(s) URLs, no local paths), and RGrid's
    installs and ``uv run`` both run on this host, so both fetch the same tiny wheel from here.
    """

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="pad-server", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
