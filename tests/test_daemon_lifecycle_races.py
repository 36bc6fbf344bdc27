"""Work handed between the daemon's threads around a blob's release (lifecycle.py): a
mount that shares a blob while the blob's last image lets it go, a blob opened again
while its release is still under way. Each interleaving is injected (a hook at the
exact step), not waited for."""

import os
import threading
import time

import pytest
from faults import timed_read
from test_daemon_support import pack, require_lazy_kernel, write_tree

from fscache_daemon.daemon import Daemon
from fscache_daemon.frontend.base import sys_umount


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    base = tmp_path_factory.mktemp("races")
    src = write_tree(str(base / "src"), seed=41, nfiles=6, big=(1 << 20,), text=False)
    info = pack(src, str(base / "a.boot"), str(base / "blobs"), "--chunk-size", "0x10000")
    return {"src": src, "boot": str(base / "a.boot"), "backend": f"localfs:{base / 'blobs'}",
            "blob_id": info["blobs"][0]["blob_id"]}


def test_mount_sharing_a_blob_its_last_image_releases_meanwhile(image, tmp_path):
    """Mount 2 finds the blob open (mount 1's) and shares its manager; before mount 2 is
    registered as a user, mount 1 is unmounted: the blob has no user and is released.
    Mount 2 must not end up served by that closed manager (every read of it failed:
    'no blob open')."""
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    d.start()
    mp1, mp2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    real_open = d._open_blob
    shared: list = []

    def open_blob(ref, backend, key=None, early=None):
        mgr = real_open(ref, backend, key, early)
        if not shared:
            shared.append(mgr)
            d.umount(mp1)       # the blob's only user goes, before mount 2 is one
        return mgr
    try:
        d.mount(image["boot"], mp1, image["backend"])
        first = d.blobs[image["blob_id"]]
        d._open_blob = open_blob
        d.mount(image["boot"], mp2, image["backend"])
        assert shared == [first]            # mount 2 did share mount 1's manager
        key = d.images[os.path.realpath(mp2)].blob_keys[0]
        assert d.blob_users == {key: {os.path.realpath(mp2)}}
        mgr = d.blobs.get(key)
        assert mgr is not None and mgr is not first, "mount 2 is served by a closed blob"
        d.fill(key, 0, 1 << 16)             # its reads are served
        assert mgr.cache.cached_chunks >= 1
        d.umount(mp2)
        assert d.blobs == {} and d.blob_users == {}
    finally:
        d.shutdown()


def test_mount_sharing_a_blob_a_failed_mount_closes_meanwhile(image, tmp_path):
    """The same through a failed mount: mount 1 opened the blob (no user yet) and fails
    afterwards (_close_unused); mount 2 shared the manager in between."""
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    d.start()
    mp1, mp2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    real_open = d._open_blob
    opened, shared, go_on = threading.Event(), threading.Event(), threading.Event()

    def open_blob(ref, backend, key=None, early=None):
        mgr = real_open(ref, backend, key, early)
        if threading.current_thread().name == "mount-1":
            opened.set()
            assert shared.wait(30)
            # a sibling blob of mount 1 failed: open_side_by_side gives what was opened
            # beside it to _close_unused, then the mount fails
            d._close_unused([mgr])
            raise OSError("mount 1 fails after opening its blob")
        if not shared.is_set():
            shared.set()
            assert go_on.wait(30)       # mount 1 closes what it opened meanwhile
        return mgr
    d._open_blob = open_blob
    errors: list = []

    def mount1():
        try:
            d.mount(image["boot"], mp1, image["backend"])
        except OSError as e:
            errors.append(e)
        finally:
            go_on.set()
    t = threading.Thread(target=mount1, name="mount-1")
    try:
        t.start()
        assert opened.wait(30)
        d.mount(image["boot"], mp2, image["backend"])
        t.join(30)
        assert len(errors) == 1
        key = d.images[os.path.realpath(mp2)].blob_keys[0]
        assert d.blob_users == {key: {os.path.realpath(mp2)}}
        assert d.blobs.get(key) is not None, "mount 2 is served by a closed blob"
        d.fill(key, 0, 1 << 16)
        d.umount(mp2)
        assert d.blobs == {} and d.blob_users == {}
    finally:
        go_on.set()
        t.join(30)
        d.shutdown()


def _files(src):
    out = []
    for root, _dirs, names in os.walk(src):
        for n in names:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p):
                out.append(os.path.relpath(p, src))
    return sorted(out)


def _reads_back(src, mp):
    """Every file of the source tree reads back whole and identical under mp."""
    for rel in _files(src):
        with open(os.path.join(src, rel), "rb") as f:
            want = f.read()
        got = timed_read(os.path.join(mp, rel), want, 60)
        assert got.kind == "ok", (rel, got)


def _take_down(d, mps):
    """Unmount what is still mounted (lazily if the daemon cannot), stop the daemon."""
    for mp in mps:
        if os.path.ismount(mp):
            try:
                d.umount(mp)
            except Exception:  # noqa: BLE001
                sys_umount(mp, True)
    d.shutdown()


@pytest.mark.root
def test_blob_opened_again_while_its_release_unmarks_it(image, tmp_path):
    """Mount 1's umount releases its blob: the blob leaves Daemon.blobs, then the front
    end unmarks its cache file. Mount 2 of the same image in between opens the blob
    again (a new manager, the same cache file): the fanotify front end still had the
    file marked under that key and left the new manager as it was, then the release
    removed the mark. Mount 2's kernel then read the never-fetched holes of the cache
    file as zeros. A blob's release must end before it is opened again."""
    require_lazy_kernel()
    d = Daemon(str(tmp_path / "cache"), frontend="fanotify", threads=2, readahead=0)
    d.start()
    mp1, mp2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    os.makedirs(mp1)
    os.makedirs(mp2)
    fe = d.frontend
    real_prepare, real_release = fe.prepare_blob, fe.release_blob
    prepared, hooked = threading.Event(), threading.Event()
    errors: list = []

    def mount2():
        try:
            d.mount(image["boot"], mp2, image["backend"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t2 = threading.Thread(target=mount2)

    def prepare_blob(mgr):
        real_prepare(mgr)
        prepared.set()

    def waits_for_blob():
        entry = d._blob_opening._locks.get(image["blob_id"])
        return entry is not None and entry[1] >= 2     # one holds it, mount 2 waits

    def release_blob(mgr):
        if not hooked.is_set():
            hooked.set()
            t2.start()      # mount 2 comes now, in the middle of mount 1's release
            deadline = time.monotonic() + 60
            while not (prepared.is_set() or waits_for_blob()):
                assert time.monotonic() < deadline, "mount 2 neither opened nor waited"
                time.sleep(0.01)
        real_release(mgr)

    try:
        d.mount(image["boot"], mp1, image["backend"])
        fe.prepare_blob, fe.release_blob = prepare_blob, release_blob
        d.umount(mp1)
        deadline = time.monotonic() + 60
        while not hooked.is_set():      # released by umount, or by the reaper
            assert time.monotonic() < deadline, "mount 1's blob was never released"
            time.sleep(0.05)
        t2.join(60)
        assert not t2.is_alive() and errors == []
        assert d.blobs[image["blob_id"]].cache.cached_chunks == 0
        _reads_back(image["src"], mp2)
    finally:
        _take_down(d, (mp2, mp1))


@pytest.mark.root
def test_late_completion_of_a_released_blob_leaves_its_successor_marked(image, tmp_path):
    """A fill completes the blob and calls its completion hook (Daemon._blob_complete,
    after an fdatasync: a long window) only after the blob was released, its cache file
    evicted (--cache-size), and a new mount opened the blob again in a new, empty cache
    file. The late hook unmarked "the blob's key": the new file's mark, through its path,
    and the new mount read zeros. (Front end fanotify-local: with the fd holder the
    closed manager's fstat failed first; --trace-window 0: a blob completed ahead of its
    readers is unmarked at once.)"""
    require_lazy_kernel()
    d = Daemon(str(tmp_path / "cache"), frontend="fanotify-local", threads=2, readahead=0,
               cache_size=1, trace_window=0)
    real_complete = d._blob_complete
    completing, go_on, done = threading.Event(), threading.Event(), threading.Event()

    def blob_complete(mgr):     # the first completion waits until mount 2 is made
        first = not completing.is_set()
        completing.set()
        try:
            if first:
                assert go_on.wait(60)
            real_complete(mgr)
        finally:
            if first:
                done.set()
    d._blob_complete = blob_complete    # before any manager is made with it
    d.start()
    mp1, mp2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    os.makedirs(mp1)
    os.makedirs(mp2)
    cache_file = os.path.join(d.blob_dir, image["blob_id"] + ".blob")
    try:
        d.mount(image["boot"], mp1, image["backend"], prefetch=True)
        assert completing.wait(60), "the prefetch never completed the blob"
        old = d.blobs[image["blob_id"]]
        d.umount(mp1)
        assert image["blob_id"] not in d.blobs
        deadline = time.monotonic() + 60
        while os.path.exists(cache_file):       # evicted: over the 1-byte limit
            assert time.monotonic() < deadline, "the released blob was not evicted"
            d.evict_once()
            time.sleep(0.05)
        d.mount(image["boot"], mp2, image["backend"])
        new = d.blobs[image["blob_id"]]
        assert new is not old and new.cache.cached_chunks == 0
        go_on.set()
        assert done.wait(60)
        _reads_back(image["src"], mp2)
    finally:
        go_on.set()
        _take_down(d, (mp2, mp1))


def _kernel_marks(group_fd):
    """The inodes this process's fanotify group marks, as the kernel lists them."""
    with open(f"/proc/self/fdinfo/{group_fd}") as f:
        return [line for line in f if line.startswith("fanotify ino:")]


@pytest.mark.root
def test_late_completion_of_a_released_blob_keeps_its_successors_trace_window(image,
                                                                             tmp_path):
    """As above, with a trace window: the successor (a new manager of the blob, in a new
    cache file) completes by prefetch before the released manager's completion hook
    runs; completed ahead of its readers, it is kept marked for the window
    (Daemon._kept_marked). The late hook put the released manager in its place, which
    the trace unmarker then dropped as released: the successor's cache file stayed
    marked until its own release, every warm read of it an event (a cost, not wrong
    bytes). The hook is held back here and run late by the test."""
    require_lazy_kernel()
    d = Daemon(str(tmp_path / "cache"), frontend="fanotify-local", threads=2,
               readahead=0, cache_size=1, trace_window=1)
    real_complete = d._blob_complete
    held: list = []

    def blob_complete(mgr):     # the first completion's hook is run late, by the test
        if not held:
            held.append(mgr)
        else:
            real_complete(mgr)
    d._blob_complete = blob_complete
    d.start()
    mp1, mp2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    os.makedirs(mp1)
    os.makedirs(mp2)
    key = image["blob_id"]
    cache_file = os.path.join(d.blob_dir, key + ".blob")
    try:
        d.mount(image["boot"], mp1, image["backend"], prefetch=True)
        deadline = time.monotonic() + 60
        while not held:
            assert time.monotonic() < deadline, "the prefetch never completed the blob"
            time.sleep(0.02)
        old = d.blobs[key]
        assert held == [old]
        d.umount(mp1)
        assert key not in d.blobs
        deadline = time.monotonic() + 60
        while os.path.exists(cache_file):       # evicted: over the 1-byte limit
            assert time.monotonic() < deadline, "the released blob was not evicted"
            d.evict_once()
            time.sleep(0.05)
        d.mount(image["boot"], mp2, image["backend"], prefetch=True)
        new = d.blobs[key]
        assert new is not old
        deadline = time.monotonic() + 60
        while d._kept_marked.get(key, (None,))[0] is not new:
            assert time.monotonic() < deadline, "the successor was not kept marked"
            time.sleep(0.02)
        real_complete(old)          # the released manager's hook, late
        # the window (1 s) ends: the successor's cache file is unmarked
        group_fd = d.frontend.watcher.group_fd
        deadline = time.monotonic() + 30
        while _kernel_marks(group_fd):
            assert time.monotonic() < deadline, \
                f"the successor stays marked: {d._kept_marked}"
            time.sleep(0.1)
        _reads_back(image["src"], mp2)
    finally:
        _take_down(d, (mp2, mp1))
