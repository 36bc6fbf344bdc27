"""Cache poisoning across images (issue 19, item 1), with the attack built in the test.

A genuine image is packed with the project's own `pack`. The attacker packs a tree of
the same shape (same names and sizes, other bytes, so the blob's uncompressed layout is
the same), then rewrites its bootstrap to name the genuine blob id and serves its own
blob under that id. Blob ids are public, so this needs no secret. Whatever the order of
mounts, unmounts and daemon restarts, the genuine image must read back its own bytes
exactly (other bytes never). Both images mounted at once are both served, each from its
own cache file (the later one under the variant key `<id>@<table digest prefix>`):
neither is refused, so a hostile image cannot deny the genuine one its mount.
"""

import os
import random
import shutil
import subprocess
import sys

import helpers
import pytest
from test_daemon_support import (
    DaemonProc,
    drop_caches,
    file_sha,
    pack,
    regular_files,
    require_lazy_kernel,
)

pytestmark = pytest.mark.root

CHUNK = "0x10000"
NAMES = [f"d{i % 3}/f{i:02d}.bin" for i in range(18)]


def _tree(root, seed, sizes):
    r = random.Random(seed)
    for name, size in zip(NAMES, sizes):
        p = os.path.join(root, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(r.randbytes(size))
        os.utime(p, ns=(1_600_000_000_000_000_000,) * 2)
    for d in {os.path.dirname(n) for n in NAMES} | {""}:
        os.utime(os.path.join(root, d), ns=(1_600_000_000_000_000_000,) * 2)
    return root


def dict_pair(tmp_path):
    """Image b1 of a tree and image b2 of part of it plus a new file, built with
    --chunk-dict b1, their blobs in tmp_path/blobs -> {"base", "src" (the trees),
    "blobs", "i1", "i2" (b1's and b2's pack info)}."""
    base = _tree(str(tmp_path / "base"), 3, [100_000 + 997 * i for i in range(len(NAMES))])
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(base, "d0"), os.path.join(src, "d0"))
    with open(os.path.join(src, "new.bin"), "wb") as f:
        f.write(random.Random(4).randbytes(200_000))
    blobs = str(tmp_path / "blobs")
    i1 = pack(base, str(tmp_path / "b1"), blobs, "--chunk-size", CHUNK)
    i2 = pack(src, str(tmp_path / "b2"), blobs, "--chunk-size", CHUNK, "--chunk-dict",
              str(tmp_path / "b1"))
    return {"base": base, "src": src, "blobs": blobs, "i1": i1, "i2": i2}


def make_attack(base):
    """-> dict: genuine tree/boot/blob dir, attacker tree/boot/blob dir, the blob id."""
    base = str(base)
    r = random.Random(7)
    sizes = [r.randint(70_000, 400_000) for _ in NAMES]
    g_src = _tree(os.path.join(base, "g-src"), 1, sizes)
    a_src = _tree(os.path.join(base, "a-src"), 2, sizes)
    g_boot, g_blobs = os.path.join(base, "g.boot"), os.path.join(base, "g-blobs")
    a_boot, a_blobs = os.path.join(base, "a.boot"), os.path.join(base, "a-blobs")
    gi = pack(g_src, g_boot, g_blobs, "--chunk-size", CHUNK)
    ai = pack(a_src, a_boot, a_blobs, "--chunk-size", CHUNK)
    gid, aid = gi["blobs"][0]["blob_id"], ai["blobs"][0]["blob_id"]
    assert gid != aid
    # the attacker's bootstrap now names the genuine blob id (device tag and blob table)
    raw = open(a_boot, "rb").read()
    assert raw.count(aid.encode()) >= 1
    open(a_boot, "wb").write(raw.replace(aid.encode(), gid.encode()))
    # ... and its backend serves the attacker's blob under that id
    os.rename(os.path.join(a_blobs, aid), os.path.join(a_blobs, gid))
    from erofs_tools.reader.image import open_image
    sizes_of = []
    for boot in (g_boot, a_boot):
        img = open_image(boot)
        assert img.blob_id(1) == gid
        sizes_of.append(img.blob_entries[0].uncompressed_size)
        img.close()
    assert sizes_of[0] == sizes_of[1], "the attack needs the same uncompressed layout"
    return {"g_src": g_src, "g_boot": g_boot, "g_blobs": g_blobs, "a_src": a_src,
            "a_boot": a_boot, "a_blobs": a_blobs, "blob_id": gid}


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    require_lazy_kernel()
    return make_attack(tmp_path_factory.mktemp("poison"))


def read_all(mnt, names):
    return {n: file_sha(os.path.join(mnt, n)) for n in names}


def expect_own_bytes(src, mnt, names=None):
    """Every named file reads back exactly as in `src` (an EIO would fail too)."""
    names = names or regular_files(src)
    got = read_all(mnt, names)
    want = {n: file_sha(os.path.join(src, n)) for n in names}
    wrong = [n for n in names if got[n] != want[n]]
    assert not wrong, f"{len(wrong)} files read other bytes, e.g. {wrong[:3]}"


def cache_of(res, blob_id):
    """(cache key, cache file) of blob_id in a mount's description."""
    b, = [b for b in res["blobs"] if b["blob_id"] == blob_id]
    return b["key"], b["cache_file"]


def test_attacker_first_then_genuine_then_restart(attack, tmp_path):
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        expect_own_bytes(a["a_src"], ma)           # the attacker's cache is full of its bytes
        # the genuine image, while the attacker's is mounted: served, from its own file
        rg = d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        gkey, gfile = cache_of(rg, a["blob_id"])
        assert gkey.startswith(a["blob_id"] + "@") and gfile.endswith(gkey + ".blob")
        expect_own_bytes(a["g_src"], mg)
        expect_own_bytes(a["a_src"], ma)
        d.umount(mg)
        d.umount(ma)
        d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        half = NAMES[::2]
        expect_own_bytes(a["g_src"], mg, half)
        d.stop()                                   # restart: the mount is picked up again
        d.start()
        drop_caches()
        expect_own_bytes(a["g_src"], mg)           # unread half fetched, read half cached
        helpers.assert_same_tree(a["g_src"], mg)
        # and once more after a restart with everything cached
        d.stop()
        d.start()
        drop_caches()
        expect_own_bytes(a["g_src"], mg)
    finally:
        d.cleanup()


def test_attacker_cache_left_on_disk_across_restart(attack, tmp_path):
    """The attacker's chunk map and cache file stay on disk (daemon stopped while it was
    mounted, then the attacker's mount went away): a later genuine mount must not use
    them."""
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        expect_own_bytes(a["a_src"], ma)
        d.stop()
        helpers.sys_umount(ma)                     # gone while the daemon was down
        d.mounts.remove(ma)
        d.start()                                  # forgets it; its files stay
        d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        drop_caches()
        expect_own_bytes(a["g_src"], mg)
        d.stop()
        d.start()
        drop_caches()
        helpers.assert_same_tree(a["g_src"], mg)
    finally:
        d.cleanup()


def test_genuine_first_attacker_cannot_change_its_bytes(attack, tmp_path):
    """Genuine mounted and half read; the attacker's mount is served apart and must not
    change what the genuine image reads for its other half."""
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        rg = d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        expect_own_bytes(a["g_src"], mg, NAMES[::2])
        ra = d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        assert cache_of(rg, a["blob_id"])[0] == a["blob_id"]
        assert cache_of(ra, a["blob_id"])[0].startswith(a["blob_id"] + "@")
        # the attacker reads its own bytes; the genuine image keeps its own
        expect_own_bytes(a["a_src"], ma, NAMES[1::2])
        drop_caches()
        expect_own_bytes(a["g_src"], mg)
        expect_own_bytes(a["a_src"], ma)
    finally:
        d.cleanup()


def test_images_sharing_a_blob_share_its_cache(tmp_path):
    """Dedup stays: an image built with --chunk-dict from another names the same blob
    with a subset of its chunk table; both mounted at once use one cache file."""
    require_lazy_kernel()
    pair = dict_pair(tmp_path)
    base, src, blobs, i1, i2 = (pair[k] for k in ("base", "src", "blobs", "i1", "i2"))
    shared = i1["blobs"][0]["blob_id"]
    assert shared in [b["blob_id"] for b in i2["blobs"]]
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    m1, m2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    try:
        r1 = d.mount(str(tmp_path / "b2"), m2, f"localfs:{blobs}")   # the subset first
        r2 = d.mount(str(tmp_path / "b1"), m1, f"localfs:{blobs}")
        c1 = {b["blob_id"]: b["cache_file"] for b in r1["blobs"]}
        c2 = {b["blob_id"]: b["cache_file"] for b in r2["blobs"]}
        assert c1[shared] == c2[shared]
        helpers.assert_same_tree(src, m2)
        helpers.assert_same_tree(base, m1)
        assert d.metrics()["blobs"][shared]["mounts"] == sorted([m1, m2])
        # a restart keeps sharing and the right bytes
        d.stop()
        d.start()
        drop_caches()
        helpers.assert_same_tree(base, m1)
        helpers.assert_same_tree(src, m2)
    finally:
        d.cleanup()


def test_both_mounted_each_own_bytes_across_restarts_and_release(attack, tmp_path):
    """Genuine and attacker mounted at once, each half read; two restarts (mounts.json
    re-attaches each mount to its own cache file); each reads its own bytes exactly;
    metrics show both variants; unmounting one releases only its variant."""
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        ra = d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        rg = d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        akey, afile = cache_of(ra, a["blob_id"])
        gkey, gfile = cache_of(rg, a["blob_id"])
        assert akey == a["blob_id"] and gkey.startswith(a["blob_id"] + "@") and afile != gfile
        expect_own_bytes(a["g_src"], mg, NAMES[::2])
        expect_own_bytes(a["a_src"], ma, NAMES[1::2])
        m = d.metrics()["blobs"]
        assert m[akey]["mounts"] == [ma] and m[gkey]["mounts"] == [mg]
        assert m[gkey]["blob_id"] == a["blob_id"] and m[gkey]["variant"] == gkey.split("@")[1]
        assert m[akey]["variant"] is None
        # plain `status` names the variant (blob id prefix @ table digest prefix)
        out = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                              "--api-sock", d.sock], capture_output=True, text=True,
                             check=True).stdout
        assert f"blob {a['blob_id'][:16]}@{gkey.split('@')[1]}  chunks" in out, out
        assert f"blob {a['blob_id'][:16]}  chunks" in out, out
        for _ in range(2):
            d.stop()
            d.start()
            drop_caches()
            expect_own_bytes(a["g_src"], mg)
            expect_own_bytes(a["a_src"], ma)
            st, mounts = d.api.request("GET", "/api/v1/mounts")
            keys = {x["mountpoint"]: cache_of(x, a["blob_id"]) for x in mounts}
            assert keys == {ma: (akey, afile), mg: (gkey, gfile)}
        helpers.assert_same_tree(a["g_src"], mg)
        helpers.assert_same_tree(a["a_src"], ma)
        # the attacker's mount goes: only its cache is released, the genuine one serves on
        d.umount(ma)
        m = d.metrics()["blobs"]
        assert akey not in m and m[gkey]["mounts"] == [mg]
        drop_caches()
        expect_own_bytes(a["g_src"], mg)
        # and the attacker again: its plain cache (still on disk, still its own) returns
        ra = d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        assert cache_of(ra, a["blob_id"]) == (akey, afile)
        expect_own_bytes(a["a_src"], ma)
        d.umount(ma)
        d.umount(mg)
        assert not d.metrics()["blobs"]
    finally:
        d.cleanup()


def _holder_status(d):
    return helpers.holder_status(os.path.join(d.cache_dir, "fdholder.sock"))


def test_variant_marks_apart_and_released_with_its_last_superblock(attack, tmp_path):
    """Each variant has its own fanotify mark and filled bitmap in the fd holder (keyed by
    cache file, not blob id); the genuine image's variant, unmounted while an overlay
    holds its superblock, stays served (detached) after the attacker's plain cache was
    released, reads its own bytes, and goes when the overlay goes."""
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    ov = {k: str(tmp_path / k) for k in ("upper", "work", "merged")}
    for p in ov.values():
        os.makedirs(p)
    try:
        ra = d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        rg = d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        akey, afile = cache_of(ra, a["blob_id"])
        gkey, gfile = cache_of(rg, a["blob_id"])
        st = _holder_status(d)
        assert afile in st["marks"] and gfile in st["marks"], st
        assert st["filled_maps"] >= 2, st
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mg},upperdir={ov['upper']},workdir={ov['work']}",
                        ov["merged"]], check=True)
        st_, res = d.api.request("POST", "/api/v1/umount", {"mountpoint": mg})
        assert st_ == 200 and res["released"] is False, res
        d.mounts.remove(mg)
        d.umount(ma)                               # the attacker's cache goes at once
        m = d.metrics()
        assert akey not in m["blobs"] and m["detached"] == 1
        assert gkey in m["blobs"] and "detached" in m["blobs"][gkey]["mounts"][0]
        marks = _holder_status(d)["marks"]
        assert afile not in marks and gfile in marks
        drop_caches()
        expect_own_bytes(a["g_src"], ov["merged"])
        subprocess.run(["umount", ov["merged"]], check=True)
        helpers.wait_until(lambda: gkey not in d.metrics()["blobs"], 30, "the variant's release")
        assert gfile not in _holder_status(d)["marks"]
        assert d.metrics()["detached"] == 0
    finally:
        if os.path.ismount(ov["merged"]):
            subprocess.run(["umount", "-l", ov["merged"]])
        d.cleanup()
