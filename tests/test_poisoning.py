"""Cache poisoning across images (issue 19, item 1), with the attack built in the test.

A genuine image is packed with the project's own `pack`. The attacker packs a tree of
the same shape (same names and sizes, other bytes, so the blob's uncompressed layout is
the same), then rewrites its bootstrap to name the genuine blob id and serves its own
blob under that id. Blob ids are public, so this needs no secret. Whatever the order of
mounts, unmounts and daemon restarts, the genuine image must read back its own bytes
exactly (an error is allowed, other bytes never).
"""

import os
import random
import shutil

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


def try_mount(d, boot, mnt, backend):
    """Mount through the API: True if mounted, False if refused with a clear error."""
    os.makedirs(mnt, exist_ok=True)
    st, res = d.api.request("POST", "/api/v1/mounts",
                            {"bootstrap": boot, "mountpoint": mnt, "backend": backend})
    if st == 201:
        d.mounts.append(mnt)
        return True
    assert 400 <= st < 600 and "chunk table" in str(res), (st, res)
    assert not os.path.ismount(mnt)
    return False


def test_attacker_first_then_genuine_then_restart(attack, tmp_path):
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        expect_own_bytes(a["a_src"], ma)           # the attacker's cache is full of its bytes
        # the genuine image, while the attacker's is mounted: its own bytes or a refusal
        if try_mount(d, a["g_boot"], mg, f"localfs:{a['g_blobs']}"):
            expect_own_bytes(a["g_src"], mg)
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
    """Genuine mounted and half read; the attacker's mount (refused or served apart)
    must not change what the genuine image reads for its other half."""
    a = attack
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    try:
        d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        expect_own_bytes(a["g_src"], mg, NAMES[::2])
        if try_mount(d, a["a_boot"], ma, f"localfs:{a['a_blobs']}"):
            # whatever the attacker's mount reads, the genuine image keeps its bytes
            for n in NAMES[1::2]:
                try:
                    file_sha(os.path.join(ma, n))
                except OSError:
                    pass
        drop_caches()
        expect_own_bytes(a["g_src"], mg)
    finally:
        d.cleanup()


def test_images_sharing_a_blob_share_its_cache(tmp_path):
    """Dedup stays: an image built with --chunk-dict from another names the same blob
    with a subset of its chunk table; both mounted at once use one cache file."""
    require_lazy_kernel()
    base = _tree(str(tmp_path / "base"), 3, [100_000 + 997 * i for i in range(len(NAMES))])
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(base, "d0"), os.path.join(src, "d0"))
    with open(os.path.join(src, "new.bin"), "wb") as f:
        f.write(random.Random(4).randbytes(200_000))
    blobs = str(tmp_path / "blobs")
    i1 = pack(base, str(tmp_path / "b1"), blobs, "--chunk-size", CHUNK)
    i2 = pack(src, str(tmp_path / "b2"), blobs, "--chunk-size", CHUNK, "--chunk-dict",
              str(tmp_path / "b1"))
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
