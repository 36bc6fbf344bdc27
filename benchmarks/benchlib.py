"""What every benchmark shares: which checkout it measures, the anchors it compares
with (erofs-utils version, kernel), child processes timed with their own rusage, and
goals stated as met or not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The checkout whose erofs_tools is measured: this one, unless benchmarks/compare-revs
# runs this script for another revision (with that revision's venv python).
REPO = Path(os.environ.get("EROFS_BENCH_REPO") or HERE.parent).resolve()


def tool_version(binary: str | os.PathLike) -> str:
    """First line of `BINARY -V` (e.g. "mkfs.erofs (erofs-utils) 1.9.4")."""
    try:
        out = subprocess.run([os.fspath(binary), "-V"], capture_output=True, text=True)
    except OSError as e:
        return f"{binary}: {e.strerror}"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else f"{binary}: no version output"


def default_anchor_mkfs() -> str:
    """mkfs.erofs of the cached erofs-utils 1.9.x anchor, built if missing."""
    import anchor
    return os.fspath(anchor.default_mkfs())


def anchors(mkfs: str | None = None) -> dict:
    """The anchors of this run: the mkfs.erofs compared with (or, for a benchmark that
    compares with none, the cached anchor build if there is one) and the kernel."""
    info = {"kernel": os.uname().release, "mkfs_erofs": mkfs, "erofs_utils": None,
            "erofs_utils_compared": mkfs is not None}
    if mkfs is None:
        try:
            import anchor
            builds = anchor.cached_builds()
        except Exception:  # noqa: BLE001  (e.g. inside the VM guest: no cache there)
            builds = []
        if builds:
            info["mkfs_erofs"] = os.fspath(builds[-1] / "bin" / "mkfs.erofs")
    if info["mkfs_erofs"]:
        info["erofs_utils"] = tool_version(info["mkfs_erofs"])
    return info


def anchor_line(info: dict) -> str:
    if info["erofs_utils"] is None:
        eu = "erofs-utils: none built (benchmarks/anchor.py), none compared"
    elif info["erofs_utils_compared"]:
        eu = f"compared with {info['erofs_utils']} ({info['mkfs_erofs']})"
    else:
        eu = f"erofs-utils anchor {info['erofs_utils']} (not compared in this benchmark)"
    return f"anchors: {eu}; kernel {info['kernel']}; loadavg {os.getloadavg()[0]:.2f}"


def goal(name: str, value: float, op: str, target: float) -> dict:
    """A goal as measured: {"goal", "value", "met"}; op is "<=" or ">="."""
    met = value <= target if op == "<=" else value >= target
    shown = round(value, 3)
    # judged on the exact value; shown with the digits that tell why (1.0000094 is not
    # met, though it rounds to 1.0)
    if (shown <= target if op == "<=" else shown >= target) != met:
        shown = round(value, 7)
    return {"goal": f"{name} {op} {target}", "value": shown, "met": met}


def goal_line(g: dict) -> str:
    v = g["value"]
    shown = f"{v:.3f}" if round(v, 3) == v else f"{v}"
    return f"goal {g['goal']}: {'met' if g['met'] else 'NOT met'} ({shown})"


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def work_dir(given: str | None, prefix: str) -> Path:
    """The benchmark's working directory: `given` (--workdir, kept), else a new one
    named PREFIX... on /var/tmp; made if missing."""
    work = Path(given or tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def is_root(prog: str) -> bool:
    """Whether we run as root (mounts, drop_caches); if not, says so on stderr and the
    benchmark returns 2."""
    if os.geteuid() != 0:
        print(f"{prog}: needs root (mount, drop_caches)", file=sys.stderr)
        return False
    return True


def announce_anchors(mkfs: str | None = None) -> dict:
    """anchors(), with its line on stderr first thing: a run's log says what it
    compared with and how loaded the machine was when it started."""
    info = anchors(mkfs)
    print(anchor_line(info), file=sys.stderr, flush=True)
    return info


def close_report(res: dict, json_path: str | None, anchor: dict | None = None, *,
                 print_json: bool = True, sort_keys: bool = True) -> int:
    """A benchmark's last lines: the anchor line (when given), a line per goal of
    res["goals"], the results as JSON on stdout (print_json) and in json_path. -> 0"""
    if anchor is not None:
        print(anchor_line(anchor))
    for g in res["goals"]:
        print(goal_line(g))
    doc = json.dumps(res, indent=1, sort_keys=sort_keys)
    if print_json:
        print(doc)
    if json_path:
        Path(json_path).write_text(doc)
    return 0


GNU_TIME = "/usr/bin/time"


def run_child(cmd: list[str], stdout=None, **kw) -> dict:
    """Run cmd; -> wall and CPU seconds, peak RSS of that child alone, and its stdout
    (unless redirected). A failure ends the benchmark.

    Peak RSS comes from GNU time (%M) wrapped around the command, not from our own
    wait4: Linux carries a process's RSS high-water mark across fork and exec, so a
    child's ru_maxrss starts at the benchmark's own RSS at fork time (tens of MiB of
    Python, or more), while GNU time forks from a process of ~2 MiB."""
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"{GNU_TIME} not found (apt-get install time): it measures "
                         "each child's peak memory")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", rss.name, *cmd],
                             stdout=stdout if stdout is not None else out, stderr=err, **kw)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed ({p.returncode}): "
                             f"{err.read().decode(errors='replace')[-2000:]}")
        out.seek(0)
        return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                "maxrss_mib": int(rss.read().split()[-1]) / 1024, "stdout": out.read()}


def child_env() -> dict:
    """Environment for `python -m erofs_tools` children: REPO's package first."""
    return dict(os.environ,
                PYTHONPATH=os.fspath(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


sys.path.insert(0, os.fspath(HERE))


def usr_tree(root: Path, mib: int, base: str = "/usr") -> int:
    """Copy a reproducible selection of this machine's BASE files (regular files of at
    most 64 MiB, ranked by the sha256 of their path, taken in that order until MIB MiB)
    to ROOT, keeping their relative paths: a real mix of sizes (many small files, a few
    big ones) that a generated tree lacks. The same machine gives the same tree; another
    machine, another tree of the same kind. Returns the number of files."""
    import hashlib
    import shutil
    import stat
    found = []
    for d, _ds, fs in os.walk(base):
        for n in fs:
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= 64 << 20:
                found.append((hashlib.sha256(p.encode(errors="surrogateescape")).digest(),
                              p, st.st_size))
    found.sort()
    total, n, target = 0, 0, mib << 20
    root.mkdir(parents=True)
    for _h, p, size in found:
        if total >= target:
            break
        dst = root / os.path.relpath(p, base)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        except OSError:
            continue
        total += size
        n += 1
    return n


def holder_pid(sock: str) -> int | None:
    """The fanotify fd holder serving socket `sock` (it runs in its own session, so it is
    not a child to wait for): found by the socket path on its command line."""
    needle = os.fsencode(sock)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"fscache_daemon.frontend.fdholder" in args and needle in args:
            return int(d)
    return None
