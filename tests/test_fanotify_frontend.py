"""fanotify pre-content front end on the real kernel: event loop, EROFS lazy reads, holder.

Readers always run in child processes with timeouts: a reader blocked on an unanswered
pre-content event sits in a killable kernel wait, which only SIGKILL ends, so a broken
watcher must never be able to hang the pytest process itself.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import pytest

from fscache_daemon.errors import FanotifyUnsupportedError, FrontendError
from fscache_daemon.frontend import fanotify_abi as abi
from fscache_daemon.frontend.fanotify import PreContentWatcher

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _missing(msg: str):
    helpers.require(False, msg)  # skip, or fail under EROFS_TOOLS_CI=1


# --------------------------------------------------------------------------- unit (no root)


def _event(fd, mask=abi.FAN_PRE_ACCESS, pid=7, records=b""):
    meta_len = abi.METADATA_LEN
    return struct.pack("=IBBHQii", meta_len + len(records), 3, 0, meta_len, mask, fd,
                       pid) + records


def _range(offset, count):
    return struct.pack("=BBHIQQ", abi.FAN_EVENT_INFO_TYPE_RANGE, 0, 24, 0, offset, count)


def test_parse_events_walks_records():
    buf = (_event(5, records=_range(4096, 8192))
           + _event(6, records=struct.pack("=BBH", 99, 0, 8) + b"\0" * 4 + _range(0, 4096))
           + _event(7, records=struct.pack("=BBHI", 6, 0, 8, 0)))  # short range record
    evs = abi.parse_events(buf)
    assert [(e.fd, e.offset, e.count) for e in evs] == [(5, 4096, 8192), (6, 0, 4096),
                                                        (7, None, None)]
    assert not evs[0].overflow


def test_parse_events_rejects_broken_stream():
    with pytest.raises(FrontendError):
        abi.parse_events(_event(5)[:20])
    bad_version = bytearray(_event(5))
    bad_version[4] = 2
    with pytest.raises(FrontendError):
        abi.parse_events(bytes(bad_version))
    assert abi.FAN_DENY_ERRNO(errno.EIO) == 0x05000002
    assert abi.encode_response(9, abi.FAN_ALLOW) == struct.pack("=iI", 9, 1)


# ------------------------------------------------------------------------------ fixtures


def _takes_marks(d: Path) -> bool:
    probe = d / "probe"
    probe.write_bytes(b"x")
    g = abi.fanotify_init()
    try:
        abi.mark_pre_access(g, probe)
        return True
    except FanotifyUnsupportedError:
        return False
    finally:
        os.close(g)
        probe.unlink()


@pytest.fixture
def workdir(tmp_path):
    """A directory on a filesystem that accepts pre-content marks (ext4/XFS/btrfs).

    tmp_path first; if it is on tmpfs, a directory under /var/tmp; else skip/fail.
    """
    import tempfile

    if os.geteuid() != 0:
        _missing("needs root (CAP_SYS_ADMIN) for pre-content fanotify")
    try:
        if _takes_marks(tmp_path):
            yield tmp_path
            return
    except FanotifyUnsupportedError as exc:  # from fanotify_init: the kernel lacks it
        _missing(str(exc))
    alt = Path(tempfile.mkdtemp(prefix="fanotify-test-", dir="/var/tmp"))
    try:
        if not _takes_marks(alt):
            _missing(f"neither {tmp_path} nor /var/tmp take pre-content marks")
        yield alt
    finally:
        shutil.rmtree(alt, ignore_errors=True)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _blob_and_cache(workdir: Path, size: int):
    """Random blob bytes, the blob file, an empty sparse cache file of the same size and
    a filler copying from the blob."""
    data = os.urandom(size)
    blob = workdir / "blob"
    blob.write_bytes(data)
    return data, blob, _sparse(workdir / "cache", size), BlobFiller(blob)


def _kill(*procs: subprocess.Popen) -> None:
    """SIGKILL those of `procs` still running, and reap them."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _stop(holder: subprocess.Popen) -> None:
    """SIGTERM the fd holder, which must exit 0."""
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=10) == 0


def _cat(path, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=timeout)


def _pread_child(path, offset, length) -> subprocess.Popen:
    code = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
            "try:\n sys.stdout.buffer.write(os.pread(fd,int(sys.argv[3]),int(sys.argv[2])))\n"
            "except OSError as e:\n sys.stderr.write(str(e.errno)); sys.exit(3)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(offset), str(length)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class BlobFiller:
    """A fill callback that copies ranges from the real blob, optionally failing."""

    def __init__(self, blob: Path):
        self.blob = blob.read_bytes()
        self.watcher: PreContentWatcher | None = None
        self.calls: list[tuple[object, int, int]] = []
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, key, offset, length):
        with self.lock:
            self.calls.append((key, offset, length))
        if self.fail:
            raise OSError(errno.EIO, "backend down")
        os.pwrite(self.watcher.writer_fd(key), self.blob[offset:offset + length], offset)


# ------------------------------------------------------------------------ plain-file loop


@pytest.mark.root
def test_plain_file_event_loop(workdir):
    data, blob, cache, filler = _blob_and_cache(workdir, 64 * 1024)
    cached: set[int] = set()

    def fast(key, off, length):
        return all(p in cached for p in range(off, off + length, 4096))

    def fill(key, off, length):
        filler(key, off, length)
        cached.update(range(off, off + length, 4096))

    with ThreadPoolExecutor(2) as pool, PreContentWatcher(fill, executor=pool,
                                                          fast_path=fast) as w:
        filler.watcher = w
        w.mark(cache, "k")
        w.start()
        p = _pread_child(cache, 5000, 100)
        out, _ = p.communicate(timeout=10)
        assert out == data[5000:5100]
        assert filler.calls == [("k", 4096, 4096)]  # page-aligned range
        # same page again: answered by the fast path, no fill
        p = _pread_child(cache, 4200, 10)
        assert p.communicate(timeout=10)[0] == data[4200:4210]
        assert len(filler.calls) == 1 and w.stats["fast"] == 1
        # a failing fill denies with EIO
        filler.fail = True
        p = _pread_child(cache, 40000, 10)
        _, err = p.communicate(timeout=10)
        assert p.returncode == 3 and err == str(errno.EIO).encode()
        filler.fail = False
        # range past EOF is clamped
        p = _pread_child(cache, 65000, 4096)
        assert p.communicate(timeout=10)[0] == data[65000:]
        assert filler.calls[-1] == ("k", 61440, 4096)
        # unmarked: no more events (and the hole reads as zeros, as it would unprotected)
        n = w.stats["events"]
        w.unmark("k")
        p = _pread_child(cache, 20000, 8)
        assert p.communicate(timeout=10)[0] == b"\0" * 8
        assert w.stats["events"] == n


@pytest.mark.root
def test_marks_follow_inodes_not_paths(workdir):
    """A cache file replaced at its path is a new file: it gets its own mark and writer."""
    data, blob, cache, filler = _blob_and_cache(workdir, 16384)
    with PreContentWatcher(filler) as w:
        filler.watcher = w
        w1 = w.mark(cache, "k")
        assert w.mark(cache, "k") == w1  # idempotent
        w.start()
        old = os.open(cache, os.O_RDONLY)  # like a mount still using the old file
        try:
            os.unlink(cache)
            _sparse(cache, len(data))
            w2 = w.mark(cache, "k")
            assert w2 != w1 and os.fstat(w2).st_ino != os.fstat(w1).st_ino
            assert _pread_child(cache, 4096, 8).communicate(timeout=10)[0] == data[4096:4104]
            # the old inode keeps its mark: its reader gets EIO, never zeros
            p = subprocess.Popen([sys.executable, "-c",
                                  f"import os,sys\ntry: os.pread({old},8,0)\n"
                                  "except OSError as e: sys.exit(e.errno)"],
                                 pass_fds=[old])
            assert p.wait(timeout=10) == errno.EIO
            assert sorted(w.channel._marks.paths()) == [str(cache)] * 2
            w.unmark("k")
            assert w.channel._marks.paths() == [str(cache)]  # the old inode's mark
        finally:
            os.close(old)


@pytest.mark.root
def test_writes_through_writer_fd_raise_no_events(workdir):
    """Kernel behaviour the fill contract rests on (measured, see docs/fanotify.md)."""
    cache = _sparse(workdir / "cache", 16384)
    seen = []
    with PreContentWatcher(lambda k, o, n: seen.append((o, n))) as w:
        wfd = w.mark(cache, "k")
        w.start()
        os.pwrite(wfd, b"a" * 4096, 0)  # opened before the mark: silent
        # an fd opened after the mark raises an event for its own write; events arrive
        # in order, so that one being the only event seen proves the first was silent
        subprocess.run([sys.executable, "-c",
                        "import os,sys; fd=os.open(sys.argv[1],os.O_WRONLY);"
                        "os.pwrite(fd,b'b'*10,8192)", str(cache)], check=True, timeout=10)
        assert seen == [(8192, 4096)]


@pytest.mark.root
def test_kernel_keeps_inflight_events_of_dead_reader(workdir):
    """Measured: events read by a process that dies are neither re-queued nor answered.

    The reader stays blocked; a response written later with the dead process's event fd
    number (by anyone holding the group) releases it. This is why the holder, not the
    daemon, reads the events.
    """
    cache = _sparse(workdir / "cache", 65536)
    g = abi.fanotify_init()
    wfd = os.open(cache, os.O_RDWR)
    abi.mark_pre_access(g, cache)
    reader = dead = None
    try:
        code = ("import os,sys; g=int(sys.argv[1]); b=os.read(g,4096);"
                "print(int.from_bytes(b[16:20],'little',signed=True),flush=True);"
                "import time; time.sleep(60)")
        dead = subprocess.Popen([sys.executable, "-c", code, str(g)], pass_fds=[g],
                                stdout=subprocess.PIPE)
        reader = _pread_child(cache, 0, 8)
        event_fd = int(dead.stdout.readline())
        dead.kill()
        dead.wait()         # its group fd is closed by now: a release would have happened
        assert reader.poll() is None, "reader was released when the event reader died"
        assert helpers.blocked_in_fanotify(reader.pid), helpers.wchan(reader.pid)
        p = select.poll()
        p.register(g, select.POLLIN)
        assert p.poll(300) == [], "event was re-queued"
        os.pwrite(wfd, b"realdata", 0)
        assert abi.write_response(g, event_fd, abi.FAN_ALLOW)
        assert reader.communicate(timeout=10)[0] == b"realdata"
        assert not abi.write_response(g, event_fd, abi.FAN_ALLOW)  # ENOENT: answered
    finally:
        for proc in (dead, reader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        os.close(g)
        os.close(wfd)


# ---------------------------------------------------------------------------- EROFS mount


def _mount_erofs(image: Path, mnt: Path, devices: list[Path]) -> None:
    # mount(2) directly: util-linux mount would put the image on a loop device, and loop
    # reads bypass the pre-content hook
    helpers.require_root_kernel()
    opts = ",".join(f"device={d}" for d in devices)
    try:
        helpers.sys_mount(image, mnt, "erofs", helpers.MS_RDONLY, opts)
    except OSError as exc:
        if exc.errno == errno.ENOTBLK:
            _missing("kernel lacks file-backed EROFS mounts (6.12+)")
        raise


def _umount(mnt: Path) -> None:
    try:
        helpers.sys_umount(mnt)
    except OSError:
        helpers.sys_umount(mnt, lazy=True)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def erofs_image(workdir):
    """(meta image, blob, source tree) from mkfs.erofs --chunksize=4096 --blobdev."""
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        _missing("mkfs.erofs not installed (apt-get install erofs-utils)")
    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    rnd = os.urandom(400_000)
    (src / "big.bin").write_bytes(rnd[:300_000])
    (src / "a.bin").write_bytes(rnd[300_000:320_000])
    (src / "d" / "b.bin").write_bytes(rnd[320_000:329_000])
    (src / "small.txt").write_bytes(b"hello, lazy world\n")
    meta, blob = workdir / "meta.img", workdir / "blob.img"
    subprocess.run([mkfs, "--chunksize=4096", f"--blobdev={blob}", str(meta), str(src)],
                   check=True, capture_output=True, timeout=60)
    return meta, blob, src


def _files(src: Path) -> list[Path]:
    return sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())


@pytest.mark.root
def test_erofs_lazy_read_fill_deny_and_unmark(workdir, erofs_image):
    meta, blob, src = erofs_image
    cache = _sparse(workdir / "cache.img", blob.stat().st_size)
    mnt = workdir / "mnt"
    mnt.mkdir()
    filler = BlobFiller(blob)
    with ThreadPoolExecutor(4) as pool, PreContentWatcher(filler, executor=pool) as w:
        filler.watcher = w
        w.mark(cache, "blob0")  # mark first, mount second
        w.start()
        _mount_erofs(meta, mnt, [cache])
        try:
            # metadata comes from the unmarked bootstrap: no events
            assert sorted(p.relative_to(mnt) for p in mnt.rglob("*") if p.is_file()) \
                == _files(src)
            assert w.stats["events"] == 0
            # deny path: the reader gets EIO, never zeros
            filler.fail = True
            r = _cat(mnt / "a.bin")
            assert r.returncode != 0 and b"Input/output error" in r.stderr
            filler.fail = False
            # lazy reads are filled from the real blob; a.bin is retried after the EIO
            for rel in _files(src):
                r = _cat(mnt / rel)
                assert r.returncode == 0, r.stderr
                assert r.stdout == (src / rel).read_bytes(), rel
            assert filler.calls and w.stats["filled"] >= 2
            assert all(o % 4096 == 0 for _, o, _ in filler.calls)
            # complete the cache file, drop the mark: the kernel serves everything alone
            os.pwrite(w.writer_fd("blob0"), filler.blob, 0)
            os.fsync(w.writer_fd("blob0"))
            w.unmark("blob0")
            events = w.stats["events"]
            _drop_caches()
            for rel in _files(src):
                assert _cat(mnt / rel).stdout == (src / rel).read_bytes(), rel
            assert w.stats["events"] == events
        finally:
            _umount(mnt)


# ----------------------------------------------------------------------------- fd holder


_DAEMON = r"""
import logging, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from fscache_daemon.frontend.fanotify import PreContentWatcher
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
sock, cache, blob, mode = sys.argv[1:5]
data = open(blob, "rb").read()
w = None
def fill(key, off, length):
    print("EVENT", off, length, flush=True)
    if mode == "hang":
        time.sleep(3600)
    os.pwrite(w.writer_fd(key), data[off:off + length], off)
w = PreContentWatcher.from_holder(sock, fill, executor=ThreadPoolExecutor(4))
w.mark(cache, "blob0")
print("READY", flush=True)
w.run()
"""


def _spawn_daemon(sock, cache, blob, mode) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _DAEMON, str(sock), str(cache), str(blob),
                          mode], stdout=subprocess.PIPE, env=CHILD_ENV, text=True)
    line = p.stdout.readline()
    assert line.strip() == "READY", line
    return p


def _wait_sock(sock: Path, holder: subprocess.Popen) -> None:
    import socket
    deadline = time.monotonic() + helpers.HANG     # a python start-up: a hang bound only
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(str(sock))
            return
        except OSError:
            assert holder.poll() is None, "fd holder exited"
            assert time.monotonic() < deadline, "fd holder did not start"
            time.sleep(0.05)
        finally:
            s.close()


@pytest.mark.root
def test_holder_protocol_errors(workdir, monkeypatch):
    from fscache_daemon.errors import HolderError
    from fscache_daemon.frontend import fdholder
    from fscache_daemon.frontend.fdholder import HolderChannel

    monkeypatch.setattr(fdholder, "SUBSCRIBE_TIMEOUT", 0.3)

    sock = workdir / "holder.sock"
    holder = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV)
    try:
        _wait_sock(sock, holder)
        # a second holder on the same socket refuses to start
        assert subprocess.run([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV, capture_output=True,
                              timeout=30).returncode == 1
        a, b = HolderChannel(str(sock)), HolderChannel(str(sock))
        try:
            assert a.holder_pid == holder.pid and a.group_fd >= 0
            a.fileno()  # subscribes
            with pytest.raises(HolderError, match="another daemon"):
                b.fileno()
            with pytest.raises(HolderError):
                a.mark(str(workdir / "missing"))
            if Path("/dev/shm").is_dir():
                shm = Path("/dev/shm") / f"fanotify-test-{os.getpid()}"
                shm.write_bytes(b"x")
                try:
                    with pytest.raises(FanotifyUnsupportedError):
                        a.mark(str(shm))
                finally:
                    shm.unlink()
            st = a.status()
            assert st["marks"] == [] and st["subscribed"] and st["pending"] == 0
        finally:
            a.close()
            b.close()
        _stop(holder)  # no marks: exits cleanly
        assert not sock.exists()
    finally:
        _kill(holder)


@pytest.mark.root
def test_holder_keeps_readers_waiting_across_daemon_sigkill(workdir, erofs_image):
    from fscache_daemon.frontend.fdholder import HolderChannel

    meta, blob, src = erofs_image
    cache = _sparse(workdir / "cache.img", blob.stat().st_size)
    sock, mnt = workdir / "holder.sock", workdir / "mnt"
    mnt.mkdir()
    holder = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV)
    procs = []
    mounted = False
    try:
        _wait_sock(sock, holder)
        d1 = _spawn_daemon(sock, cache, blob, "hang")
        procs.append(d1)
        _mount_erofs(meta, mnt, [cache])
        mounted = True
        reader = subprocess.Popen(["cat", str(mnt / "big.bin")], stdout=subprocess.PIPE)
        procs.append(reader)
        assert d1.stdout.readline().startswith("EVENT")  # d1 holds the event, stuck
        d1.kill()
        d1.wait()
        # a read that starts while no daemon runs queues in the holder and waits too
        late = subprocess.Popen(["cat", str(mnt / "a.bin")], stdout=subprocess.PIPE)
        procs.append(late)
        # both events are held by the holder, unanswered (the first was d1's)
        helpers.wait_holder_pending(sock, at_least=2)
        assert reader.poll() is None, "reader finished while no daemon ran"
        assert late.poll() is None, "late reader finished while no daemon ran"
        # the holder refuses to exit while the cache file is marked
        holder.send_signal(signal.SIGTERM)
        # the holder handles the signal in its poll loop (self-pipe) before it answers
        # the second request after it: answering both means it refused to exit
        for _ in range(2):
            assert helpers.holder_status(sock)["marks"]
        assert holder.poll() is None
        d2 = _spawn_daemon(sock, cache, blob, "ok")
        procs.append(d2)
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0
        assert out == (src / "big.bin").read_bytes()  # never zeros
        assert late.communicate(timeout=30)[0] == (src / "a.bin").read_bytes()
        # concurrent readers through the new daemon's worker threads
        readers = [subprocess.Popen(["cat", str(mnt / rel)], stdout=subprocess.PIPE)
                   for rel in _files(src) * 2]
        procs.extend(readers)
        for rel, r in zip(_files(src) * 2, readers):
            assert r.communicate(timeout=30)[0] == (src / rel).read_bytes(), rel
        d2.kill()
        d2.wait()
        _umount(mnt)
        mounted = False
        ch = HolderChannel(str(sock))
        try:
            assert ch.status()["pending"] == 0
            ch.unmark(str(cache))
        finally:
            ch.close()
        _stop(holder)
    finally:
        _kill(*procs)
        if mounted:
            _umount(mnt)
        _kill(holder)  # fails open, but nothing is mounted or reading any more


@pytest.mark.root
def test_holder_resends_backlog_without_deadlock(workdir, monkeypatch):
    """A daemon that read events but never answered them (it hung, then died) leaves a
    backlog; the next daemon gets all of it re-sent while new events keep coming."""
    from fscache_daemon.frontend import fdholder

    # 3072 events = 48 messages of ~6 KB: more than a unix socket buffers (~208 KB), so
    # a holder that blocks while sending deadlocks with a daemon sending it answers
    data = os.urandom(12 << 20)
    cache = workdir / "cache"
    cache.write_bytes(data)  # complete, still marked: every event takes the fast path
    sock = workdir / "holder.sock"
    holder = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV)

    def answer_without_telling(self, ev, response):
        # stands in for a daemon whose answers are lost: release the reader (dd) through
        # our group dup so the test can go on, but leave the holder's event pending
        try:
            abi.write_response(self.group_fd, ev.token, response)
        finally:
            os.close(ev.fd)

    def dd():
        r = subprocess.run(["dd", f"if={cache}", "of=/dev/null", "bs=4096"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr

    try:
        _wait_sock(sock, holder)
        with monkeypatch.context() as m:
            m.setattr(fdholder.HolderChannel, "answer", answer_without_telling)
            w1 = PreContentWatcher.from_holder(sock, None, fast_path=lambda *a: True)
            w1.mark(cache, "k")
            w1.start()
            dd()
            w1.close()
        n = len(data) // 4096
        assert w1.stats["fast"] >= n
        w2 = PreContentWatcher.from_holder(sock, None, fast_path=lambda *a: True)
        w2.mark(cache, "k")
        w2.start()
        dd()
        assert w2.stats["fast"] >= 2 * n  # the backlog plus its own events
        ch = fdholder.HolderChannel(str(sock))
        try:
            # the backlog drains as the daemon answers it: a hang bound only
            deadline = time.monotonic() + helpers.HANG
            while ch.status()["pending"]:
                assert time.monotonic() < deadline, "backlog never drained"
                time.sleep(0.05)
            w2.unmark("k")
        finally:
            ch.close()
            w2.close()
        _stop(holder)
    finally:
        _kill(holder)


# ----------------------------------------------------------- holder fast path (filled map)


def test_filled_map_matches_a_block_set():
    import random

    from fscache_daemon.frontend.fanotify import FilledMap, FilledView

    size = 1_000_000 + 123
    nblocks = -(-size // 4096)
    fm = FilledMap(size)
    view = FilledView(os.dup(fm.fd), size)
    ref: set[int] = set()
    r = random.Random(3)
    try:
        for _ in range(400):
            if r.random() < 0.3:
                off, n = r.randrange(size), r.randrange(1, 200_000)
                fm.set_range(off, n)
                ref.update(range(off // 4096, min(nblocks, -(-(off + n) // 4096))))
            off, n = r.randrange(size + 8192), r.randrange(300_000)
            start, end = min(off, size), min(off + n, size)
            want = end > start and all(b in ref for b in range(start // 4096,
                                                                (end - 1) // 4096 + 1))
            assert view.covers(off, n) == want == fm.covers(off, n), (off, n)
    finally:
        view.close()
        fm.close()


def test_filled_view_refuses_unsealed_or_short_memfd():
    from fscache_daemon.frontend.fanotify import FilledMap, FilledView

    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64)
    with pytest.raises(FrontendError, match="sealed"):
        FilledView(fd, 4096)  # closes fd
    fm = FilledMap(4096 * 8)  # one byte
    try:
        with pytest.raises(FrontendError, match="needed"):
            FilledView(os.dup(fm.fd), 4096 * 8 * 4096)
    finally:
        fm.close()


@pytest.mark.root
def test_holder_allows_filled_ranges_itself_and_forwards_the_rest(workdir):
    from fscache_daemon.frontend.fanotify import FilledMap
    from fscache_daemon.frontend.fdholder import HolderChannel

    data, blob, cache, filler = _blob_and_cache(workdir, 64 * 1024)
    sock = workdir / "holder.sock"
    holder = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV)
    fm = None
    procs = []

    def holder_stats():
        ch = HolderChannel(str(sock))
        try:
            return ch.status()
        finally:
            ch.close()

    try:
        _wait_sock(sock, holder)
        with ThreadPoolExecutor(2) as pool:
            w = PreContentWatcher.from_holder(sock, filler, executor=pool)
            filler.watcher = w
            with open(cache, "rb") as f:
                fm = FilledMap.for_file(f.fileno())
            wfd = w.mark(cache, "k", filled=fm)
            w.start()
            assert holder_stats()["filled_maps"] == 1
            # blocks 0-3 written (through the writer fd), then published
            os.pwrite(wfd, data[:16384], 0)
            fm.set_range(0, 16384)
            for off, n in ((0, 8192), (5000, 100), (12288, 4096)):
                p = _pread_child(cache, off, n)
                assert p.communicate(timeout=20)[0] == data[off:off + n]
            st = holder_stats()
            assert filler.calls == [] and w.stats["events"] == 0  # the daemon saw nothing
            assert st["stats"]["allowed_filled"] >= 3 and st["stats"]["forwarded"] == 0
            # partly filled (block 4 is not): forwarded, filled by the daemon
            p = _pread_child(cache, 12288, 8192)
            assert p.communicate(timeout=20)[0] == data[12288:20480]
            assert filler.calls and all(off + n > 16384 for _, off, n in filler.calls)
            assert holder_stats()["stats"]["forwarded"] >= 1
            # the bitmap dies with the daemon's connection: a filled range then waits
            w.close()
            assert holder_stats()["filled_maps"] == 0
            p = _pread_child(cache, 0, 4096)
            procs.append(p)
            helpers.wait_until(lambda: holder_stats()["pending"] >= 1, 30,
                               "the filled-range event pending in the holder")
            assert p.poll() is None, "filled range allowed with no daemon connected"
            assert helpers.blocked_in_fanotify(p.pid), helpers.wchan(p.pid)
            filler.calls.clear()
            w2 = PreContentWatcher.from_holder(sock, filler, executor=pool)
            filler.watcher = w2
            w2.mark(cache, "k")  # no map: every event goes to the daemon
            w2.start()
            assert p.communicate(timeout=20)[0] == data[:4096]
            assert filler.calls == [("k", 0, 4096)]
            w2.unmark("k")
            w2.close()
        _stop(holder)
    finally:
        _kill(*procs)
        if fm is not None:
            fm.close()
        _kill(holder)


@pytest.mark.root
def test_holder_refuses_filled_map_of_another_inode_or_unsealed(workdir):
    from fscache_daemon.frontend.fanotify import FilledMap
    from fscache_daemon.frontend.fdholder import HolderChannel

    cache = _sparse(workdir / "cache", 1 << 20)
    other = _sparse(workdir / "other", 1 << 20)
    sock = workdir / "holder.sock"
    holder = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                               "--sock", str(sock)], env=CHILD_ENV)
    maps = []
    try:
        _wait_sock(sock, holder)
        ch = HolderChannel(str(sock))
        try:
            with open(other, "rb") as f:
                maps.append(FilledMap.for_file(f.fileno()))
            ch.mark(str(cache), filled=maps[-1])  # the mark stands, the map is refused
            st = ch.status()
            assert st["marks"] == [str(cache)] and st["filled_maps"] == 0

            class Unsealed:  # a memfd whose size could change under the holder
                inode = None
                fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)

            os.ftruncate(Unsealed.fd, 64)
            ch.mark(str(cache), filled=Unsealed)
            os.close(Unsealed.fd)
            assert ch.status()["filled_maps"] == 0
            with open(cache, "rb") as f:
                maps.append(FilledMap.for_file(f.fileno()))
            ch.mark(str(cache), filled=maps[-1])
            assert ch.status()["filled_maps"] == 1
            ch.unmark(str(cache))
            assert ch.status()["filled_maps"] == 0
        finally:
            ch.close()
        _stop(holder)
    finally:
        for m in maps:
            m.close()
        _kill(holder)
