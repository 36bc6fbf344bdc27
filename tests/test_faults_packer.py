"""Packer faults: `erofs-tools pack` (and `mkfs`) interrupted by SIGINT or SIGKILL at
random points of their work phase (after 1-25 % of the bytes a whole run writes, before
it ends: every run must be interrupted), and run out of space on the
output file system. Whatever is left under a
final name (the bootstrap path, a 64-hex blob name, the image path) must be complete and
valid; everything else must be a clearly temporary file (hidden, `.tmp`), and after
SIGINT/ENOSPC none may be left at all.

FAULTS_PACK_INTERRUPTS (default 6) sets the interrupts per command."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from faults import env_int

from erofs_tools.reader import blob as rblob

INTERRUPTS = env_int("FAULTS_PACK_INTERRUPTS", 6)
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("packsrc")
    r = random.Random(7)
    for d in range(8):
        os.makedirs(root / f"d{d}")
        for i in range(40):
            # compressible and incompressible halves: zstd has real work to do
            size = r.randint(1, 200_000)
            data = r.randbytes(size // 2) + bytes(size - size // 2)
            (root / f"d{d}" / f"f{i}").write_bytes(data)
    # a work phase long enough to aim a signal into it
    (root / "big").write_bytes(r.randbytes(96 << 20))
    return str(root)


def _cmd(kind, src, out):
    if kind == "pack":
        os.makedirs(os.path.join(out, "blobs"), exist_ok=True)
        return [sys.executable, "-m", "erofs_tools", "pack", "-B", os.path.join(out, "app.boot"),
                "-D", os.path.join(out, "blobs"), "--chunk-size", "0x10000", src]
    return [sys.executable, "-m", "erofs_tools", "mkfs", os.path.join(out, "app.img"), src]


def _leftovers(out):
    """(final-named files, temporary files) under `out`."""
    final, temp = [], []
    for d, _dirs, files in os.walk(out):
        for n in files:
            p = os.path.join(d, n)
            if n in ("app.boot", "app.img") or HEX64.match(n):
                final.append(p)
            else:
                temp.append(p)
    return final, temp


def _check_final(paths):
    """Every final-named output is complete: blobs parse and every chunk verifies,
    bootstraps/images pass `erofs-tools check` (with their blobs)."""
    for p in paths:
        name = os.path.basename(p)
        if HEX64.match(name):
            meta = rblob.open_blob(p, blob_id=name)
            with open(p, "rb") as f:
                read_at = rblob.file_reader(f)
                for c in meta.chunks:
                    rblob.read_chunk(meta, c, read_at)
        else:
            args = [sys.executable, "-m", "erofs_tools", "check", p]
            blob_dir = os.path.join(os.path.dirname(p), "blobs")
            if name == "app.boot":
                args += ["--blob-dir", blob_dir]
            r = subprocess.run(args, capture_output=True, text=True)
            assert r.returncode == 0, (p, r.stdout, r.stderr)


def _written(out):
    """Bytes stored so far under `out` (blocks allocated to every file, temporary or
    final): what the run has written, however (mkfs copies file data with
    copy_file_range, which /proc/PID/io does not count)."""
    n = 0
    for d, _dirs, files in os.walk(out):
        for f in files:
            try:
                n += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:      # renamed or removed meanwhile
                pass
    return n


def _stopped(pid):
    """The process is stopped (every thread: SIGSTOP stops the whole group)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


def _stop_at_written(p, out, target, final_name, timeout=120.0):
    """Stop process `p` (SIGSTOP) once it has stored `target` bytes under `out`. -> True
    when it is stopped in its work phase: still running and its last output
    (`final_name`, renamed into place after the last byte) not there yet; False when it
    got there first (it was resumed, and left to end). A point given by the work done,
    not by a clock (CI once saw a signal aimed by time at 25 % of the work land after
    the last rename), and held still while the test looks: the gap between seeing the
    bytes and signalling is the test's to be descheduled in (a loaded machine once let
    mkfs copy its last 75 % and end in it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            return False
        if _written(out) >= target:
            p.send_signal(signal.SIGSTOP)
            while p.poll() is None and not _stopped(p.pid):
                time.sleep(0.0005)
            if p.poll() is None and not os.path.exists(os.path.join(out, final_name)):
                return True
            p.send_signal(signal.SIGCONT)
            return False
        time.sleep(0.001)
    raise AssertionError(f"{p.args[:4]}: stalled before writing {target} bytes")


def _output_bytes(kind, tree, tmp_path):
    """Bytes an uninterrupted run leaves under its final names: what it must write
    before it can end."""
    out = str(tmp_path / f"full-{kind}")
    os.makedirs(out)
    r = subprocess.run(_cmd(kind, tree, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    final, temp = _leftovers(out)
    assert final and not temp, (final, temp)
    total = sum(os.path.getsize(f) for f in final)
    shutil.rmtree(out)
    return total


@pytest.fixture
def sigint_default():
    """SIGINT as from a terminal even when this run inherited it ignored (a runner started
    in the background of a non-interactive shell): Python in a child turns it into
    KeyboardInterrupt only if the child starts with the default disposition, which a
    handler in this process gives it (an ignored one would be inherited). Set here, not
    in a preexec_fn: that one runs between fork and exec of a threaded process."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("kind", ["pack", "mkfs"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted(kind, sig, tree, tmp_path, sigint_default):
    total = _output_bytes(kind, tree, tmp_path)
    rnd = random.Random(f"{kind}{sig}")
    summary = {"interrupted": 0, "finished": 0, "temp_left": 0}
    final_name = "app.boot" if kind == "pack" else "app.img"
    for n in range(INTERRUPTS):
        out = str(tmp_path / f"run{n}")
        # SIGINT during interpreter start-up is Python's business: aim at the work, at a
        # random point of its first 25 % by bytes stored (its outputs are renamed to
        # their final names only after the last byte). A run that gets past the point
        # and ends before it is stopped there is run again (at most twice), uncounted
        for _attempt in range(3):
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            p = subprocess.Popen(_cmd(kind, tree, out), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            if _stop_at_written(p, out, int(total * rnd.uniform(0.01, 0.25)), final_name):
                break
            p.communicate(timeout=120)
            assert p.returncode == 0, p.returncode
            summary["ended_first"] = summary.get("ended_first", 0) + 1
        else:
            raise AssertionError(f"{kind} ended before the signal in 3 runs: {summary}")
        p.send_signal(sig)
        p.send_signal(signal.SIGCONT)
        stdout, stderr = p.communicate(timeout=120)
        final, temp = _leftovers(out)
        if p.returncode == 0:
            summary["finished"] += 1
            assert not temp, temp
        else:
            summary["interrupted"] += 1
            if sig == signal.SIGINT:
                assert p.returncode in (1, 130, -signal.SIGINT), (p.returncode, stderr)
                assert "Traceback" not in stderr, stderr
                assert not temp, f"temporary files left after SIGINT: {temp}"
            else:
                summary["temp_left"] += bool(temp)
                for t in temp:        # clearly temporary: hidden and ending in .tmp
                    b = os.path.basename(t)
                    assert b.startswith(".") and b.endswith(".tmp"), t
        # whatever carries a final name is complete (a signal that lands after the last
        # rename finds a finished image: then it must check clean with all its blobs)
        if any(os.path.basename(f) in ("app.boot", "app.img") for f in final):
            summary["complete_before_signal"] = summary.get("complete_before_signal", 0) + 1
        _check_final(final)
        shutil.rmtree(out)
    print(f"{kind} {signal.Signals(sig).name}: output {total} bytes, {summary}")
    # every signal landed in the work phase and interrupted it
    assert summary["interrupted"] == INTERRUPTS, summary


def _small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)


@pytest.mark.root
@pytest.mark.parametrize("kind", ["pack", "mkfs"])
@pytest.mark.parametrize("room", [1 << 20, 8 << 20], ids=["1M", "8M"])
def test_output_disk_full(kind, room, tree, tmp_path):
    import helpers
    helpers.require(helpers.is_root(), "needs root (mount tmpfs)")
    out = str(tmp_path / "out")
    _small_tmpfs(out, room)
    try:
        r = subprocess.run(_cmd(kind, tree, out), capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert "No space left on device" in r.stderr or "ENOSPC" in r.stderr, r.stderr
        final, temp = _leftovers(out)
        assert not temp, temp
        assert not any(os.path.basename(f) in ("app.boot", "app.img") for f in final), final
        _check_final(final)
    finally:
        subprocess.run(["umount", out], check=False)
