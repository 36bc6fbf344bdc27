"""Host-side tests of the cachefiles protocol layer and the front end's dispatch logic.

These parse message bytes built from the uapi layouts and drive the front end with a fake
device whose "anon fds" are ordinary files; they test parsing and bookkeeping, not the
kernel. The real thing runs in QEMU: vm-tests/tests/test_cachefiles.py.
"""
import errno
import os
import struct
import threading
import time

import pytest
from helpers import HANG

from fscache_daemon.frontend import cachefiles as cf
from fscache_daemon.frontend import cachefiles_proto as proto


# --- message layouts ------------------------------------------------------------------
def test_ioctl_number():
    assert proto.IOC_READ_COMPLETE == 0x40049801


def test_parse_open_bytes_from_uapi_layout():
    # An OPEN laid out by hand from include/uapi/linux/cachefiles.h (struct
    # cachefiles_msg + cachefiles_open) as the kernel would send it for `mount -t erofs
    # none -o fsid=meta,domain_id=d1`: msg_id 3, object 1, volume key "erofs,d1\0" (9),
    # cookie key "meta" (4), fd 7. Not captured from a kernel: the VM suite
    # (vm-tests/tests/test_cachefiles.py) parses the kernel's own messages.
    raw = (struct.pack("<IIII", 3, 0, 32 + 9 + 4, 1) + struct.pack("<IIII", 9, 4, 7, 0)
           + b"erofs,d1\0" + b"meta")
    assert raw == proto.build_open(3, 1, b"erofs,d1", b"meta", 7)
    m = proto.parse_message(raw)
    assert isinstance(m, proto.OpenMsg)
    assert (m.msg_id, m.object_id, m.fd, m.flags) == (3, 1, 7, 0)
    assert m.volume_key == "erofs,d1" and m.volume_name == "d1" and m.cookie_key == "meta"


def test_parse_open_blob_cookie():
    blob = b"be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    m = proto.parse_message(proto.build_open(10, 2, b"erofs,myfsid", blob, 12))
    assert m.cookie_key == blob.decode() and m.volume_name == "myfsid"
    assert len(proto.build_open(10, 2, b"erofs,myfsid", blob, 12)) == 32 + 13 + 64


def test_parse_read_and_close():
    raw = struct.pack("<IIIIQQ", 9, 2, 32, 4, 0x20000, 0x1000)
    m = proto.parse_message(raw)
    assert isinstance(m, proto.ReadMsg)
    assert (m.msg_id, m.object_id, m.off, m.len) == (9, 4, 0x20000, 0x1000)
    c = proto.parse_message(struct.pack("<IIII", 11, 1, 16, 4))
    assert isinstance(c, proto.CloseMsg) and (c.msg_id, c.object_id) == (11, 4)


@pytest.mark.parametrize("raw", [
    b"",
    b"\0" * 15,
    struct.pack("<IIII", 1, 2, 40, 1),                     # len says 40, got 16
    struct.pack("<IIII", 1, 7, 16, 1),                     # unknown opcode
    struct.pack("<IIII", 1, 1, 20, 1) + b"\0" * 4,          # CLOSE with a body
    struct.pack("<IIIIQ", 1, 2, 24, 1, 0),                  # short READ
    struct.pack("<IIII", 1, 0, 40, 1) + struct.pack("<IIII", 9, 4, 3, 0) + b"x" * 8,
])
def test_parse_rejects_malformed(raw):
    with pytest.raises(proto.ProtocolError):
        proto.parse_message(raw)


def test_commands():
    assert proto.format_copen(7, 20480) == b"copen 7,20480"
    assert proto.format_copen(7, -errno.ENOENT) == b"copen 7,-2"
    assert proto.format_command("bind", "ondemand") == b"bind ondemand"
    assert proto.format_command("restore") == b"restore"
    with pytest.raises(ValueError):
        proto.format_command("dir", "/a\nb")
    with pytest.raises(ValueError):
        proto.format_command("dir", "x" * 5000)


def test_mount_options():
    assert cf.mount_options("abc") == "fsid=abc"
    assert cf.mount_options("abc", "dom", ["blob1"]) == "fsid=abc,domain_id=dom,device=blob1"
    from erofs_tools.errors import MountError
    with pytest.raises(MountError):
        cf.mount_options("a,b")


# --- the front end against a fake device ------------------------------------------------
class FakeDevice:
    """Queued messages in, commands out; the anon fds are real files in tmp_path."""

    def __init__(self):
        self.queue = []
        self.commands = []
        self.cv = threading.Condition()
        self.fd = -1

    def push(self, raw):
        with self.cv:
            self.queue.append(raw)
            self.cv.notify_all()

    def wait(self, timeout):
        with self.cv:
            return self.cv.wait_for(lambda: self.queue, timeout)

    def read_message(self):
        with self.cv:
            if not self.queue:
                return None
            return proto.parse_message(self.queue.pop(0))

    def copen(self, msg_id, value):
        with self.cv:
            self.commands.append(("copen", msg_id, value))
            self.cv.notify_all()

    def close(self):
        pass


@pytest.fixture
def fe(tmp_path, monkeypatch):
    completed = []
    lock = threading.Lock()

    def fake_complete(fd, msg_id):
        os.fstat(fd)            # the fd must still be open
        with lock:
            completed.append(msg_id)
    monkeypatch.setattr(cf, "complete_read", fake_complete)

    boot = tmp_path / "boot"
    boot.write_bytes(bytes(range(256)) * 40)          # 10240 bytes
    blob = bytes((i * 7) & 0xFF for i in range(3 * 4096 + 100))

    def blob_read(off, length):
        if off >= 8192:
            raise OSError(errno.EIO, "digest mismatch (test)")
        return blob[off:off + length]

    def resolver(volume, cookie):
        if cookie == "fsid1":
            return cf.FileSource(str(boot))
        if cookie == "blob1":
            return cf.CallbackSource(len(blob), blob_read)
        return None

    f = cf.CachefilesFrontend(resolver, str(tmp_path / "cache"), threads=3)
    dev = FakeDevice()
    f.dev = dev
    from concurrent.futures import ThreadPoolExecutor
    f._pool = ThreadPoolExecutor(3)
    f._poller = threading.Thread(target=f._poll_loop, daemon=True)
    f._poller.start()
    files = {}

    def anon(name):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
        files[name] = fd
        return fd
    yield f, dev, anon, completed, boot, blob, tmp_path
    f._stop.set()
    f._poller.join()
    f._pool.shutdown()


def _until(pred, timeout=HANG):
    """Poll `pred` until true (-> True) or `timeout` s (-> False): the frontend's
    threads answer in ms, the bound is for a hang only (was 5 s)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_open_read_close_flow(fe):
    f, dev, anon, completed, boot, blob, tmp = fe
    bfd = anon("obj-boot")
    dev.push(proto.build_open(1, 1, b"erofs,fsid1", b"fsid1", bfd))
    assert _until(lambda: ("copen", 1, 10240) in dev.commands)
    # the bootstrap is written proactively, padded to a block
    assert _until(lambda: os.path.getsize(tmp / "obj-boot") == 12288)
    assert (tmp / "obj-boot").read_bytes()[:10240] == boot.read_bytes()

    xfd = anon("obj-blob")
    dev.push(proto.build_open(2, 2, b"erofs,fsid1", b"blob1", xfd))
    assert _until(lambda: ("copen", 2, len(blob)) in dev.commands)
    dev.push(proto.build_read(3, 2, 4096, 4096))
    assert _until(lambda: 3 in completed)
    data = (tmp / "obj-blob").read_bytes()
    assert data[4096:8192] == blob[4096:8192]
    assert f.stats.reads_by_cookie[("fsid1", "blob1")] == 1

    # a failing fill completes without writing: the kernel turns that into EIO
    dev.push(proto.build_read(4, 2, 8192, 4096))
    assert _until(lambda: 4 in completed)
    assert f.stats.read_errors == 1
    assert os.path.getsize(tmp / "obj-blob") == 8192

    dev.push(proto.build_close(5, 2))
    assert _until(lambda: f.stats.closes == 1)
    assert _until(lambda: 2 not in {o["object_id"] for o in f.objects()})
    with pytest.raises(OSError):
        os.fstat(xfd)


def test_unknown_cookie_fails_open(fe):
    f, dev, anon, completed, *_ = fe
    fd = anon("obj-x")
    dev.push(proto.build_open(8, 3, b"erofs,fsid1", b"nope", fd))
    assert _until(lambda: ("copen", 8, -errno.ENOENT) in dev.commands)
    assert _until(lambda: f.stats.opens_failed == 1)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_writer_pads_tail_block(tmp_path):
    w = cf._Writer(size=8192)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        n = w.write(fd, 4096, b"a" * 10000)      # crosses the bounce-buffer size
        assert n == 12288
        data = (tmp_path / "f").read_bytes()
        assert len(data) == 4096 + 12288
        assert data[4096:14096] == b"a" * 10000 and data[14096:] == bytes(2288)
        with pytest.raises(ValueError):
            w.write(fd, 100, b"x")
    finally:
        os.close(fd)


def test_start_without_device_is_a_clear_error(tmp_path):
    f = cf.CachefilesFrontend(lambda v, c: None, str(tmp_path / "cache"),
                              device_path=str(tmp_path / "no-such-device"))
    with pytest.raises(cf.CachefilesUnsupportedError) as ei:
        f.start()
    assert "does not exist" in str(ei.value)
    assert "\n" not in str(ei.value)
    f.stop()


def test_holder_roundtrip(tmp_path):
    """The holder keeps an fd and hands a duplicate back; release makes it exit."""
    import subprocess
    import sys

    from fscache_daemon.frontend import cachefiles_holder as h
    sock = str(tmp_path / "h.sock")
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.cachefiles_holder",
                          sock, str(w)], pass_fds=[w])
    os.close(w)
    try:
        assert _until(lambda: os.path.exists(sock))
        fd = h.fetch_fd(sock)
        assert fd is not None
        os.write(fd, b"x")          # the same pipe: the held fd is its write end
        os.close(fd)
        assert os.read(r, 1) == b"x"
        assert h.release(sock)
        assert p.wait(10) == 0
        assert h.fetch_fd(sock) is None
    finally:
        if p.poll() is None:
            p.kill()
        os.close(r)
