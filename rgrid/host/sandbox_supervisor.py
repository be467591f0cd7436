"""PID 1 of every sandbox, and the job line it reads: the one program RGrid runs inside one.

The supervisor waits on stdin for one job (argv, environment, deadline, where to write its
status and the output it keeps), runs the script once, enforces the deadline itself, kills
whatever the script left behind, writes the exit status and ends both output streams with the
job's end marker. Its source is part of a sandbox's pool key (``sandbox.Environment``): a
changed supervisor is never handed a sandbox started with the old one.
"""

from __future__ import annotations

# PID 1 of every sandbox. Started with ``python3 -I -S`` (no site, no user paths: ~20 ms).
# SIGINT is ignored so that a script cannot end it that way; SIGTERM and SIGKILL from inside
# the container never reach PID 1 at all. The job line is read one byte at a time so that
# whatever follows it on stdin is left for the script (piped input).
SUPERVISOR = r"""
import fcntl, json, os, select, signal, struct, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
if not select.select([0], [], [], float(sys.argv[1]))[0]:
    sys.exit(0)
line = b""
while not line.endswith(b"\n"):
    byte = os.read(0, 1)
    if not byte:
        sys.exit(0)
    line += byte
job = json.loads(line)
def oom_kills():
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as fh:
                for entry in fh:
                    name, _, value = entry.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
    return 0
ooms = oom_kills()
# The status file is written in place over bytes allocated now: the script shares this
# filesystem and may fill it, after which no new block could be had.
status_fd = os.open(job["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(status_fd, b" " * 512)
# The script's output, kept beside the status as frames (stream, length, bytes) up to a cap:
# what a runner that died mid-run never read is here for the one that re-attaches.
kept = {"fd": os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        "room": job["output_max"], "all": True}
def keep(stream, data):
    if kept["fd"] is None:
        return
    piece = data[: kept["room"]]
    try:
        if piece:
            os.write(kept["fd"], struct.pack(">BI", stream, len(piece)) + piece)
    except OSError:
        piece = b""
    kept["room"] -= len(piece)
    if len(piece) < len(data):
        kept["all"] = False
        os.close(kept["fd"])
        kept["fd"] = None
out_r, out_w = os.pipe()
err_r, err_w = os.pipe()
for fd in (out_r, err_r):
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer, larger copies of a flood
    except OSError:
        pass
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.signal(signal.SIGCHLD, lambda *_: None)
signal.set_wakeup_fd(wake_w)
open(job["status"] + ".started", "w").close()
pid = os.fork()
if pid == 0:
    os.setsid()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (out_r, out_w, err_r, err_w, wake_r, wake_w, kept["fd"], status_fd):
        if fd is not None and fd > 2:
            os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(job["cwd"])
    os.execvpe(job["argv"][0], job["argv"], job["env"])
os.close(out_w)
os.close(err_w)
streams = {out_r: 1, err_r: 2}
deadline = time.monotonic() + job["timeout"]
timed_out = False
code = None
def write_all(fd, data):
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return
# Until the script has exited and every process holding its output is gone (killed once
# it has exited): its output is copied to the container's streams and kept.
while code is None or streams:
    if code is None:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(wait_status)
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            continue
    left = deadline - time.monotonic()
    if left <= 0 and code is None and not timed_out:
        timed_out = True
        os.killpg(pid, signal.SIGKILL)
        continue
    try:
        ready = select.select([*streams, wake_r], [], [], max(left, 0.05) if code is None else 1)[0]
    except InterruptedError:
        continue
    for fd in ready:
        if fd == wake_r:
            os.read(wake_r, 512)
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            os.close(fd)
            del streams[fd]
            continue
        write_all(streams[fd], data)
        keep(streams[fd], data)
if timed_out:
    code = -signal.SIGKILL
code = code if code >= 0 else 128 - code
oom = oom_kills() > ooms
def full(path):
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    margin = max(job["full_below"] // fs.f_frsize, fs.f_blocks // 500)
    return fs.f_bavail < margin or (fs.f_files and not fs.f_favail)
filled = [path for path in job["writable"] if full(path)]
status = json.dumps(
    {"exit_code": code, "timed_out": timed_out, "oom_killed": oom, "full": filled,
     "output_kept": kept["all"]}
)
os.pwrite(status_fd, status.encode()[:512].ljust(512), 0)
os.close(status_fd)
# Every process of the script is gone and the status is written: say so on both streams, so
# the runner stops reading now instead of when the engine has wound the container down.
end = job["end"].encode()
os.write(1, end)
os.write(2, end)
sys.exit(code)
"""

#: How the supervisor's end-of-run marker starts: a NUL, which text output does not end with,
#: so nothing but the marker itself is ever held back (see ``sandbox_streams.EndMarker``).
END_PREFIX = "\x00rgrid-end-"

#: Below this much free space a sandbox filesystem counts as full (ext4 refuses a write with
#: a few hundred KiB still free, reserved for its own delayed allocation).
FULL_BELOW_BYTES = 2 * 1024**2
