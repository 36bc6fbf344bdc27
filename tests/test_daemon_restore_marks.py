"""The fd holder's marks of the mounts a restarted daemon forgot (restore.py,
FanotifyFrontend.release_unused, the holder's sweep): released once nothing uses their
cache files, in any mount namespace; kept, and never read as zeros, while a superblock
still does. Real daemon processes, the fd holder, real EROFS mounts on the host kernel."""
import contextlib
import os
import subprocess
import threading

import helpers
import pytest
from faults import timed_read
from test_daemon_support import DaemonProc, mount_read_stop, small_image

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return small_image(tmp_path_factory.mktemp("restore-marks"), seed=23)


def _holder(d):
    return os.path.join(d.cache_dir, "fdholder.sock")


@contextlib.contextmanager
def _channel(d):
    """A control connection of our own to the daemon's fd holder."""
    from fscache_daemon.frontend.fdholder import HolderChannel
    ch = HolderChannel(_holder(d), timeout=10)
    try:
        yield ch
    finally:
        ch.close()


def _sweep_keeping_nothing(d):
    """One sweep of our own with an empty keep list: -> the marks the holder released."""
    with _channel(d) as ch:
        return ch.release_unused([])


def _marks(d):
    return helpers.holder_status(_holder(d))["marks"]


def _holder_pid(d):
    with _channel(d) as ch:
        return ch.holder_pid


def _held_files(pid, under):
    """The files under `under` the process `pid` holds open (' (deleted)' kept)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(under):
            out.append(target)
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:     # a zombie of ours is gone too
        return f.read().split(") ")[-1][0] != "Z"


def _mounted_then_stopped(tmp_path, image):
    """A daemon (no readahead: the rest of the blob stays uncached) that mounted the
    image and read one file, then stopped (SIGTERM: the mount and its mark stay)."""
    d = DaemonProc(str(tmp_path / "d"), extra=["--readahead", "0"])
    d.start()
    mnt = str(tmp_path / "mnt")
    mount_read_stop(d, image, mnt)
    marked = _marks(d)
    assert len(marked) == 1 and marked[0].endswith(".blob"), marked
    return d, mnt, marked[0]


def test_marks_of_a_mount_unmounted_while_down_are_released(tmp_path, image):
    """Unmounted while no daemon ran, the mount is forgotten by the restart, which never
    opens its blob: its cache file stayed marked in the holder, with the holder's writer
    fd open on it, for the holder's life (evicted, its disk space too); and the holder,
    which exits only without marks, outlived every daemon."""
    d, mnt, cache_file = _mounted_then_stopped(tmp_path, image)
    holder = _holder_pid(d)
    try:
        assert _held_files(holder, os.path.dirname(cache_file) + "/") != []
        helpers.sys_umount(mnt)             # the kernel's last user: gone while down
        d.mounts.remove(mnt)
        d.start()
        helpers.wait_until(lambda: "no longer mounted" in d.log(400), 30, "the restore")
        helpers.wait_until(lambda: _marks(d) == [], 30, "the forgotten mark released")
        assert _held_files(holder, os.path.dirname(cache_file) + "/") == [], "still open"
        assert "no mount of ours and nobody has it open; unmarked" in d.log(400)
        # nothing mounted, nothing marked: a clean stop lets the holder go too
        d.stop()
        helpers.wait_until(lambda: not _alive(holder), 30, "the holder's exit")
        # and a mount of the blob made since is served as ever
        d.start()
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        helpers.assert_same_tree(image["src"], mnt)
    finally:
        d.cleanup()


def test_marks_of_a_forgotten_mount_the_kernel_still_uses_stay_until_it_lets_go(
        tmp_path, image):
    """A restart that forgets a mount the kernel still has (its state file unreadable)
    must keep its cache file marked while a superblock uses it, here through another
    mount namespace as well: unmarked, its uncached holes would read as zeros. Its
    readers get the right bytes or EIO, never zeros nor a hang. Once the kernel lets go
    of the last user the mark goes."""
    d, mnt, cache_file = _mounted_then_stopped(tmp_path, image)
    holder = _holder_pid(d)
    ns = None
    try:
        with open(os.path.join(d.cache_dir, "mounts.json"), "w") as f:
            f.write('{"version": 1, "mounts": [')        # cut short: not JSON
        # a process in its own mount namespace holds the superblock too
        ns = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               "echo ready; exec sleep 600"], stdout=subprocess.PIPE)
        assert ns.stdout.readline() == b"ready\n"
        # a reader that waits while no daemon runs (its event pending in the holder)
        big = os.path.join("d1", "big0.bin")
        with open(os.path.join(image["src"], big), "rb") as f:
            want_big = f.read()
        waiting: dict = {}
        reader = threading.Thread(target=lambda: waiting.update(
            r=timed_read(os.path.join(mnt, big), want_big, 120)))
        reader.start()
        helpers.wait_holder_pending(_holder(d))
        d.start()
        # the restart forgets the mount: its reader is answered (EIO), not left waiting
        reader.join(120)
        assert waiting["r"].kind == "eio", waiting
        helpers.wait_until(lambda: "unreadable" in d.log(400), 30, "the restore")
        # the daemon's sweeps and one of ours (nothing kept) leave it marked: in use
        assert _sweep_keeping_nothing(d) == []
        assert _marks(d) == [cache_file]
        outcomes = {}
        for root, _dirs, names in os.walk(image["src"]):
            for n in names:
                p = os.path.join(root, n)
                if os.path.islink(p) or not os.path.getsize(p):
                    continue
                rel = os.path.relpath(p, image["src"])
                with open(p, "rb") as f:
                    want = f.read()
                outcomes[rel] = timed_read(os.path.join(mnt, rel), want, 60)
        assert all(o.kind in ("ok", "eio") for o in outcomes.values()), outcomes
        assert any(o.kind == "eio" for o in outcomes.values()), outcomes
        assert outcomes["small.txt"].kind == "ok"
        # gone from our namespace: the other one still has it, so the mark stays
        helpers.sys_umount(mnt)
        d.mounts.clear()
        assert _sweep_keeping_nothing(d) == []
        assert _marks(d) == [cache_file]
        ns.kill()                                # the kernel's last user of it
        ns.wait()
        ns = None
        helpers.wait_until(lambda: _marks(d) == [], 60, "the mark released")
        assert _held_files(holder, os.path.dirname(cache_file) + "/") == []
        d.stop()
        helpers.wait_until(lambda: not _alive(holder), 30, "the holder's exit")
    finally:
        if ns is not None:
            ns.kill()
            ns.wait()
        if os.path.ismount(mnt):
            helpers.sys_umount(mnt, lazy=True)
        d.mounts.clear()
        d.cleanup()


def test_holder_without_a_daemon_ends_on_sigterm_once_no_mount_uses_its_marks(tmp_path,
                                                                             image):
    """No daemon runs again after a stop. SIGTERM of the fd holder is refused while the
    kernel still uses a marked cache file (exiting would fail open: its holes read as
    zeros); once the last mount is gone it releases the mark and exits. It refused for
    as long as the mark existed, that is for ever."""
    import signal
    d, mnt, cache_file = _mounted_then_stopped(tmp_path, image)
    holder = _holder_pid(d)
    try:
        os.kill(holder, signal.SIGTERM)
        helpers.wait_until(lambda: "refusing SIGTERM" in _holder_log(d), 30, "a refusal")
        assert _alive(holder) and _marks(d) == [cache_file]
        helpers.sys_umount(mnt)
        d.mounts.remove(mnt)
        os.kill(holder, signal.SIGTERM)
        helpers.wait_until(lambda: not _alive(holder), 30, "the holder's exit")
        assert "no mount uses it any more" in _holder_log(d)
    finally:
        d.cleanup()


def _holder_log(d):
    with open(os.path.join(d.cache_dir, "fdholder.log"), errors="replace") as f:
        return f.read()
