"""`erofs-tools mount` against hostile images: no cache poisoning through a borrowed blob
id (issue 19, item 1), and nosuid,nodev by default (item 6). Real kernel mounts."""

import errno
import json
import os
import stat
import subprocess
import sys

import helpers
import pytest
from test_daemon_support import file_sha, pack, regular_files
from test_poisoning import make_attack

from erofs_tools.mount import MAP_XATTR

pytestmark = pytest.mark.root
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def mount(boot, mnt, blobs, cache, *extra):
    os.makedirs(mnt, exist_ok=True)
    r = cli("mount", boot, mnt, "--blob-dir", blobs, "--cache-dir", cache, "--json", *extra)
    return json.loads(r.stdout)["devices"]


def same_bytes(src, mnt):
    names = regular_files(src)
    wrong = [n for n in names if file_sha(os.path.join(mnt, n)) != file_sha(os.path.join(src, n))]
    assert not wrong, f"{len(wrong)} of {len(names)} files read other bytes: {wrong[:3]}"


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    helpers.require_root_kernel()
    return make_attack(tmp_path_factory.mktemp("mount-poison"))


def test_borrowed_blob_id_never_serves_the_genuine_image(attack, tmp_path):
    a = attack
    cache = str(tmp_path / "cache")
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    mounted = []
    try:
        # the attacker first: its cache file, named by the genuine blob id, holds its bytes
        da = mount(a["a_boot"], ma, a["a_blobs"], cache)
        mounted.append(ma)
        same_bytes(a["a_src"], ma)
        # the genuine image with the same cache dir while the attacker's is mounted
        dg = mount(a["g_boot"], mg, a["g_blobs"], cache)
        mounted.append(mg)
        assert dg == da                           # one name (the blob id) ...
        same_bytes(a["g_src"], mg)                # ... but the genuine image's own bytes
        same_bytes(a["a_src"], ma)                # and the attacker's mount keeps its own
        helpers.assert_same_tree(a["g_src"], mg)
        for m in (mg, ma):
            cli("umount", m)
            mounted.remove(m)
        ino = os.stat(dg[0]).st_ino
        # again: the genuine cache file is reused as it is (no rewrite) ...
        mount(a["g_boot"], mg, a["g_blobs"], cache)
        mounted.append(mg)
        assert os.stat(dg[0]).st_ino == ino
        same_bytes(a["g_src"], mg)
        cli("umount", mg)
        mounted.remove(mg)
        # ... and the attacker's next mount cannot make it serve the attacker's bytes
        mount(a["a_boot"], ma, a["a_blobs"], cache)
        mounted.append(ma)
        cli("umount", ma)
        mounted.remove(ma)
        # without the xattr binding (a file system without user xattrs, or a cache file
        # from elsewhere) every chunk is verified before reuse
        os.removexattr(dg[0], MAP_XATTR)
        mount(a["g_boot"], mg, a["g_blobs"], cache)
        mounted.append(mg)
        same_bytes(a["g_src"], mg)
        cli("umount", mg)
        mounted.remove(mg)
        os.removexattr(dg[0], MAP_XATTR)          # a genuine file without it: verified, kept
        ino = os.stat(dg[0]).st_ino
        mount(a["g_boot"], mg, a["g_blobs"], cache)
        mounted.append(mg)
        assert os.stat(dg[0]).st_ino == ino
        assert os.getxattr(dg[0], MAP_XATTR)
        same_bytes(a["g_src"], mg)
    finally:
        for m in mounted:
            cli("umount", "--lazy", m, check=False)


def test_blob_that_disagrees_with_its_bootstrap_is_refused(attack, tmp_path):
    """The genuine bootstrap with the attacker's blob under its id: an error, no mount,
    no cache file."""
    a = attack
    cache, mnt = str(tmp_path / "cache"), str(tmp_path / "m")
    os.makedirs(mnt)
    r = cli("mount", a["g_boot"], mnt, "--blob-dir", a["a_blobs"], "--cache-dir", cache,
            check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)
    assert not os.path.exists(cache) or os.listdir(cache) == []


@pytest.fixture(scope="module")
def suid_image(tmp_path_factory):
    helpers.require_root_kernel()
    base = tmp_path_factory.mktemp("suid")
    src = base / "src"
    src.mkdir()
    tool = src / "rootshell"
    tool.write_bytes(b"#!/bin/sh\nid -u\n" + os.urandom(20000))
    os.chmod(tool, 0o4755)
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    info = pack(str(src), str(base / "boot"), str(base / "blobs"))
    assert info["blobs"]
    return {"src": str(src), "boot": str(base / "boot"), "blobs": str(base / "blobs")}


def _mount_options(mnt):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} not in mountinfo")


def test_mount_is_nosuid_nodev_by_default(suid_image, tmp_path):
    s = suid_image
    mnt = str(tmp_path / "m")
    mount(s["boot"], mnt, s["blobs"], str(tmp_path / "cache"))
    try:
        assert os.stat(os.path.join(mnt, "rootshell")).st_mode & stat.S_ISUID
        flags = os.statvfs(mnt).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_RDONLY
        assert {"ro", "nosuid", "nodev"} <= _mount_options(mnt)
        with pytest.raises(OSError) as e:        # nodev: the device node does not open
            open(os.path.join(mnt, "null"), "rb")
        assert e.value.errno == errno.EACCES
    finally:
        cli("umount", mnt)


def test_allow_suid_dev_lifts_it(suid_image, tmp_path):
    s = suid_image
    mnt = str(tmp_path / "m")
    mount(s["boot"], mnt, s["blobs"], str(tmp_path / "cache"), "--allow-suid-dev")
    try:
        flags = os.statvfs(mnt).f_flag
        assert not flags & os.ST_NOSUID and not flags & os.ST_NODEV and flags & os.ST_RDONLY
        opts = _mount_options(mnt)
        assert "nosuid" not in opts and "nodev" not in opts
        with open(os.path.join(mnt, "null"), "rb") as f:
            assert f.read(10) == b""
    finally:
        cli("umount", mnt)
