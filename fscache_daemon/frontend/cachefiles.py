"""The cachefiles on-demand front end: EROFS over fscache (Linux 5.19 ... 7.1).

The kernel asks for data through /dev/cachefiles (protocol: cachefiles_proto.py,
docs/cachefiles.md). One poller thread reads the requests; a worker pool answers them:

- OPEN   a cookie was acquired: the bootstrap (cookie key = fsid) or a data blob (cookie
         key = device tag = blob id) of volume "erofs,<domain or fsid>". The resolver
         supplied by the daemon core names a Source for it (or None: the OPEN fails with
         ENOENT). We answer `copen <id>,<size>` and, for sources that want it (the
         bootstrap), write the whole object proactively.
- READ   the kernel found a hole in the cache file: the Source delivers the bytes (the
         daemon core fetches, verifies and decompresses whole chunks), we pwrite them
         block-aligned into the object's anon fd and complete the request with
         CACHEFILES_IOC_READ_COMPLETE. On any failure we complete without writing, which
         the kernel turns into EIO for that reader only.
- CLOSE  the cookie was relinquished: close the anon fd once no worker uses it.

Restart: the device fd is duplicated into a small holder process
(cachefiles_holder.py); a restarted daemon fetches it back and writes `restore`
(6.8+ and the 6.1.95+ backport), and the kernel re-sends pending requests, re-opening
closed objects with fresh OPENs, so existing mounts keep working.

The front end knows nothing about RAFS: the daemon core passes `resolver(volume, cookie)`
returning a Source (see `Source`) and keeps its own metrics; `stats()` here counts
protocol events.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from erofs_tools.fsutil import round_up
from fscache_daemon import mounts
from fscache_daemon.errors import (
    CachefilesUnsupportedError,
    FrontendError,
    MountError,
)

from . import cachefiles_holder
from .base import sys_umount
from .cachefiles_proto import (
    DEVICE_PATH,
    CachefilesDevice,
    CloseMsg,
    OpenMsg,
    ProtocolError,
    ReadMsg,
    complete_read,
)

log = logging.getLogger(__name__)

PAGE = 4096
WRITE_BUF = 1 << 20          # per-worker page-aligned bounce buffer (mmap)
ENOBUFS_RETRY_S = 3.0        # writes right after copen may fail with ENOBUFS for a moment
HOLDER_START_TIMEOUT = 60.0  # s a live fd holder may take to answer (was 5 s)


# --- what the daemon core supplies ---------------------------------------------------
class Source:
    """One cache object's content, as the daemon core serves it.

    size      the copen size: stable per cookie (bootstrap length; blob uncompressed size)
    kind      "bootstrap" | "blob" (for logs and stats)
    read(off, length)
              the bytes of [off, off+length) of the object (the kernel's offsets are
              block-aligned); may return more than asked, starting at off, e.g. whole
              chunks, or an iterable of (offset, data) segments with block-aligned
              offsets. Raise to fail the request (the reader gets EIO).
    prefill() None, or an iterable of (offset, data) written right after copen
              (the bootstrap: the whole file, so metadata never round-trips).
    """

    kind = "blob"
    size = 0

    def read(self, off: int, length: int):
        raise NotImplementedError

    def prefill(self):
        return None


class FileSource(Source):
    """A local file served as is (the bootstrap), written proactively after copen."""

    kind = "bootstrap"

    def __init__(self, path: str, prefill: bool = True):
        self.path = path
        self.size = os.stat(path).st_size
        self._prefill = prefill

    def read(self, off, length):
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, off)

    def prefill(self):
        if not self._prefill:
            return None

        def chunks():
            with open(self.path, "rb") as f:
                off = 0
                while off < self.size:
                    data = os.pread(f.fileno(), WRITE_BUF, off)
                    if not data:
                        break
                    yield off, data
                    off += len(data)
        return chunks()


class CallbackSource(Source):
    """Adapts plain callables: read_fn(off, length) -> bytes or segments."""

    def __init__(self, size: int, read_fn: Callable, kind: str = "blob", prefill_fn=None):
        self.size = size
        self.kind = kind
        self._read = read_fn
        self._prefill = prefill_fn

    def read(self, off, length):
        return self._read(off, length)

    def prefill(self):
        return self._prefill() if self._prefill else None


# resolver(volume_name, cookie_key) -> Source | None
#   volume_name is the domain id (mounted with domain_id=) or the fsid; cookie_key is the
#   fsid for the bootstrap and the device tag (blob id) for data blobs.
Resolver = Callable[[str, str], "Source | None"]


# --- availability ----------------------------------------------------------------------
def unavailable_reason(path: str = DEVICE_PATH) -> str | None:
    """Why this kernel cannot run the front end, or None if it may (the final word is
    `bind ondemand`, which fails with EINVAL without CONFIG_CACHEFILES_ONDEMAND)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (kernel without CONFIG_CACHEFILES)"
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if not stat.S_ISCHR(st.st_mode):
        return f"{path} is not a character device"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["erofs"] for line in f):
                return "the kernel has no erofs filesystem (/proc/filesystems)"
    except OSError:
        pass
    return None


# --- writing into the cache --------------------------------------------------------
class _Writer:
    """pwrite through a page-aligned buffer: the anon fd does direct I/O, so the source
    memory must be page-aligned and the length a multiple of the block size."""

    def __init__(self, size: int = WRITE_BUF):
        self.size = size
        self.buf = mmap.mmap(-1, size)
        self.view = memoryview(self.buf)

    def write(self, fd: int, off: int, data) -> int:
        if off % PAGE:
            raise ValueError(f"cache write at unaligned offset {off}")
        src = memoryview(data).cast("B")
        total = len(src)
        pos = 0
        while pos < total:
            n = min(total - pos, self.size)
            self.view[:n] = src[pos:pos + n]
            padded = round_up(n, PAGE)
            if padded > n:
                self.view[n:padded] = bytes(padded - n)
            _pwrite_all(fd, self.view[:padded], off + pos)
            pos += n
        return round_up(total, PAGE)


def _pwrite_all(fd: int, view: memoryview, off: int) -> None:
    deadline = None
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], off + done)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            # The backing file is not ready yet (right after copen), or the cache is
            # below its free-space limit: retry for a while like nydusd does.
            now = time.monotonic()
            if deadline is None:
                deadline = now + ENOBUFS_RETRY_S
            if now >= deadline:
                raise
            time.sleep(0.02)
            continue
        if n <= 0:
            raise OSError(errno.EIO, "cache write made no progress")
        done += n


def _segments(result, off: int):
    if result is None:
        return ()
    if isinstance(result, (bytes, bytearray, memoryview, mmap.mmap)):
        return ((off, result),)
    return result


# --- objects -------------------------------------------------------------------------
@dataclass
class _Object:
    object_id: int
    fd: int
    volume: str
    cookie: str
    source: Source
    users: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATS_LOCK = threading.Lock()


@dataclass
class Stats:
    opens: int = 0
    opens_failed: int = 0
    reads: int = 0
    read_bytes: int = 0          # bytes requested by the kernel
    written_bytes: int = 0       # bytes written into cache objects (incl. prefill)
    read_errors: int = 0
    closes: int = 0
    restored: bool = False
    # (volume, cookie) -> number of READ requests; lets tests prove "zero requests"
    reads_by_cookie: dict = field(default_factory=dict)

    def count(self, **incs):
        with _STATS_LOCK:
            for k, v in incs.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self):
        with _STATS_LOCK:
            d = dict(self.__dict__)
            d["reads_by_cookie"] = {f"{v}/{c}": n
                                    for (v, c), n in self.reads_by_cookie.items()}
        return d


class CachefilesFrontend:
    """Bind /dev/cachefiles in on-demand mode and serve requests until stop()."""

    name = "cachefiles"

    def __init__(self, resolver: Resolver, cache_dir: str, *, threads: int = 4,
                 tag: str | None = None, holder_sock: str | None = None,
                 device_path: str = DEVICE_PATH,
                 on_read: Callable | None = None, startup_grace: float = 10.0):
        self.resolver = resolver
        self.cache_dir = os.path.abspath(cache_dir)
        self.threads = max(1, threads)
        self.tag = tag
        self.holder_sock = holder_sock
        self.device_path = device_path
        self.on_read = on_read        # on_read(volume, cookie, off, len, seconds, ok)
        self.dev: CachefilesDevice | None = None
        self.stats = Stats()
        self._objects: dict[int, _Object] = {}
        self._objects_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._holder: subprocess.Popen | None = None
        self.startup_grace = startup_grace
        self._grace_until = 0.0

    # -- lifecycle --
    def start(self) -> None:
        fd = cachefiles_holder.fetch_fd(self.holder_sock) if self.holder_sock else None
        if fd is not None:
            # only a takeover has old mounts whose objects the kernel re-opens at once
            self._grace_until = time.monotonic() + self.startup_grace
            self.dev = CachefilesDevice(fd, self.device_path)
            self._restore(self.dev)
        else:
            self.dev = self._bind()
            if self.holder_sock:
                self._spawn_holder(self.dev, self.holder_sock)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cachefiles-worker")
        self._poller = threading.Thread(target=self._poll_loop, name="cachefiles-poller",
                                        daemon=True)
        self._poller.start()

    def _bind(self) -> CachefilesDevice:
        reason = unavailable_reason(self.device_path)
        if reason:
            raise CachefilesUnsupportedError(f"cachefiles front end unavailable: {reason}")
        try:
            dev = CachefilesDevice.open(self.device_path)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise FrontendError(f"{self.device_path} is busy: another cache daemon "
                                    "(cachefilesd, nydusd, fscache-daemon) holds it") from e
            raise FrontendError(f"cannot open {self.device_path}: {e.strerror}") from e
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            try:
                dev.set_dir(self.cache_dir)
                if self.tag:
                    dev.set_tag(self.tag)
            except OSError as e:
                raise FrontendError(
                    f"cachefiles rejected cache dir {self.cache_dir}: {e.strerror}") from e
            try:
                dev.bind_ondemand()
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise CachefilesUnsupportedError(
                        "kernel rejects 'bind ondemand': built without "
                        "CONFIG_CACHEFILES_ONDEMAND") from e
                raise FrontendError(
                    f"cachefiles bind of {self.cache_dir} failed: {e.strerror} (the cache "
                    "dir needs a disk filesystem with tmpfile and user xattrs, e.g. ext4)"
                ) from e
        except BaseException:
            dev.close()
            raise
        log.info("cachefiles bound in on-demand mode, cache dir %s", self.cache_dir)
        return dev

    def _restore(self, dev: CachefilesDevice) -> None:
        try:
            dev.restore()
        except OSError as e:
            # Kernels before 6.8 (without the backport) do not know `restore`: the cache
            # is alive (the holder kept it) and new mounts work, but objects of mounts from
            # before the restart failed their pending reads and cannot be reopened.
            log.warning("cachefiles 'restore' failed (%s): kernel without failover support; "
                        "mounts from before the restart must be remounted", e.strerror)
            return
        self.stats.restored = True
        log.info("took over the held /dev/cachefiles fd and restored pending requests")

    def _spawn_holder(self, dev: CachefilesDevice, sock: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(sock)), exist_ok=True)
        fd = dev.fd
        try:
            holder = self._holder = subprocess.Popen(
                [sys.executable, "-m", "fscache_daemon.frontend.cachefiles_holder",
                 sock, str(fd)],
                pass_fds=[fd], start_new_session=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            log.warning("cannot start the cachefiles fd holder (%s): a daemon crash will "
                        "kill the cache", e)
            return
        # as long as it lives and does not answer, it is starting (a python process: a
        # loaded machine or an emulated VM takes seconds); the bound is for a hang only
        deadline = time.monotonic() + HOLDER_START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if cachefiles_holder._request(sock, b"ping") == b"P":
                    log.info("cachefiles fd holder pid %d on %s", holder.pid, sock)
                    return
            except OSError:
                pass
            if holder.poll() is not None:
                break
            time.sleep(0.025)
        log.warning("cachefiles fd holder did not come up; a daemon crash will kill the cache")

    def stop(self, release: bool = False) -> None:
        """Stop serving. With release=True the holder lets the device go too (the cache
        unbinds once the last object is gone and mounted images fail uncached reads);
        otherwise a restarted daemon can take over with `restore`."""
        self._stop.set()
        if self._poller:
            self._poller.join(5)
        if self._pool:
            self._pool.shutdown(wait=True)
        with self._objects_lock:
            objs = list(self._objects.values())
            self._objects.clear()
        for obj in objs:
            with obj.lock:
                if not obj.closed:
                    obj.closed = True
                    _close_quietly(obj.fd)
        if release and self.holder_sock:
            cachefiles_holder.release(self.holder_sock)
        if self.dev:
            self.dev.close()
        if self._holder is not None and release:
            try:
                self._holder.wait(5)
            except subprocess.TimeoutExpired:
                pass
        log.info("cachefiles front end stopped%s", " and released" if release else "")

    def _device(self) -> CachefilesDevice:
        assert self.dev is not None     # requests come only after start() bound it
        return self.dev

    # -- the poller --
    def _poll_loop(self) -> None:
        dev = self._device()
        while not self._stop.is_set():
            try:
                if not dev.wait(0.5):
                    continue
                while not self._stop.is_set():
                    msg = dev.read_message()
                    if msg is None:
                        break
                    self._dispatch(msg)
            except ProtocolError as e:
                log.error("%s", e)
            except InterruptedError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    break
                log.error("reading /dev/cachefiles failed: %s", e)
                time.sleep(0.2)
            except Exception:   # never let the poller die on a bug in one request
                log.exception("cachefiles poller: unexpected error")

    def _dispatch(self, msg) -> None:
        pool = self._pool
        assert pool is not None     # start() makes it before it starts the poller
        if isinstance(msg, OpenMsg):
            pool.submit(self._guard, self._handle_open, msg)
        elif isinstance(msg, ReadMsg):
            pool.submit(self._guard, self._handle_read, msg)
        elif isinstance(msg, CloseMsg):
            self._handle_close(msg)

    def _guard(self, fn, msg):
        try:
            fn(msg)
        except Exception:
            log.exception("cachefiles: %s failed", type(msg).__name__)

    # -- requests --
    def _handle_open(self, msg: OpenMsg) -> None:
        volume, cookie = msg.volume_name, msg.cookie_key
        err = errno.ENOENT      # the OPEN's error if no source is found
        try:
            source = self.resolver(volume, cookie)
            # Right after start (a restart with `restore`), the kernel re-opens objects of
            # existing mounts while the daemon may still be registering them: wait a
            # little for the resolver to learn the cookie before failing the OPEN.
            while source is None and time.monotonic() < self._grace_until \
                    and not self._stop.is_set():
                time.sleep(0.05)
                source = self.resolver(volume, cookie)
        except Exception as e:
            log.error("cachefiles OPEN %s/%s: resolver failed: %s", volume, cookie, e)
            source, err = None, errno.EIO
        if source is None:
            self.stats.count(opens_failed=1)
            log.warning("cachefiles OPEN %s/%s (object %d): unknown, failing with %s",
                        volume, cookie, msg.object_id, errno.errorcode[err])
            self._copen(msg, -err)
            _close_quietly(msg.fd)
            return
        obj = _Object(msg.object_id, msg.fd, volume, cookie, source)
        with self._objects_lock:
            old = self._objects.get(msg.object_id)
            if old is not None and not old.closed:
                log.error("cachefiles OPEN: object %d already open (%s/%s)",
                          msg.object_id, old.volume, old.cookie)
                self.stats.count(opens_failed=1)
                self._copen(msg, -errno.EALREADY)
                _close_quietly(msg.fd)
                return
            self._objects[msg.object_id] = obj
            obj.users += 1
        try:
            try:
                self._device().copen(msg.msg_id, source.size)
            except OSError as e:
                log.error("cachefiles copen %d for %s/%s failed: %s", msg.msg_id, volume,
                          cookie, e.strerror)
                self._drop(obj)
                return
            self.stats.count(opens=1)
            log.info("cachefiles OPEN %s/%s -> object %d fd %d, %s of %d bytes", volume,
                     cookie, msg.object_id, msg.fd, source.kind, source.size)
            segs = source.prefill()
            if segs is not None:
                t0 = time.monotonic()
                n = self._write_segments(obj, segs)
                log.info("cachefiles prefilled %s/%s: %d bytes in %.3f s", volume, cookie,
                         n, time.monotonic() - t0)
        except OSError as e:
            log.warning("cachefiles prefill of %s/%s failed: %s (READs will fill it)",
                        volume, cookie, e)
        finally:
            self._unuse(obj)

    def _copen(self, msg, value):
        try:
            self._device().copen(msg.msg_id, value)
        except OSError as e:
            log.error("cachefiles copen %d,%d failed: %s", msg.msg_id, value, e.strerror)

    def _handle_read(self, msg: ReadMsg) -> None:
        with self._objects_lock:
            obj = self._objects.get(msg.object_id)
            if obj is not None and not obj.closed:
                obj.users += 1
            else:
                obj = None
        if obj is None:
            # Cannot happen with a correct kernel: READs follow the object's OPEN. There is
            # no fd to complete on; the reader's request is cancelled when the object goes.
            log.error("cachefiles READ %d for unknown object %d", msg.msg_id, msg.object_id)
            self.stats.count(read_errors=1)
            return
        t0 = time.monotonic()
        ok = False
        key = (obj.volume, obj.cookie)
        self.stats.count(reads=1, read_bytes=msg.len)
        with _STATS_LOCK:
            self.stats.reads_by_cookie[key] = self.stats.reads_by_cookie.get(key, 0) + 1
        try:
            result = obj.source.read(msg.off, msg.len)
            self._write_segments(obj, _segments(result, msg.off))
            ok = True
        except Exception as e:
            self.stats.count(read_errors=1)
            log.error("cachefiles READ %s/%s [%d, +%d) failed: %s", obj.volume, obj.cookie,
                      msg.off, msg.len, e)
        finally:
            try:
                # Sent on failure too: with the range still a hole the kernel fails that
                # reader with EIO instead of leaving it waiting.
                complete_read(obj.fd, msg.msg_id)
            except OSError as e:
                log.error("cachefiles READ_COMPLETE %d on object %d failed: %s",
                          msg.msg_id, msg.object_id, e.strerror)
            self._unuse(obj)
        dt = time.monotonic() - t0
        log.debug("cachefiles READ %s/%s [%d, +%d) %s in %.2f ms", obj.volume, obj.cookie,
                  msg.off, msg.len, "ok" if ok else "EIO", dt * 1e3)
        if self.on_read:
            try:
                self.on_read(obj.volume, obj.cookie, msg.off, msg.len, dt, ok)
            except Exception:
                log.exception("cachefiles on_read hook failed")

    def _write_segments(self, obj: _Object, segs: Iterable) -> int:
        w = getattr(self._local, "writer", None)
        if w is None:
            w = self._local.writer = _Writer()
        total = 0
        for off, data in segs:
            # Serialize with CLOSE: never write through an fd that is being closed.
            with obj.lock:
                if obj.closed:
                    raise OSError(errno.EBADF, f"object {obj.object_id} closed")
                total += w.write(obj.fd, off, data)
        self.stats.count(written_bytes=total)
        return total

    def _handle_close(self, msg: CloseMsg) -> None:
        with self._objects_lock:
            obj = self._objects.pop(msg.object_id, None)
        self.stats.count(closes=1)
        if obj is None:
            log.debug("cachefiles CLOSE for unknown object %d", msg.object_id)
            return
        log.info("cachefiles CLOSE %s/%s object %d", obj.volume, obj.cookie, obj.object_id)
        self._drop(obj, remove=False)

    def _drop(self, obj: _Object, remove: bool = True) -> None:
        if remove:
            with self._objects_lock:
                if self._objects.get(obj.object_id) is obj:
                    del self._objects[obj.object_id]
        with obj.lock:
            obj.closed = True
            if obj.users == 0:
                _close_quietly(obj.fd)
                obj.fd = -1

    def _unuse(self, obj: _Object) -> None:
        with self._objects_lock:
            obj.users -= 1
            last = obj.users == 0
        if last:
            with obj.lock:
                if obj.closed and obj.fd >= 0:
                    _close_quietly(obj.fd)
                    obj.fd = -1

    # -- introspection --
    def objects(self) -> list[dict]:
        with self._objects_lock:
            return [{"object_id": o.object_id, "volume": o.volume, "cookie": o.cookie,
                     "kind": o.source.kind, "size": o.source.size}
                    for o in self._objects.values()]


def _close_quietly(fd: int) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


# --- mounting -------------------------------------------------------------------------
def mount_options(fsid: str, domain: str | None = None, devices: Iterable[str] = ()) -> str:
    for what, value in (("fsid", fsid), ("domain_id", domain)):
        if value is not None and (not value or any(c in value for c in ",=\0/ \n")):
            raise MountError(f"invalid {what} {value!r} for an EROFS fscache mount")
    opts = [f"fsid={fsid}"]
    if domain:
        opts.append(f"domain_id={domain}")
    opts += [f"device={d}" for d in devices]
    return ",".join(opts)


def mount_fscache(fsid: str, mountpoint: str, domain: str | None = None,
                  devices: Iterable[str] = ()) -> None:
    """mount -t erofs none -o fsid=F[,domain_id=D][,device=X...] MNT (read-only).

    The daemon must be serving: the kernel OPENs and READs the bootstrap before mount(2)
    returns, so never call this from the poller thread."""
    opts = mount_options(fsid, domain, devices)
    try:
        mounts.mount("none", mountpoint, "erofs", mounts.MS_RDONLY, opts)
    except OSError as e:
        hint = ""
        if e.errno == errno.EEXIST:
            hint = " (this fsid is already mounted in that domain)"
        elif e.errno == errno.EINVAL:
            hint = " (kernel without CONFIG_EROFS_FS_ONDEMAND, or bad options)"
        raise MountError(f"mount -t erofs -o {opts} {mountpoint}: {e.strerror}{hint}") from None


# unmounting is the same for every front end (the adapter and the VM tests call cf.umount)
umount = sys_umount
