"""Run a command and measure it: peak RSS (ru_maxrss of a wrapper's only child, so no
other test's child counts), CPU time (its user + system time: what a blow-up costs,
whatever the machine's load; wall time is what other processes leave it) and wall
time; PAX record builder."""
import json
import subprocess
import sys
import time
from dataclasses import dataclass

_WRAPPER = r"""
import json, resource, subprocess, sys
out = sys.argv[1]
if out:
    with open(out, "wb") as f:
        p = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=f,
                           stderr=subprocess.PIPE)
    p.stdout = b""
else:
    p = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL, capture_output=True)
sys.stderr.buffer.write(p.stderr)
sys.stdout.buffer.write(p.stdout)
sys.stdout.flush()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stderr.write("\n@@BOUND@@" + json.dumps({"rc": p.returncode, "maxrss_kb": ru.ru_maxrss,
                                           "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


@dataclass
class Bounded:
    returncode: int
    stdout: bytes
    stderr: bytes
    maxrss: int          # bytes
    seconds: float       # wall time
    cpu_seconds: float   # the command's user + system time: bound this, not `seconds`


def run_bounded(argv, timeout=120, cwd=None, stdout_path="") -> Bounded:
    """stdout_path: send the command's output there (e.g. /dev/null) instead of
    capturing it."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _WRAPPER, str(stdout_path), *map(str, argv)],
                       capture_output=True, timeout=timeout, cwd=cwd)
    seconds = time.monotonic() - t0
    err, _, tail = p.stderr.rpartition(b"\n@@BOUND@@")
    info = json.loads(tail)
    return Bounded(info["rc"], p.stdout, err, info["maxrss_kb"] * 1024, seconds,
                   info["cpu_s"])


def pax_rec(key: bytes, value: bytes) -> bytes:
    body = key + b"=" + value + b"\n"
    n = len(body) + 2
    while len(str(n).encode()) + 1 + len(body) != n:
        n += 1
    return str(n).encode() + b" " + body
