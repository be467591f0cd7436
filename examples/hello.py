"""The demo script: prints a greeting and writes one output file."""

import platform
from pathlib import Path

print(f"hello from RGrid, Python {platform.python_version()}")
Path("outputs/greeting.txt").write_text("hello, world\n")
print("wrote outputs/greeting.txt")
