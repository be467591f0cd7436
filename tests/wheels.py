"""Tiny wheels made on the spot, served from a --find-links folder: a package whose versions a
test controls, so "a new version appeared" can be tested without the public index."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, dist: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel; ``requires``: its ``Requires-Dist`` lines."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: rgrid-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [_record_line(name, data) for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def make_sdist(folder: Path, dist: str, version: str) -> Path:
    """A source distribution only: with --only-binary :all: it cannot be installed."""
    module = dist.replace("-", "_")
    path = folder / f"{module}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
        info = tarfile.TarInfo(f"{module}-{version}/PKG-INFO")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path
