"""A real fscache-daemon process for end-to-end tests, plus image-building helpers.
(No tests here.)"""

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import helpers

from erofs_tools.reader import blob as rblob
from fscache_daemon.api import ApiClient, socket_answers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FS_IOC_GETFSSYSFSPATH = 0x80811501      # _IOR(0x15, 1, {u8 len; u8 name[128]})


def sysfs_name(mountpoint):
    """The kernel's /sys/fs/erofs/<name> of the EROFS superblock mounted at mountpoint."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(129)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    finally:
        os.close(fd)
    fstype, _, name = bytes(buf[1:1 + buf[0]]).decode().partition("/")
    assert fstype == "erofs" and os.path.isdir(f"/sys/fs/erofs/{name}"), buf
    return name


def fanotify_ok():
    from fscache_daemon.daemon import fanotify_available
    return fanotify_available() is None


def require_lazy_kernel():
    helpers.require_root_kernel()
    helpers.require(fanotify_ok(), "fanotify pre-content events unavailable (Linux 6.14+)")


def write_tree(root, seed=0, nfiles=40, big=(3 << 20,), text=True):
    """A source tree: small and large files, dirs, symlink, hardlink, empty file."""
    r = random.Random(seed)
    os.makedirs(os.path.join(root, "d1", "d2"), exist_ok=True)
    os.makedirs(os.path.join(root, "empty-dir"), exist_ok=True)
    with open(os.path.join(root, "small.txt"), "wb") as f:
        f.write(b"hello lazy world %d\n" % seed * 20)
    open(os.path.join(root, "empty"), "wb").close()
    for i, size in enumerate(big):
        with open(os.path.join(root, "d1", f"big{i}.bin"), "wb") as f:
            f.write(r.randbytes(size // 2) + bytes(size // 4) + b"abc" * (size // 12))
    if text:
        with open(os.path.join(root, "d1", "d2", "text.txt"), "wb") as f:
            f.write(b"".join(b"line %d of seed %d\n" % (i, seed) for i in range(60000)))
    for i in range(nfiles):
        with open(os.path.join(root, "d1" if i % 2 else "d1/d2", f"f{i:03d}"), "wb") as f:
            f.write(r.randbytes(r.randint(0, 150_000)))
    os.symlink("d1/big0.bin", os.path.join(root, "link"))
    os.link(os.path.join(root, "small.txt"), os.path.join(root, "hard.txt"))
    os.chmod(os.path.join(root, "small.txt"), 0o640)
    os.utime(os.path.join(root, "d1"), ns=(1_600_000_000_123_456_789,) * 2)
    return root


def pack(src, boot, blob_dir, *args):
    os.makedirs(blob_dir, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "erofs_tools", "pack", "-B", boot, "-D",
                          blob_dir, "--json", *args, src], check=True, capture_output=True)
    return json.loads(out.stdout)


def small_image(base, seed):
    """For the lazy-mount tests (require_lazy_kernel first): a write_tree of 8 files and
    one 1 MiB file packed in 64 KiB chunks under the directory `base` (a pathlib.Path)
    -> {"src", "boot", "blobs"}."""
    require_lazy_kernel()
    src = write_tree(str(base / "src"), seed=seed, nfiles=8, big=(1 << 20,))
    boot, blobs = str(base / "boot"), str(base / "blobs")
    pack(src, boot, blobs, "--chunk-size", "0x10000")
    return {"src": src, "boot": boot, "blobs": blobs}


def mount_read_stop(d, image, mnt, blobs=None):
    """Mount `image` (small_image's; its blobs from `blobs` if given) through the
    started DaemonProc `d` at `mnt`, check that small.txt reads right, then stop the
    daemon (SIGTERM: the mount stays)."""
    d.mount(image["boot"], mnt, f"localfs:{blobs or image['blobs']}")
    assert file_sha(os.path.join(mnt, "small.txt")) == \
        file_sha(os.path.join(image["src"], "small.txt"))
    d.stop()
    assert d.proc.returncode == 0, d.log()
    assert os.path.ismount(mnt)


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def regular_files(root):
    out = []
    for d, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(os.path.relpath(p, root))
    return sorted(out)


def chunk_of_file(boot, blob_dir, relpath, file_offset=0):
    """(blob id, BlobChunk) holding `file_offset` of image file `relpath`."""
    from erofs_tools.reader.image import open_image
    img = open_image(boot)
    try:
        ino = img.lookup("/" + relpath)
        for fo, length, device, phys in img.map_data(ino):
            if fo <= file_offset < fo + length:
                blob_id = img.blob_id(device)
                meta = rblob.open_blob(os.path.join(blob_dir, blob_id), blob_id=blob_id)
                for c in meta.chunks:
                    if c.uncompressed_offset <= phys < c.uncompressed_end:
                        return blob_id, c
        raise AssertionError(f"no chunk for {relpath}@{file_offset}")
    finally:
        img.close()


class DaemonProc:
    """`fscache-daemon run` as a child process, with its API client."""

    def __init__(self, workdir, frontend="fanotify", threads=8, extra=()):
        self.workdir = workdir
        self.cache_dir = os.path.join(workdir, "cache")
        self.sock = os.path.join(workdir, "api.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.frontend = frontend
        self.threads = threads
        self.extra = list(extra)
        self.proc = None
        self.api = ApiClient(self.sock, timeout=120)
        self.mounts = []

    def start(self, timeout=helpers.HANG):      # a hang bound: it fails at once on exit
        os.makedirs(self.workdir, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fscache_daemon.cli", "run", "--cache-dir", self.cache_dir,
             "--api-sock", self.sock, "--frontend", self.frontend, "--threads",
             str(self.threads), "--log-level", "DEBUG", *self.extra],
            stdout=logf, stderr=logf, cwd=REPO)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if socket_answers(self.sock):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        log = self.log()
        self.cleanup()      # not left running (with its fd holder) into later tests
        raise AssertionError(f"daemon did not come up:\n{log}")

    def log(self, tail=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-tail:])
        except OSError:
            return ""

    def mount(self, boot, mountpoint, backend, **kw):
        os.makedirs(mountpoint, exist_ok=True)
        body = {"bootstrap": boot, "mountpoint": mountpoint, "backend": backend}
        body.update(kw)
        st, res = self.api.request("POST", "/api/v1/mounts", body)
        assert st == 201, (st, res, self.log())
        self.mounts.append(mountpoint)
        return res

    def umount(self, mountpoint):
        st, res = self.api.request("POST", "/api/v1/umount", {"mountpoint": mountpoint})
        assert st == 200, (st, res)
        self.mounts.remove(mountpoint)

    def metrics(self):
        st, m = self.api.request("GET", "/api/v1/metrics")
        assert st == 200, m
        return m

    def blob_metrics(self, blob_id):
        return self.metrics()["blobs"][blob_id]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        """Unmount everything, stop the daemon, and release the fd holder."""
        for mp in list(self.mounts):
            if self.proc and self.proc.poll() is None:
                st, _ = self.api.request("POST", "/api/v1/umount",
                                         {"mountpoint": mp, "lazy": True})
                if st == 200:
                    continue
            helpers.sys_umount(mp, lazy=True) if os.path.ismount(mp) else None
        self.mounts.clear()
        self.stop()
        release_holder(os.path.join(self.cache_dir, "fdholder.sock"))


def lazy_daemon(tmp_path):
    """The body of a `daemon` fixture (`yield from lazy_daemon(tmp_path)`): a started
    DaemonProc in tmp_path/d on a kernel with lazy mounts, cleaned up after the test."""
    require_lazy_kernel()
    d = DaemonProc(str(tmp_path / "d")).start()
    yield d
    d.cleanup()


def corrupt_blob_copy(boot, good, bad, relpath, file_offset=0):
    """Copy blob directory `good` to `bad` and flip a byte in the middle of the stored
    chunk that holds `file_offset` of image file `relpath` -> (blob id, BlobChunk)."""
    shutil.copytree(good, bad)
    blob_id, chunk = chunk_of_file(boot, good, relpath, file_offset)
    with open(os.path.join(bad, blob_id), "r+b") as f:
        f.seek(chunk.compressed_offset + chunk.compressed_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    return blob_id, chunk


def release_holder(sock):
    if not os.path.exists(sock):
        return
    from fscache_daemon.frontend.fdholder import HolderChannel
    try:
        ch = HolderChannel(sock, timeout=5)
    except Exception:  # noqa: BLE001 - no holder left
        return
    try:
        for m in ch.status().get("marks", []):
            try:
                ch.unmark(m if isinstance(m, str) else m["path"])
            except Exception:  # noqa: BLE001
                pass
        pid = ch.holder_pid
    finally:
        ch.close()
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
