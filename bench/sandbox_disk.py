"""What a sandbox's own filesystem (the per-execution disk limit) costs, next to the floor.

Every sandbox's ``/work`` is on a sparse ext4 image loop-mounted by the worker
(``sandbox_fs.mount_disk``): made and mounted when the sandbox is started for the warm pool
(off the user's path), unmounted when it is discarded (after the run). This measures those two
steps against a bare ``docker run --rm`` of a hello script (the bar a warm run is held to), as
ratios, in one run. Needs root (mount) and the runtime image (``make setup``).

    .venv/bin/python bench/sandbox_disk.py [--repeat 20] [--size 4g]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import RUNTIME_IMAGE  # noqa: E402 - the runtime every bench's floor uses
from rgrid.core.units import parse_bytes  # noqa: E402
from rgrid.host import sandbox, sandbox_fs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--size", default="4g", help="the image's size (RGRID_DISK_LIMIT)")
    options = parser.parse_args(argv)
    image = RUNTIME_IMAGE
    floor, setup, teardown = [], [], []
    with tempfile.TemporaryDirectory(prefix="rgrid-bench-disk-") as tmp:
        for i in range(options.repeat):
            started = time.perf_counter()
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", image, "python3", "-c", "0"],
                check=True,
                capture_output=True,
            )
            floor.append(time.perf_counter() - started)
            host_dir = Path(tmp, f"box-{i}")
            (host_dir / sandbox.DISK_DIR).mkdir(parents=True)
            started = time.perf_counter()
            sandbox_fs.mount_disk(host_dir, parse_bytes(options.size))
            setup.append(time.perf_counter() - started)
            started = time.perf_counter()
            sandbox_fs.release_disk(host_dir)
            teardown.append(time.perf_counter() - started)
            shutil.rmtree(host_dir)
    f = statistics.median(floor)
    print("| step | median | ratio to floor | on the user's path |")
    print("| --- | --- | --- | --- |")
    print(f"| `docker run --rm` hello (floor) | {f * 1000:.0f} ms | 1.00× | - |")
    for name, values, on_path in (
        (f"mkfs.ext4 + mount -o loop ({options.size})", setup, "no: pool start"),
        ("umount -l", teardown, "after the run"),
    ):
        m = statistics.median(values)
        print(f"| {name} | {m * 1000:.1f} ms | {m / f:.3f}× | {on_path} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
