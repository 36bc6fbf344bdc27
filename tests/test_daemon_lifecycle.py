"""When the daemon may let a blob go, on this machine's kernel (root, fanotify front end).

The rule under test: a reader never sees zeros or other wrong bytes because the daemon
unmarked or released a blob's cache file while an EROFS superblock still reads it --
whether the mount point was unmounted under an overlay, another mount namespace, a lazy
unmount, a foreign mount stacked on top, a symlink alias, or a daemon killed mid-mount.
Each test builds the situation for real and reads never-fetched data afterwards.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import helpers
import pytest
from test_daemon_support import (
    REPO,
    DaemonProc,
    file_sha,
    lazy_daemon,
    pack,
    regular_files,
    require_lazy_kernel,
    sysfs_name,
    write_tree,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """~14 MB tree in 64 KiB chunks: many chunks, so most of it stays unfetched."""
    require_lazy_kernel()
    base = tmp_path_factory.mktemp("lifeimg")
    src = write_tree(str(base / "src"), seed=11, nfiles=60, big=(4 << 20, 3 << 20))
    info = pack(src, str(base / "boot"), str(base / "blobs"), "--chunk-size", "0x10000")
    return {"src": src, "boot": str(base / "boot"), "blobs": str(base / "blobs"),
            "blob_id": info["blobs"][0]["blob_id"],
            "chunks": info["blobs"][0]["chunk_count"]}


@pytest.fixture
def daemon(tmp_path):
    yield from lazy_daemon(tmp_path)


def cli(d, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fscache_daemon.cli", *args, "--api-sock",
                           d.sock], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def holder_marks(d):
    from fscache_daemon.frontend.fdholder import HolderChannel
    ch = HolderChannel(os.path.join(d.cache_dir, "fdholder.sock"), timeout=5)
    try:
        return ch.status()["marks"]
    finally:
        ch.close()


def cache_file(d, blob_id):
    return os.path.join(d.cache_dir, "blobs", blob_id + ".blob")


def assert_exact(src, root, rels):
    """Every file reads back exactly (an error would be allowed; none is expected)."""
    for rel in rels:
        assert file_sha(os.path.join(root, rel)) == file_sha(os.path.join(src, rel)), rel


def released(d, blob_id):
    m = d.metrics()
    return blob_id not in m["blobs"] and m["detached"] == 0


def sha_in_namespace(pid, path):
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "sha256sum", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[0]


# ------------------------------------------------------------- issue 13, defect 1
def test_umount_under_overlay_namespace_and_open_file_never_gives_zeros(daemon, image,
                                                                         tmp_path):
    helpers.require_tool("unshare")
    helpers.require_tool("nsenter")
    src, blob_id = image["src"], image["blob_id"]
    mnt = str(tmp_path / "mnt")
    daemon.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
    files = sorted(regular_files(src), key=lambda r: -os.path.getsize(os.path.join(src, r)))
    files = [f for f in files if os.path.getsize(os.path.join(src, f)) > 0]
    via_overlay, via_ns, via_fd = files[0::3], files[1::3], files[2]
    assert daemon.blob_metrics(blob_id)["cached_chunks"] == 0

    # 1. an overlayfs whose lower layer is the lazy mount
    ov = {k: str(tmp_path / k) for k in ("upper", "work", "merged")}
    for p in ov.values():
        os.makedirs(p)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt},upperdir={ov['upper']},workdir={ov['work']}",
                    ov["merged"]], check=True)
    ns = fd = None
    try:
        # 2. a second mount namespace holding a copy of the mount
        ns = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
        helpers.wait_until(lambda: os.readlink(f"/proc/{ns.pid}/ns/mnt") !=
                 os.readlink("/proc/self/ns/mnt"), 30, "the new namespace")
        # 3. an open file (through the overlay) of data never fetched
        fd = os.open(os.path.join(ov["merged"], via_fd), os.O_RDONLY)

        # an open file on the mount point itself: umount is refused, clearly, exit 1
        with open(os.path.join(mnt, "small.txt"), "rb"):
            r = cli(daemon, "umount", mnt)
        assert r.returncode == 1 and "busy" in r.stderr, (r.returncode, r.stderr)
        assert os.path.ismount(mnt)

        r = cli(daemon, "umount", mnt)
        assert r.returncode == 0, r.stderr
        assert "still in use" in r.stdout, r.stdout
        assert not os.path.ismount(mnt)
        m = daemon.metrics()
        assert m["mounts"] == 0 and m["detached"] == 1
        assert blob_id in m["blobs"]
        assert cache_file(daemon, blob_id) in holder_marks(daemon)
        assert daemon.blob_metrics(blob_id)["cached_chunks"] == 0   # still nothing fetched

        # never-fetched data, read after the umount: exact bytes, never zeros
        assert_exact(src, ov["merged"], via_overlay)
        for rel in via_ns:
            assert sha_in_namespace(ns.pid, os.path.join(mnt, rel)) == \
                file_sha(os.path.join(src, rel)), rel
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        with open(os.path.join(src, via_fd), "rb") as f:
            assert data == f.read()
        assert daemon.blob_metrics(blob_id)["bytes_fetched"] > 0

        # holders go one by one: the blob stays until the last one is gone
        os.close(fd)
        fd = None
        subprocess.run(["umount", ov["merged"]], check=True)
        time.sleep(1.0)
        assert not released(daemon, blob_id)       # the other namespace still holds it
        assert_exact(src, f"/proc/{ns.pid}/root{mnt}", [via_ns[0]])
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.ismount(ov["merged"]):
            subprocess.run(["umount", "-l", ov["merged"]])
        if ns is not None:
            ns.kill()
            ns.wait()
    helpers.wait_until(lambda: released(daemon, blob_id), 30, "the blob's release")
    assert cache_file(daemon, blob_id) not in holder_marks(daemon)
    daemon.mounts.remove(mnt)


def test_detached_image_survives_daemon_restart(image, tmp_path):
    """Same rule at shutdown: an image unmounted while an overlay holds it stays marked
    (recorded as detached) across a daemon stop; a read meanwhile waits, the next daemon
    serves it exactly and releases the blob when the overlay goes."""
    require_lazy_kernel()
    src, blob_id = image["src"], image["blob_id"]
    d = DaemonProc(str(tmp_path / "d")).start()
    mnt = str(tmp_path / "mnt")
    ov = {k: str(tmp_path / k) for k in ("upper", "work", "merged")}
    for p in ov.values():
        os.makedirs(p)
    try:
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mnt},upperdir={ov['upper']},workdir={ov['work']}",
                        ov["merged"]], check=True)
        assert d.api.request("POST", "/api/v1/umount", {"mountpoint": mnt})[1]["released"] \
            is False
        d.mounts.remove(mnt)
        d.stop()
        with open(os.path.join(d.cache_dir, "mounts.json")) as f:
            assert [m["state"] for m in json.load(f)["mounts"]] == ["detached"]
        assert cache_file(d, blob_id) in holder_marks(d)
        files = [r for r in regular_files(src) if os.path.getsize(os.path.join(src, r))]
        out = {}
        t = threading.Thread(target=lambda: out.update(
            {r: file_sha(os.path.join(ov["merged"], r)) for r in files}))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()                        # waits for a daemon, reads no zeros
        d.start()
        t.join(120)
        assert out == {r: file_sha(os.path.join(src, r)) for r in files}
        assert d.metrics()["detached"] == 1
        subprocess.run(["umount", ov["merged"]], check=True)
        helpers.wait_until(lambda: released(d, blob_id), 30, "the blob's release")
        assert cache_file(d, blob_id) not in holder_marks(d)
    finally:
        if os.path.ismount(ov["merged"]):
            subprocess.run(["umount", "-l", ov["merged"]])
        d.cleanup()


# ------------------------------------------------------------- issue 19, item 2
def test_lazy_umount_while_readers_read(image, tmp_path):
    """Readers read their first 64 KiB, the mount is lazily unmounted, they read on:
    everything after the umount is data never fetched (readahead off), and exact."""
    require_lazy_kernel()
    src, blob_id = image["src"], image["blob_id"]
    daemon = DaemonProc(str(tmp_path / "d"), extra=["--readahead", "0"]).start()
    try:
        mnt = str(tmp_path / "mnt")
        daemon.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        files = [r for r in regular_files(src) if os.path.getsize(os.path.join(src, r))]
        fds = {rel: os.open(os.path.join(mnt, rel), os.O_RDONLY) for rel in files}
        errors, bad = [], []
        first = threading.Barrier(5)
        go_on = threading.Event()

        def reader(part):
            got = {rel: os.pread(fds[rel], 65536, 0) for rel in part[:1]}
            first.wait()
            go_on.wait()
            for rel in part:
                try:
                    chunks, off = [], 0
                    while True:
                        b = os.pread(fds[rel], 65536, off)
                        if not b:
                            break
                        chunks.append(b)
                        off += len(b)
                    with open(os.path.join(src, rel), "rb") as f:
                        want = f.read()
                    if b"".join(chunks) != want or got.get(rel, want[:65536]) != want[:65536]:
                        bad.append(rel)
                except OSError as e:
                    errors.append((rel, e))

        threads = [threading.Thread(target=reader, args=(files[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        first.wait()
        cached = daemon.blob_metrics(blob_id)["cached_chunks"]
        assert cached <= 8, cached                 # nearly all of it never fetched
        r = cli(daemon, "umount", "--lazy", mnt)
        go_on.set()
        assert r.returncode == 0, r.stderr
        assert "still in use" in r.stdout, r.stdout    # the open files hold the superblock
        daemon.mounts.remove(mnt)
        for t in threads:
            t.join(120)
        assert not bad, bad                            # wrong bytes: never
        assert not errors, errors
        assert daemon.metrics()["detached"] == 1
        assert daemon.blob_metrics(blob_id)["cached_chunks"] == image["chunks"]
        for fd in fds.values():
            os.close(fd)
        helpers.wait_until(lambda: released(daemon, blob_id), 30, "the blob's release")
    finally:
        daemon.cleanup()


def test_symlink_alias_of_a_mount_point_is_the_same_mount_point(daemon, image, tmp_path):
    src = image["src"]
    real = str(tmp_path / "real")
    alias = str(tmp_path / "alias")
    os.makedirs(real)
    os.symlink(real, alias)
    other = str(tmp_path / "other")
    other_boot, other_blobs = str(tmp_path / "o.boot"), str(tmp_path / "o.blobs")
    pack(write_tree(str(tmp_path / "osrc"), seed=12, nfiles=5, big=(1 << 20,)), other_boot,
         other_blobs)
    daemon.mount(image["boot"], real, f"localfs:{image['blobs']}")
    # the second image through the alias would be stacked on the first: refused
    st, res = daemon.api.request("POST", "/api/v1/mounts", {
        "bootstrap": other_boot, "mountpoint": alias, "backend": f"localfs:{other_blobs}"})
    assert st == 409 and "already mounted" in res["error"] and alias in res["error"], res
    assert mounts_of(real) == 1
    # a mount point given through a symlink is recorded canonical, found by either name
    os.makedirs(other)
    link2 = str(tmp_path / "link2")
    os.symlink(other, link2)
    res = daemon.mount(other_boot, link2, f"localfs:{other_blobs}")
    assert res["mountpoint"] == other
    daemon.mounts[-1] = other
    r = cli(daemon, "umount", link2)
    assert r.returncode == 0 and not os.path.ismount(other), r.stderr
    daemon.mounts.remove(other)
    # the first image still reads exact bytes, never fetched before
    assert_exact(src, real, regular_files(src))


def mounts_of(path):
    from fscache_daemon import mounts
    return sum(1 for e in mounts.mountinfo() if e.mountpoint == path)


def test_foreign_mount_on_top_is_never_unmounted_by_the_daemon(daemon, image, tmp_path):
    src, blob_id = image["src"], image["blob_id"]
    mnt = str(tmp_path / "mnt")
    daemon.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "foreign", mnt], check=True)
    try:
        r = cli(daemon, "umount", mnt)
        assert r.returncode == 1 and "covers the image" in r.stderr, r.stderr
        assert mounts_of(mnt) == 2                 # the foreign mount is still there
        st, res = daemon.api.request("POST", "/api/v1/umount", {"mountpoint": mnt})
        assert st == 409, (st, res)
        assert blob_id in daemon.metrics()["blobs"]
    finally:
        subprocess.run(["umount", mnt], check=True)     # the foreign one, ours to remove
    assert_exact(src, mnt, regular_files(src))       # never fetched before: exact
    daemon.umount(mnt)
    helpers.wait_until(lambda: released(daemon, blob_id), 30, "the blob's release")


# ------------------------------------------------------------- issue 19, items 12, 13
KILL_AFTER_MOUNT = textwrap.dedent("""
    import os, signal, sys
    from fscache_daemon.daemon import Daemon
    cache, boot, mnt, blobs = sys.argv[1:5]
    d = Daemon(cache, frontend="fanotify", threads=2)
    d.start()
    # SIGKILL right after mount(2) returned, before the state save that follows it
    d._mount_id_of = lambda img: os.kill(os.getpid(), signal.SIGKILL)
    d.mount(boot, mnt, "localfs:" + blobs)
""")


def test_sigkill_between_mount_and_state_save_then_restart(image, tmp_path):
    require_lazy_kernel()
    src, blob_id = image["src"], image["blob_id"]
    d = DaemonProc(str(tmp_path / "d"))
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    try:
        r = subprocess.run([sys.executable, "-c", KILL_AFTER_MOUNT, d.cache_dir,
                            image["boot"], mnt, image["blobs"]], cwd=REPO, timeout=120)
        assert r.returncode == -signal.SIGKILL
        assert os.path.ismount(mnt)                # the kernel mount outlived the daemon
        with open(os.path.join(d.cache_dir, "mounts.json")) as f:
            assert [m["state"] for m in json.load(f)["mounts"]] == ["mounting"]
        d.start()
        d.mounts.append(mnt)
        st, ms = d.api.request("GET", "/api/v1/mounts")
        assert [m["mountpoint"] for m in ms] == [mnt] and ms[0]["state"] == "mounted", ms
        assert isinstance(ms[0]["mount_id"], int)
        # its superblock named exactly (the kernel's name for the mount found), not
        # guessed at umount from what went away meanwhile
        assert ms[0]["instances"] == [sysfs_name(mnt)], ms
        assert_exact(src, mnt, regular_files(src))   # served, not EIO forever
        d.umount(mnt)
        assert not os.path.ismount(mnt)
        helpers.wait_until(lambda: released(d, blob_id), 30, "the blob's release")
    finally:
        d.cleanup()


def test_symlinked_mount_point_is_remembered_across_restart(image, tmp_path):
    """Debian's /var/run -> /run: the path given goes through a symlinked directory."""
    require_lazy_kernel()
    src = image["src"]
    (tmp_path / "run").mkdir()
    os.symlink(str(tmp_path / "run"), str(tmp_path / "varrun"))
    given = str(tmp_path / "varrun" / "img")
    os.makedirs(given)
    canon = str(tmp_path / "run" / "img")
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        res = d.mount(image["boot"], given, f"localfs:{image['blobs']}")
        d.mounts[-1] = canon
        assert res["mountpoint"] == canon
        d.stop()
        d.start()
        st, ms = d.api.request("GET", "/api/v1/mounts")
        assert [m["mountpoint"] for m in ms] == [canon], ms
        assert_exact(src, given, regular_files(src))
        r = cli(d, "umount", given)
        assert r.returncode == 0 and not os.path.ismount(canon), r.stderr
        d.mounts.remove(canon)
    finally:
        d.cleanup()


# ------------------------------------------------------------- issue 19, item 14
def test_second_daemon_on_one_cache_dir_is_refused(daemon, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "run", "--cache-dir",
                        daemon.cache_dir, "--api-sock", str(tmp_path / "other.sock"),
                        "--frontend", "fanotify"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {daemon.cache_dir}: cache directory in use by another fscache-daemon "
        f"(pid {daemon.proc.pid})"), r.stderr
    assert daemon.api.answers()


def holder_pids(sock):
    from fscache_daemon.frontend.fanotify_adapter import find_holder
    pid = find_holder(sock)
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[-2:-1] == [sock.encode()]:
                        out.append(int(name))
            except OSError:
                pass
    assert pid is None or pid in out
    return out


def test_cache_dir_deleted_while_mounted_then_restart(image, tmp_path):
    require_lazy_kernel()
    src = image["src"]
    d = DaemonProc(str(tmp_path / "d")).start()
    mnt = str(tmp_path / "mnt")
    sock = os.path.join(d.cache_dir, "fdholder.sock")
    try:
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        assert_exact(src, mnt, ["small.txt"])
        [holder] = holder_pids(sock)
        d.stop()
        subprocess.run(["rm", "-rf", d.cache_dir], check=True)
        d.start()
        # the holder that owns the mount's marks is used again: no second one, no orphan
        assert holder_pids(sock) == [holder]
        # data the daemon can no longer know: an error, promptly -- never a hang or zeros
        big = max(regular_files(src), key=lambda r: os.path.getsize(os.path.join(src, r)))
        r = subprocess.run(["cat", os.path.join(mnt, big)], capture_output=True, timeout=60)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r
    finally:
        if os.path.ismount(mnt):
            helpers.sys_umount(mnt, lazy=True)
        d.mounts.clear()
        d.cleanup()


# ------------------------------------------------------------- issue 19, item 16
def test_api_refuses_relative_paths_and_cli_sends_absolute(daemon, image, tmp_path):
    for body in ({"bootstrap": "boot", "mountpoint": str(tmp_path / "m"),
                  "backend": f"localfs:{image['blobs']}"},
                 {"bootstrap": image["boot"], "mountpoint": "m",
                  "backend": f"localfs:{image['blobs']}"},
                 {"bootstrap": image["boot"], "mountpoint": str(tmp_path / "m"),
                  "backend": "localfs:blobs"}):
        st, res = daemon.api.request("POST", "/api/v1/mounts", body)
        assert st == 400 and "absolute path" in res["error"], (st, res)
    st, res = daemon.api.request("POST", "/api/v1/umount", {"mountpoint": "m"})
    assert st == 400 and "absolute path" in res["error"]
    # the CLI resolves against its own working directory
    os.makedirs(tmp_path / "m")
    os.symlink(image["boot"], tmp_path / "boot")
    r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "mount", "boot", "m",
                        "--backend", f"localfs:{os.path.relpath(image['blobs'], tmp_path)}",
                        "--api-sock", daemon.sock], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    daemon.mounts.append(str(tmp_path / "m"))
    assert_exact(image["src"], str(tmp_path / "m"), ["small.txt"])
