"""fscache-daemon's restore path: what a restarted daemon does with its state file
(cache/mounts.json) when the world changed while it was down. Real daemon processes,
the fanotify front end and its fd holder, real EROFS mounts on the host kernel."""
import glob
import json
import os
import shutil
import subprocess
import sys

import helpers
import pytest
from test_daemon_support import DaemonProc, mount_read_stop, small_image

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return small_image(tmp_path_factory.mktemp("restore-img"), seed=21)


def _state(d):
    with open(os.path.join(d.cache_dir, "mounts.json")) as f:
        return json.load(f)


def _mounts(d):
    st, mounts = d.api.request("GET", "/api/v1/mounts")
    assert st == 200, mounts
    return [m["mountpoint"] for m in mounts]


def _wait_log(d, text):
    return helpers.wait_until(lambda: text in d.log(400), 30, f"{text!r} in the daemon log")


def _mounted_then_stopped(tmp_path, image):
    """A daemon that mounted the image, read one file, then stopped (SIGTERM: the mount
    stays); -> (daemon, mountpoint)."""
    d = DaemonProc(str(tmp_path / "d"))
    d.start()
    mnt = str(tmp_path / "mnt")
    mount_read_stop(d, image, mnt)
    assert [m["mountpoint"] for m in _state(d)["mounts"]] == [mnt]
    return d, mnt


def test_unreadable_state_file_starts_without_mounts(tmp_path, image):
    d = DaemonProc(str(tmp_path / "d"))
    try:
        d.start()
        mnt = str(tmp_path / "mnt")
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        d.umount(mnt)
        d.stop()
        state = os.path.join(d.cache_dir, "mounts.json")
        with open(state, "w") as f:
            f.write('{"version": 1, "mounts": [')           # cut short: not JSON
        d.start()
        _wait_log(d, "unreadable")
        assert _mounts(d) == []
        # the daemon works: a new mount serves correct bytes and is saved again
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        helpers.assert_same_tree(image["src"], mnt)
        assert [m["mountpoint"] for m in _state(d)["mounts"]] == [mnt]
    finally:
        d.cleanup()


def test_mountpoint_unmounted_while_down_is_forgotten(tmp_path, image):
    d, mnt = _mounted_then_stopped(tmp_path, image)
    try:
        helpers.sys_umount(mnt)               # gone while no daemon ran
        d.mounts.remove(mnt)
        d.start()
        _wait_log(d, "no longer mounted")
        assert _mounts(d) == []
        assert _state(d)["mounts"] == []
        # the same mount point can be used again at once
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        helpers.assert_same_tree(image["src"], mnt)
    finally:
        d.cleanup()


def test_missing_bootstrap_copy_is_reported_and_not_picked_up(tmp_path, image):
    d, mnt = _mounted_then_stopped(tmp_path, image)
    try:
        copy = _state(d)["mounts"][0]["bootstrap"]
        assert copy != image["boot"] and os.path.exists(copy)
        os.unlink(copy)
        d.start()
        _wait_log(d, f"cannot pick up mount {mnt}")
        assert _mounts(d) == []
        assert _state(d)["mounts"] == []
    finally:
        if os.path.ismount(mnt):
            helpers.sys_umount(mnt, lazy=True)
        d.mounts.clear()
        d.cleanup()


def test_restart_with_same_frontend_serves_uncached_data(tmp_path, image):
    """The reference case for the one below: same front end, the mount is picked up."""
    d, mnt = _mounted_then_stopped(tmp_path, image)
    try:
        d.start()
        assert _mounts(d) == [mnt]
        helpers.assert_same_tree(image["src"], mnt)
    finally:
        d.cleanup()


def test_restart_with_another_frontend_is_refused(tmp_path, image):
    """Mounts made through fanotify cannot be served by another front end: the daemon
    refuses to start with a one-line error, leaves the state file as it was, and a
    restart with the right front end picks the mount up and serves it."""
    d, mnt = _mounted_then_stopped(tmp_path, image)
    try:
        before = _state(d)
        d.frontend = "none"
        with pytest.raises(AssertionError, match="daemon exited 1"):
            d.start()
        last = d.log(5).strip().splitlines()[-1]
        assert last.startswith("error: ") and "--frontend fanotify" in last, last
        assert _state(d) == before
        d.frontend = "fanotify"
        d.start()
        assert _mounts(d) == [mnt]
        helpers.assert_same_tree(image["src"], mnt)
    finally:
        d.frontend = "fanotify"
        d.cleanup()


def _restarted_with_backend_away(tmp_path, image):
    """A daemon that mounted the image from a copy of its blobs and read one file, was
    stopped, and started again with the copy moved to `<blobs>.away` and the chunk maps
    gone (the restart needs the backend); -> (daemon, mountpoint, blobs)."""
    blobs = str(tmp_path / "blobs")
    shutil.copytree(image["blobs"], blobs)
    d = DaemonProc(str(tmp_path / "d"))
    mnt = str(tmp_path / "mnt")
    try:
        d.start()
        mount_read_stop(d, image, mnt, blobs)
        for f in glob.glob(os.path.join(d.cache_dir, "blobs", "*.map")):
            os.unlink(f)
        os.rename(blobs, blobs + ".away")
        d.start()
    except BaseException:
        if os.path.isdir(blobs + ".away"):
            os.rename(blobs + ".away", blobs)
        d.cleanup()
        raise
    return d, mnt, blobs


def test_mount_whose_backend_is_away_at_restart_is_taken_back_when_it_returns(tmp_path,
                                                                                image):
    """A restart during a backend outage (the localfs directory moved away, no chunk map
    on disk) cannot pick the mount up yet: it stays in mounts.json and in the daemon's
    `unpicked` list (forgotten, no later restart served it again while its kernel mount
    lived on), is tried again, and once the backend is back it is taken back and serves
    data never fetched before."""
    d, mnt, blobs = _restarted_with_backend_away(tmp_path, image)
    try:
        _wait_log(d, f"cannot pick up mount {mnt} yet")
        assert _mounts(d) == []
        assert [m["mountpoint"] for m in _state(d)["mounts"]] == [mnt]
        st, info = d.api.request("GET", "/api/v1/daemon")
        assert st == 200 and [u["mountpoint"] for u in info["unpicked"]] == [mnt], info
        assert "does not exist" in info["unpicked"][0]["error"]
        shown = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                                "--api-sock", d.sock], capture_output=True, text=True)
        assert f"{mnt}  NOT SERVED YET" in shown.stdout, (shown.stdout, shown.stderr)
        _wait_log(d, f"still cannot pick up mount {mnt}")    # tried again meanwhile
        os.rename(blobs + ".away", blobs)
        helpers.wait_until(lambda: _mounts(d) == [mnt], 60, "the mount taken back")
        helpers.assert_same_tree(image["src"], mnt)
        st, info = d.api.request("GET", "/api/v1/daemon")
        assert st == 200 and info["unpicked"] == [], info
        assert [m["mountpoint"] for m in _state(d)["mounts"]] == [mnt]
    finally:
        if os.path.isdir(blobs + ".away"):
            os.rename(blobs + ".away", blobs)
        d.cleanup()


def test_a_mount_not_taken_back_yet_can_be_unmounted(tmp_path, image):
    """`umount` of a mount the restart could not take back (its backend away) unmounts
    it and drops its record: nothing is tried again, nothing is left in mounts.json."""
    d, mnt, blobs = _restarted_with_backend_away(tmp_path, image)
    try:
        _wait_log(d, f"cannot pick up mount {mnt} yet")
        st, res = d.api.request("POST", "/api/v1/umount", {"mountpoint": mnt})
        assert st == 200 and res["unmounted"] and res["released"], res
        assert not os.path.ismount(mnt)
        d.mounts.remove(mnt)
        assert _state(d)["mounts"] == []
        st, info = d.api.request("GET", "/api/v1/daemon")
        assert st == 200 and info["unpicked"] == [], info
    finally:
        shutil.rmtree(blobs + ".away", ignore_errors=True)
        d.cleanup()
