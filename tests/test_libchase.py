"""Libraries chased at their first read (fscache_daemon/libchase.py): a miss on a shared
object's first chunk fetches the libraries its DT_NEEDED names, before the loader asks."""

import glob
import json
import os
import re
import shutil
import struct
import time

import helpers
import pytest
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import DaemonProc, pack, require_lazy_kernel

from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
from fscache_daemon import libchase, startset

LIB = "/usr/lib/x86_64-linux-gnu"


def test_is_library_and_starts():
    assert libchase.is_library(b"/usr/lib/x86_64-linux-gnu/libffi.so.8.1.2")
    assert libchase.is_library(b"/a/_ctypes.cpython-311-x86_64-linux-gnu.so")
    assert libchase.is_library(b"/a/libx.so")
    assert not libchase.is_library(b"/a/so/file.pyc")
    assert not libchase.is_library(b"/a/x.sox")
    assert not libchase.is_library(b"/a/.so.d/x.py")
    assert libchase.is_entry_points(b"/site/a-1.0.dist-info/entry_points.txt")
    assert not libchase.is_entry_points(b"/site/a/entry_points.txt")
    assert not libchase.is_entry_points(b"/site/a-1.0.dist-info/METADATA")
    ep = [b"/s/a-1.dist-info/entry_points.txt", b"/s/b-2.dist-info/entry_points.txt",
          b"/t/c-3.dist-info/entry_points.txt", b"/s/big-1.dist-info/entry_points.txt"]
    paths = [b"/lib/liba.so.1", b"/x.pyc", b"/lib/libb.so", *ep]
    # (file, blob, start, end): a file's first run is its start, later runs are not
    found = [(0, 0, 4096, 8192), (0, 0, 65536, 70000), (1, 0, 8192, 9000),
             (2, 1, 0, 100), (3, 0, 100000, 100300), (4, 1, 4096, 4196),
             (5, 0, 200000, 200010), (6, 0, 300000, 300000 + (1 << 20))]
    starts, groups = libchase.library_starts(paths, found)
    assert starts == {
        0: {4096: "/lib/liba.so.1", 100000: ep[0].decode(), 200000: ep[2].decode(),
            300000: ep[3].decode()},
        1: {0: "/lib/libb.so", 4096: ep[1].decode()}}
    # a site directory's entry points, each small one (the big one is left out)
    assert groups == {"/s": [(0, 100000, 300), (1, 4096, 100)], "/t": [(0, 200000, 10)]}


def test_elf_needs_reads_big_string_tables_by_name(monkeypatch):
    """A library whose .dynstr is over MAX_STRINGS (C++ symbols) still names its
    DT_NEEDED: each name is read alone, and nothing but the names is asked for."""
    path = glob.glob("/usr/lib/python3*/lib-dynload/_ctypes.cpython-*.so")[0]
    data = open(path, "rb").read()
    asked = []

    def read(off, n):
        asked.append(n)
        return data[off:off + n] if 0 <= off and off + n <= len(data) else None
    whole = startset.elf_needs(read)
    assert whole is not None and "libffi.so.8" in whole[1]
    monkeypatch.setattr(startset, "MAX_STRINGS", 16)
    asked.clear()
    assert startset.elf_needs(read) == (whole[0], whole[1], whole[2])
    assert max(asked) <= max(startset.MAX_NAME, startset.MAX_DYNAMIC)
    # names not cached: no names, no exception
    assert startset.elf_needs(lambda o, n: data[o:o + n] if o < 65536 else None)[1] == []


def test_writable_segments_and_slices():
    """The loader's relocation targets of a real library: its RW PT_LOAD, inside the
    file; nothing for a non-ELF file or a truncated one."""
    path = os.path.realpath(os.path.join(LIB, "libc.so.6"))
    data = open(path, "rb").read()

    def read(off, n):
        return data[off:off + n] if 0 <= off and off + n <= len(data) else None
    segs = libchase.writable_segments(read)
    assert segs and all(0 < off and off + n <= len(data) for off, n in segs)
    # the segment holds PT_DYNAMIC (the loader reads it at once)
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phnum = struct.unpack_from("<H", data, 56)[0]
    dyn = [struct.unpack_from("<IIQ", data, phoff + 56 * i)[2] for i in range(phnum)
           if struct.unpack_from("<I", data, phoff + 56 * i)[0] == 2]
    assert dyn and any(off <= dyn[0] < off + n for off, n in segs)
    assert libchase.writable_segments(lambda o, n: b"not an elf file at all" * 4) == []
    assert libchase.writable_segments(lambda o, n: data[:40] if o == 0 else None) == []
    runs = [(0, 100, 50), (1, 1000, 50), (0, 7, 10)]
    assert libchase.file_slice(runs, 40, 20) == [(0, 140, 10), (1, 1000, 10)]
    assert libchase.file_slice(runs, 95, 100) == [(1, 1045, 5), (0, 7, 10)]
    assert libchase.file_slice(runs, 200, 5) == []


def _tree(root):
    """An extension module, the library it needs (through a symlink, as Debian's) and
    libc, plus a big file nobody needs."""
    ctypes_so = glob.glob("/usr/lib/python3*/lib-dynload/_ctypes.cpython-*.so")[0]
    files = {ctypes_so: ctypes_so}
    for soname in ("libffi.so.8", "libc.so.6"):
        real = os.path.realpath(os.path.join(LIB, soname))
        files[os.path.join(LIB, os.path.basename(real))] = real
    for dest, src in files.items():
        path = os.path.join(root, dest.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(src, path)
    real = os.path.basename(os.path.realpath(os.path.join(LIB, "libffi.so.8")))
    os.symlink(real, os.path.join(root, LIB.lstrip("/"), "libffi.so.8"))
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(os.urandom(4 << 20))
    return ctypes_so, sorted(p for p in files if p != ctypes_so)


def _mount(registry, tmp_path, name):  # noqa: F811
    src = str(tmp_path / "src")
    ctypes_so, needed = _tree(src)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    blob_id = info["blobs"][0]["blob_id"]
    client = registry.client()
    push_image(client, f"chase/{name}", "v1",
               config=BlobSource(json.dumps({"config": {}}).encode(), OCI_CONFIG),
               layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB, {})])
    client.close()
    d = DaemonProc(str(tmp_path / "d")).start()
    mnt = str(tmp_path / "mnt")
    d.mount(boot, mnt, f"registry:{registry.host}/chase/{name}:v1")
    deadline = time.monotonic() + 60
    while "file runs known for readahead" not in d.log(tail=400):
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    return d, src, mnt, blob_id, ctypes_so, needed


@pytest.mark.root
@pytest.mark.registry
def test_needed_libraries_fetched_at_first_read(registry, tmp_path, monkeypatch):  # noqa: F811
    require_lazy_kernel()
    monkeypatch.setenv("FSCACHE_DAEMON_START_SET", "0")     # only the chase fetches
    d, src, mnt, blob_id, ctypes_so, needed = _mount(registry, tmp_path, "on")
    try:
        with open(os.path.join(mnt, ctypes_so.lstrip("/")), "rb") as f:
            assert f.read(4) == b"\x7fELF"     # the loader's first read: a miss
        deadline = time.monotonic() + 60
        line = None
        while line is None:
            assert time.monotonic() < deadline, d.log(tail=400)
            line = re.search(r"library chase from (\S+): (\d+) files, (\d+) bytes in "
                             r"[0-9.]+ s: (.*)", d.log(tail=400))
            time.sleep(0.05)
        assert line.group(1) == ctypes_so
        assert sorted(line.group(4).split()) == needed, line.group(0)
        assert int(line.group(3)) > 0
        # what the daemon holds now: the extension and its libraries, not the big file
        fetched = d.blob_metrics(blob_id)["bytes_fetched"]
        wanted = sum(os.path.getsize(os.path.join(src, p.lstrip("/")))
                     for p in [ctypes_so, *needed])
        assert fetched <= wanted + (1 << 20)
        # the libraries are read from the cache now: no request reaches the daemon
        before = d.blob_metrics(blob_id)["requests"]
        for p in needed:
            with open(os.path.join(mnt, p.lstrip("/")), "rb") as f:
                f.read()
        assert d.blob_metrics(blob_id)["requests"] == before
        helpers.assert_same_tree(src, mnt)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_chase_off(registry, tmp_path, monkeypatch):  # noqa: F811
    """FSCACHE_DAEMON_LIB_CHASE=0: a library's first read fetches no other library."""
    require_lazy_kernel()
    monkeypatch.setenv("FSCACHE_DAEMON_START_SET", "0")
    monkeypatch.setenv("FSCACHE_DAEMON_LIB_CHASE", "0")
    d, src, mnt, blob_id, ctypes_so, needed = _mount(registry, tmp_path, "off")
    try:
        with open(os.path.join(mnt, ctypes_so.lstrip("/")), "rb") as f:
            assert f.read(4) == b"\x7fELF"
        time.sleep(1.0)     # what a chase would have fetched by now, at most
        assert "library chase" not in d.log(tail=400)
        size = os.path.getsize(os.path.join(src, ctypes_so.lstrip("/")))
        assert d.blob_metrics(blob_id)["bytes_fetched"] <= size + (1 << 20)
        helpers.assert_same_tree(src, mnt)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_entry_points_of_a_site_fetched_together(registry, tmp_path, monkeypatch):  # noqa: F811
    """A miss on one distribution's entry_points.txt fetches those of the others of its
    site directory (importlib.metadata reads them all, one after another)."""
    require_lazy_kernel()
    monkeypatch.setenv("FSCACHE_DAEMON_START_SET", "0")
    src = str(tmp_path / "src")
    site = "/usr/lib/python3/dist-packages"
    eps = []
    for i in range(6):
        d = os.path.join(src, site.lstrip("/"), f"pkg{i}-1.0.dist-info")
        os.makedirs(d)
        for name in ("entry_points.txt", "METADATA", "RECORD"):
            with open(os.path.join(d, name), "wb") as f:
                f.write(os.urandom(3000))   # stored as is: its own chunk
        # a module between them, so that no readahead window reaches the next one
        with open(os.path.join(src, site.lstrip("/"), f"zz{i}.bin"), "wb") as f:
            f.write(os.urandom(3 << 20))
        eps.append(f"{site}/pkg{i}-1.0.dist-info/entry_points.txt")
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    blob_id = info["blobs"][0]["blob_id"]
    client = registry.client()
    push_image(client, "chase/ep", "v1",
               config=BlobSource(json.dumps({"config": {}}).encode(), OCI_CONFIG),
               layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB, {})])
    client.close()
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(boot, mnt, f"registry:{registry.host}/chase/ep:v1")
        deadline = time.monotonic() + 60
        while "file runs known for readahead" not in d.log(tail=400):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        with open(os.path.join(mnt, eps[0].lstrip("/")), "rb") as f:
            f.read()
        line = None
        while line is None:
            assert time.monotonic() < deadline, d.log(tail=400)
            line = re.search(r"entry points of (\S+): (\d+) files, (\d+) bytes",
                             d.log(tail=400))
            time.sleep(0.05)
        assert line.group(1) == site and int(line.group(2)) == len(eps)
        before = d.blob_metrics(blob_id)["requests"]
        for p in eps[1:]:
            with open(os.path.join(mnt, p.lstrip("/")), "rb") as f:
                f.read()
        assert d.blob_metrics(blob_id)["requests"] == before
        # nothing else: the metadata beside them and the big files were not fetched
        assert d.blob_metrics(blob_id)["bytes_fetched"] <= 6 * 3000 + 6 * 4096 + (1 << 20)
        helpers.assert_same_tree(src, mnt)
    finally:
        d.cleanup()


class _HoldRanges(FlakyProxy):
    """A registry proxy that, once `held_ranges` is set ([(start, end)] of a blob's stored
    bytes), holds every range GET overlapping one of them until release()."""

    def __init__(self, target: str):
        super().__init__(target)
        self.held_ranges: list[tuple[int, int]] = []

    def _handle(self, h):
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        if h.command == "GET" and m and any(int(m[1]) < end and start <= int(m[2])
                                            for start, end in self.held_ranges):
            with self._lock:
                self.held += 1
            self._released.wait()
        super()._handle(h)


def _stored_extent(boot, blobs, path):
    """(first, last + 1) stored byte in its blob of image file `path`'s chunks."""
    from erofs_tools.reader import blob as rblob
    from erofs_tools.reader.image import open_image
    img = open_image(boot)
    try:
        ino = img.lookup(path)
        phys = [(p, p + n) for _fo, n, dev, p in img.map_data(ino) if dev is not None]
        blob_id = img.blob_id(1)
    finally:
        img.close()
    meta = rblob.open_blob(os.path.join(blobs, blob_id), blob_id=blob_id)
    mine = [c for c in meta.chunks
            if any(c.uncompressed_offset < e and s < c.uncompressed_end for s, e in phys)]
    return (min(c.compressed_offset for c in mine),
            max(c.compressed_offset + c.compressed_size for c in mine))


def _chase_threads(d):
    """Threads of daemon `d` named lib-chase (LibraryChase._run names them)."""
    out = []
    for comm in glob.glob(f"/proc/{d.proc.pid}/task/*/comm"):
        try:
            with open(comm) as f:
                if f.read().strip() == "lib-chase":
                    out.append(comm)
        except OSError:
            pass        # the thread ended meanwhile
    return out


def _image_fds(d, blob_id):
    """The daemon's fds on a bootstrap copy or on blob `blob_id`'s cache files."""
    boots = os.path.join(d.cache_dir, "bootstraps") + "/"
    out = []
    for fd in glob.glob(f"/proc/{d.proc.pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(boots) or blob_id in target:
            out.append(target)
    return out


@pytest.mark.root
@pytest.mark.registry
def test_chase_ends_with_its_mount(registry, tmp_path, monkeypatch):  # noqa: F811
    """A chase whose fetches hang at the registry, and a chase idle after its work, both
    end when their mount is unmounted: no lib-chase thread is left and no fd of the
    daemon points at the bootstrap copy or the blob (before, the thread kept the
    bootstrap open for its idle time or as long as a fetch hung). The idle time is set
    beyond the test's waits, so only the release can end either thread. The fetches the
    held chase left behind store nothing once they end."""
    require_lazy_kernel()
    monkeypatch.setenv("FSCACHE_DAEMON_START_SET", "0")
    monkeypatch.setenv("FSCACHE_DAEMON_LIB_CHASE_IDLE", "3600")
    proxy = _HoldRanges(registry.host)
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        for held in (True, False):
            # an image each (big.bin differs): the other's blob is cached already
            name = "held" if held else "idle"
            src = str(tmp_path / f"src-{name}")
            ctypes_so, needed = _tree(src)
            boot, blobs = str(tmp_path / f"boot-{name}"), str(tmp_path / f"blobs-{name}")
            blob_id = pack(src, boot, blobs)["blobs"][0]["blob_id"]
            client = registry.client()
            push_image(client, f"chase/{name}", "v1",
                       config=BlobSource(json.dumps({"config": {}}).encode(), OCI_CONFIG),
                       layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB, {})])
            client.close()
            mnt = str(tmp_path / f"mnt-{name}")
            d.mount(boot, mnt, f"registry:{proxy.host}/chase/{name}:v1")
            learnt = 1 if held else 2
            helpers.wait_until(lambda n=learnt: d.log(tail=400).count(
                "file runs known for readahead") == n, what="the file runs learnt")
            if held:    # the needed libraries' bytes hang at the registry from now on
                proxy.held_ranges = [_stored_extent(boot, blobs, p) for p in needed]
            with open(os.path.join(mnt, ctypes_so.lstrip("/")), "rb") as f:
                assert f.read(4) == b"\x7fELF"     # a miss: the chase starts
            if held:
                helpers.wait_until(lambda: proxy.held >= 1, what="a chase fetch held")
            else:
                helpers.wait_until(lambda: "library chase from" in d.log(tail=400),
                                   what="the chase done")
            # the thread is there (working, or idle with its planner's bootstrap open)
            assert _chase_threads(d)
            if not held:
                assert any("/bootstraps/" in t for t in _image_fds(d, blob_id))
            d.umount(mnt)
            helpers.wait_until(lambda b=blob_id: not _chase_threads(d) and
                               not _image_fds(d, b), what="the chase's thread and fds gone after the umount")
            assert "library chase thread ended" in d.log(tail=400)
            if held:
                proxy.held_ranges = []
                proxy.release()     # the fetches the chase left end in their workers
                # and store nothing: the cache file is closed (not written through its
                # closed fd number, maybe another file's by then)
                helpers.wait_until(lambda: "the blob was released" in d.log(tail=400),
                                   what="the held fetches ended")
                assert not re.search(r"ERROR .*(not stored|write failed)",
                                     d.log(tail=400)), d.log(tail=400)
        assert d.metrics()["blobs"] is not None      # the daemon serves on
    finally:
        proxy.stop()
        d.cleanup()
