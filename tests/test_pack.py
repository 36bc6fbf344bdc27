"""`erofs-tools pack`: RAFS v6 images mount with the kernel and compare clean.

Every image built here goes through validate_rafs_bootstrap() (nydusd's structural
rules), `erofs-tools mount` (kernel, file-backed, device= per blob), a full-metadata
tree comparison against its source, `erofs-tools umount` and fsck.erofs with the
uncompressed cache files as devices.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from helpers import NYDUS_VECTORS, assert_same_tree, fsck, is_root, require
from test_pack_validate import validate_rafs_bootstrap

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.builder.rafs import PackOptions, pack
from erofs_tools.format import rafs as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
# compare_trees(ignore=...) names -> helpers.compare_trees field names
_IGNORE = {"mtime": ("mtime_ns",), "content": ("sha256", "target"), "nlink": ("links",),
           "mode": ("mode", "type")}


def need_root():
    require(is_root(), "needs root (mount, owners, devices, trusted xattrs)")


def cli(*args, input=None, check=True):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                       capture_output=True, input=input, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"erofs-tools {' '.join(map(str, args))} failed: "
                             f"{r.stderr.decode(errors='replace')}")
    return r


def compare_trees(expected, actual, ignore=()):
    fields = [f for name in ignore for f in _IGNORE.get(name, (name,))]
    assert_same_tree(expected, actual, ignore=fields)


def mount_and_compare(boot, blob_dir, source, tmp, ignore=()):
    """Mount via the CLI, compare, umount, fsck. -> cache file paths."""
    need_root()
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    cache = tmp / "cache"
    r = cli("mount", boot, mnt, "--blob-dir", blob_dir, "--cache-dir", cache, "--json")
    devices = json.loads(r.stdout)["devices"]
    try:
        compare_trees(source, mnt, ignore)
    finally:
        cli("umount", mnt)
    assert os.listdir(mnt) == []
    fsck(boot, extract=False, devices=devices)
    return devices


def reader_check(boot, blob_dir):
    """The reader's independent checker (erofs-tools check) accepts image and blobs."""
    r = cli("check", boot, "--blob-dir", blob_dir, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")


def build_rich_tree(root, with_devices=True):
    """A tree using every feature pack has to carry through."""
    need_root()        # owners, devices, trusted/security xattrs are part of the tree
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello world\n")
    (root / "exact4k").write_bytes(os.urandom(4096))
    (root / "multi").write_bytes(os.urandom(3 * MIB + 12345))
    (root / "text").write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 50000)
    (root / "zeros").write_bytes(bytes(2 * MIB + 1))
    with open(root / "sparse", "wb") as f:
        f.truncate(40 * MIB)
        f.seek(17 * MIB + 100)
        f.write(b"island" * 1000)
    os.link(root / "small", root / "small.hard")
    os.symlink("small", root / "link")
    os.symlink("x" * 3000, root / "longlink")
    os.mkfifo(root / "fifo")
    if with_devices:
        os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(root / "blk", stat.S_IFBLK | 0o640, os.makedev(259, 70000))
        os.mknod(root / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    d = root / "dir with spaces" / "deeper" / "deepest"
    d.mkdir(parents=True)
    (d / "f").write_bytes(b"deep")
    big = root / "bigdir"
    big.mkdir()
    for i in range(400):                 # several directory blocks
        (big / f"entry-{i:04d}-{'n' * (i % 50)}").write_bytes(b"%d" % i)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.setxattr(root / "small", "user.note", b"a value")
    os.setxattr(root / "multi", "user.empty", b"")
    os.setxattr(root / "dir with spaces", "user.dir", b"x" * 300)
    os.setxattr(root / "text", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "sticky", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.chown(root / "small", 70000, 80000)
    os.lchown(root / "link", 1234, 5678)
    os.chown(root / "dir with spaces", 65536, 3)
    # a spread of mtimes (nsec precision); dirs last so writes do not move them
    t = 1_600_000_000
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(t * 10**9, (t + i * 37) * 10**9 + i * 1001), follow_symlinks=False)
    os.utime(root, ns=(t * 10**9, t * 10**9))


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    root = tmp_path_factory.mktemp("rich") / "src"
    build_rich_tree(root)
    return root


def do_pack(src, tmp, **kw):
    boot = tmp / "boot"
    blobs = tmp / "blobs"
    blobs.mkdir(exist_ok=True)
    r = pack(src, boot, blobs, PackOptions(**kw))
    sizes = {n: os.path.getsize(blobs / n) for n in os.listdir(blobs)}
    validate_rafs_bootstrap(str(boot), sizes)
    return boot, blobs, r


# --- kernel roundtrips -------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("compressor", ["zstd", "none"])
@pytest.mark.parametrize("chunk_size", [4096, 64 * 1024, MIB])
def test_rich_tree_mounts_clean(rich, tmp_path, compressor, chunk_size):
    boot, blobs, r = do_pack(rich, tmp_path, compressor=compressor, chunk_size=chunk_size)
    assert len(r["blobs"]) == 1 and os.listdir(blobs) == [r["blob_id"]]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    reader_check(boot, blobs)
    devices = mount_and_compare(boot, blobs, rich, tmp_path)
    assert os.path.getsize(devices[0]) == r["blobs"][0]["uncompressed_size"]
    t = BootstrapTables.read(str(boot))
    assert t.blobs[0].compressor == compressor
    assert t.ext.s_chunk_size == chunk_size
    # the sparse file's 40 MiB of holes cost one zero chunk
    assert r["blobs"][0]["uncompressed_size"] < 12 * MIB + 4 * chunk_size


@pytest.mark.root
def test_cli_pack_json_and_mount(rich, tmp_path):
    blobs = tmp_path / "b"
    blobs.mkdir()
    r = cli("pack", rich, "--bootstrap", tmp_path / "boot", "--blob-dir", blobs, "--json",
            "--chunk-size", "64K", "--digester", "sha256")
    j = json.loads(r.stdout)
    assert j["digester"] == "sha256" and j["chunk_size"] == 65536
    assert j["blobs"][0]["blob_id"] == j["blob_id"] == os.listdir(blobs)[0]
    assert j["chunks_total"] == j["chunks_new"] + j["chunks_dedup"] + j["chunks_dict"]
    t = BootstrapTables.read(str(tmp_path / "boot"))
    assert t.ext.s_flags & R.FLAG_DIGEST_SHA256
    mount_and_compare(tmp_path / "boot", blobs, rich, tmp_path)


@pytest.mark.root
def test_timestamp_option(rich, tmp_path):
    boot, blobs, r = do_pack(rich, tmp_path, timestamp=1234567890)
    need_root()
    mnt = tmp_path / "m"
    mnt.mkdir()
    cli("mount", boot, mnt, "--blob-dir", blobs, "--cache-dir", tmp_path / "c")
    try:
        for dp, dn, fn in os.walk(mnt):
            for n in dn + fn:
                assert os.lstat(os.path.join(dp, n)).st_mtime_ns == 1234567890 * 10**9
        compare_trees(rich, mnt, ignore=("mtime",))
    finally:
        cli("umount", mnt)


@pytest.mark.root
def test_empty_and_no_data_trees(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "empty").write_bytes(b"")
    boot, blobs, r = do_pack(src, tmp_path)
    assert r["blobs"] == [] and r["blob_id"] is None and os.listdir(blobs) == []
    mount_and_compare(boot, blobs, src, tmp_path)


# --- dedup ---------------------------------------------------------------------------------

def test_many_copies_cost_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(2 * MIB + 5000)
    small = os.urandom(3000)
    for i in range(25):
        d = src / f"copy{i}"
        d.mkdir()
        (d / "big").write_bytes(payload)
        (d / "small").write_bytes(small)
    boot, blobs, r = do_pack(src, tmp_path, compressor="none")
    blob = r["blobs"][0]
    one_copy = len(payload) + len(small)
    meta_overhead = 512 * 4 + 4096 + 16 * 8 + 32 * 8 + 4 * 128   # tar headers, CI, TOC
    assert one_copy <= blob["compressed_size"] <= one_copy + meta_overhead
    assert r["chunks_new"] == 4 and r["chunks_dedup"] == 24 * 4
    mount_and_compare(boot, blobs, src, tmp_path)


def _v1_v2(tmp_path, chunk):
    v1 = tmp_path / "v1"
    v1.mkdir()
    files = {f"f{i}": os.urandom(8 * chunk + 777) for i in range(8)}
    for n, data in files.items():
        (v1 / n).write_bytes(data)
    (v1 / "keep").mkdir()
    (v1 / "keep" / "same").write_bytes(os.urandom(5 * chunk))
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    # v2: two chunks changed in f3, one appended to f5, one new small file
    d = bytearray(files["f3"])
    d[2 * chunk + 10] ^= 0xFF
    d[6 * chunk] ^= 0xFF
    (v2 / "f3").write_bytes(bytes(d))
    with open(v2 / "f5", "ab") as f:
        f.write(os.urandom(chunk))
    (v2 / "new").write_bytes(os.urandom(1000))
    return v1, v2


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_chunk_dict_stores_only_changed_chunks(tmp_path, compressor):
    chunk = 64 * 1024
    v1, v2 = _v1_v2(tmp_path, chunk)
    o1 = tmp_path / "o1"
    o1.mkdir()
    boot1, blobs, r1 = do_pack(v1, o1, chunk_size=chunk, compressor=compressor)
    o2 = tmp_path / "o2"
    o2.mkdir()
    boot2 = o2 / "boot"
    r2 = pack(v2, boot2, blobs, PackOptions(chunk_size=chunk, compressor=compressor,
                                             chunk_dicts=[str(boot1)]))
    sizes = {n: os.path.getsize(blobs / n) for n in os.listdir(blobs)}
    validate_rafs_bootstrap(str(boot2), sizes)
    # changed: 2 chunks of f3; f5's old last chunk (777 bytes) is now a full chunk and
    # a new 777-byte tail follows; "new" is 1000 bytes
    assert r2["chunks_new"] == 5
    new = [b for b in r2["blobs"] if b["new"]][0]
    changed_bytes = 2 * chunk + chunk + 777 + 1000
    meta_overhead = 512 * 4 + 4096 + 16 * 5 + 32 * 5 + 4 * 128
    assert new["compressed_size"] <= changed_bytes + meta_overhead
    assert r2["bytes_new"] == changed_bytes
    assert r2["chunks_dict"] == r2["chunks_total"] - 5 - r2["chunks_dedup"]
    # dict blob first, new blob second; v1's blob file untouched
    assert [b["blob_id"] for b in r2["blobs"]] == [r1["blob_id"], r2["blob_id"]]
    assert r2["blobs"][0]["new"] is False and r2["blobs"][1]["new"] is True
    t = BootstrapTables.read(str(boot2))
    assert [b.blob_id for b in t.blobs] == [r1["blob_id"], r2["blob_id"]]
    reader_check(boot2, blobs)
    mount_and_compare(boot2, blobs, v2, o2)
    # v1 still mounts from the same blob dir
    (o1 / "x").mkdir()
    mount_and_compare(boot1, blobs, v1, o1 / "x")


def test_chunk_dict_unused_blob_not_listed(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_bytes(os.urandom(10000))
    b = tmp_path / "b"
    b.mkdir()
    (b / "g").write_bytes(os.urandom(10000))
    oa = tmp_path / "oa"
    oa.mkdir()
    boota, blobs, ra = do_pack(a, oa)
    ob = tmp_path / "ob"
    ob.mkdir()
    r = pack(b, ob / "boot", blobs, PackOptions(chunk_dicts=[str(boota)]))
    assert [x["blob_id"] for x in r["blobs"]] == [r["blob_id"]]
    validate_rafs_bootstrap(str(ob / "boot"))
    # everything from the dict: no new blob at all
    mount_and_compare(ob / "boot", blobs, b, ob)
    r = pack(a, ob / "boot2", blobs, PackOptions(chunk_dicts=[str(boota)]))
    assert r["blob_id"] is None and [x["blob_id"] for x in r["blobs"]] == [ra["blob_id"]]
    validate_rafs_bootstrap(str(ob / "boot2"))
    (ob / "x").mkdir()
    mount_and_compare(ob / "boot2", blobs, a, ob / "x")


def test_chunk_dict_mismatch_rejected(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_bytes(b"x" * 5000)
    boot, blobs, _ = do_pack(a, tmp_path, digester="sha256")
    mount_and_compare(boot, blobs, a, tmp_path)
    r = cli("pack", a, "-B", tmp_path / "b2", "-D", blobs, "--chunk-dict", boot, check=False)
    assert r.returncode == 1 and b"sha256" in r.stderr
    r = cli("pack", a, "-B", tmp_path / "b2", "-D", blobs, "--chunk-dict", boot,
            "--digester", "sha256", "--chunk-size", "64K", check=False)
    assert r.returncode == 1 and b"chunk size" in r.stderr
    assert not (tmp_path / "b2").exists()


# --- reproducibility ---------------------------------------------------------------------

def _tree_in_order(root, names, t=1_700_000_000):
    root.mkdir()
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(hashlib.sha256(n.encode()).digest() * (len(n) * 997))
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(p, ns=(t * 10**9, t * 10**9 + 5))
    os.utime(root, ns=(t * 10**9, t * 10**9 + 5))


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_reproducible(tmp_path, compressor):
    names = [f"d{i % 3}/sub{i % 2}/file{i}" for i in range(60)] + ["top", "a/b/c/d/e"]
    _tree_in_order(tmp_path / "x", names)
    _tree_in_order(tmp_path / "y", list(reversed(names)))     # other creation order
    outs = []
    for src, name in ((tmp_path / "x", "o1"), (tmp_path / "x", "o2"), (tmp_path / "y", "o3")):
        o = tmp_path / name
        o.mkdir()
        boot, blobs, r = do_pack(src, o, compressor=compressor, chunk_size=16384)
        outs.append((open(boot, "rb").read(), r["blob_id"],
                     open(blobs / r["blob_id"], "rb").read()))
    assert outs[0] == outs[1] == outs[2]
    mount_and_compare(tmp_path / "o3" / "boot", tmp_path / "o3" / "blobs",
                      tmp_path / "y", tmp_path / "o3")


@pytest.mark.root
@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_native_walk_same_image_as_python_walk(rich, tmp_path, monkeypatch, compressor):
    """pack's C walk (csrc/walk.c listing files) gives the bytes the Python walk gives:
    xattrs (the HAS_XATTR flag), hardlinks, empty and sparse files, devices; whatever the
    worker count; and the image mounts clean."""
    outs = []
    for native, workers in ((True, 1), (True, 3), (False, 2)):
        monkeypatch.setattr("erofs_tools.builder.tree.NATIVE_WALK", native)
        o = tmp_path / f"{native}-{workers}"
        o.mkdir()
        boot, blobs, r = do_pack(rich, o, compressor=compressor, chunk_size=64 * 1024,
                                 workers=workers)
        outs.append((open(boot, "rb").read(), r["blob_id"],
                     open(blobs / r["blob_id"], "rb").read()))
    assert outs[0] == outs[1] == outs[2]
    t = BootstrapTables.read(str(tmp_path / "True-1" / "boot"))
    assert t.ext.s_flags & R.FLAG_HAS_XATTR
    mount_and_compare(tmp_path / "True-1" / "boot", tmp_path / "True-1" / "blobs", rich,
                      tmp_path / "True-1")


# --- prefetch ------------------------------------------------------------------------------

def test_prefetch_table_and_blob_order(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "usr" / "bin").mkdir(parents=True)
    for n in ("a", "b", "c"):
        (src / "usr" / "bin" / n).write_bytes(os.urandom(5000))
    (src / "etc" / "conf").write_bytes(os.urandom(3000))
    (src / "zz").write_bytes(os.urandom(100))
    lst = tmp_path / "list"
    lst.write_text("/zz\n/usr/bin\n\n/zz\n")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    r = cli("pack", src, "-B", tmp_path / "boot", "-D", blobs, "--prefetch-list", lst,
            "--json", "--compressor", "none")
    j = json.loads(r.stdout)
    assert j["prefetch_entries"] == 2
    stats = validate_rafs_bootstrap(str(tmp_path / "boot"))
    t = BootstrapTables.read(str(tmp_path / "boot"))
    ext = t.ext
    assert ext.s_prefetch_table_size == 8
    buf = open(tmp_path / "boot", "rb").read()
    nids = [int.from_bytes(buf[ext.s_prefetch_table_offset + 4 * i:][:4], "little")
            for i in range(2)]
    assert nids == [stats["paths"][b"/zz"], stats["paths"][b"/usr/bin"]]
    # blob order: zz, then usr/bin/{a,b,c}, then the rest
    blob = open(blobs / j["blob_id"], "rb").read()
    want = [src / "zz", src / "usr/bin/a", src / "usr/bin/b", src / "usr/bin/c",
            src / "etc/conf"]
    off = 0
    for p in want:
        data = p.read_bytes()
        assert blob[off:off + len(data)] == data, p
        off += len(data)
    # the same list on stdin
    cli("pack", src, "-B", tmp_path / "boot2", "-D", blobs, "--prefetch-list", "-",
        "--compressor", "none", input=b"/zz\n/usr/bin\n")
    assert open(tmp_path / "boot2", "rb").read() == buf
    mount_and_compare(tmp_path / "boot", blobs, src, tmp_path)


# --- the walk on its own thread ------------------------------------------------------------

def _many_files(root, n=300):
    for i in range(n):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(hashlib.sha256(b"%d" % i).digest() * (1 + i % 50))


def _walk_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == "erofs-pack-walk"]


@pytest.mark.parametrize("where", ["walk", "native walk", "chunking"])
def test_walk_thread_failure_and_stop(tmp_path, monkeypatch, where):
    """An error in the walk (its own thread; the Python walk and the C one) reaches the
    caller; an error while chunking stops the walk. Either way the thread is gone and
    nothing is left behind."""
    from erofs_tools.builder import rafs as RP
    from erofs_tools.builder import rafs_walk
    from erofs_tools.builder.tree import TreeWalker
    from erofs_tools.errors import InputError
    src = tmp_path / "src"
    _many_files(src)
    if where == "native walk":
        orig_step = rafs_walk.FileWalk.step
        steps = []

        def bad_step(self, max_entries):
            steps.append(max_entries)
            if len(steps) == 2:     # the first step's files already queued
                raise InputError("planted walk error in C")
            return orig_step(self, max_entries)
        monkeypatch.setattr(rafs_walk.FileWalk, "step", bad_step)
        monkeypatch.setattr(rafs_walk.RafsWalker, "STEP", 64)
    elif where == "walk":
        monkeypatch.setattr("erofs_tools.builder.tree.NATIVE_WALK", False)
        orig = TreeWalker._xattrs

        def bad(self, path, node, *rest):
            if path.endswith(b"/f150"):
                raise InputError(f"{os.fsdecode(path)}: planted walk error")
            return orig(self, path, node, *rest)
        monkeypatch.setattr(TreeWalker, "_xattrs", bad)
    else:
        orig_place = RP.ChunkPlacer.place_batch

        def place_batch(self, results):
            if self.stats["chunks_total"] >= 20:    # a batch after the first
                raise InputError("planted chunking error")
            return orig_place(self, results)
        monkeypatch.setattr(RP.ChunkPlacer, "place_batch", place_batch)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="planted"):
        pack(src, out / "boot", out / "blobs", PackOptions(chunk_size=4096))
    assert not _walk_threads()
    assert os.listdir(out / "blobs") == [] and os.listdir(out) == ["blobs"]


@pytest.mark.parametrize("where", [None, "blob finish", "layout"])
def test_tail_threads_end_with_the_pack(tmp_path, monkeypatch, where):
    """pack's tail runs the blob's finish and the chunk info table's sort on threads of
    their own (workpool.started): whether the pack succeeds or fails in either, both
    threads have ended when it returns, nothing is left behind on failure, and no
    non-daemon thread is left to cost the program its fast exit (errors.exit_now)."""
    import threading

    from erofs_tools._native import NativeBuilder
    from erofs_tools.builder.blob import BlobWriter
    from erofs_tools.errors import InputError
    src = tmp_path / "src"
    _many_files(src)
    out = tmp_path / "out"
    out.mkdir()
    tail = ("erofs-blob-finish", "erofs-pack-table")
    ran = []
    if where == "blob finish":
        def fail(self):
            ran.append(threading.current_thread().name)
            raise InputError("planted finish error")
        monkeypatch.setattr(BlobWriter, "_finish", fail)
    elif where == "layout":
        def fail(self):
            ran.append(threading.current_thread().name)
            raise InputError("planted layout error")
        monkeypatch.setattr(NativeBuilder, "layout", fail)
    before = set(threading.enumerate())
    if where is None:
        result = pack(src, out / "boot", out / "blobs", PackOptions(chunk_size=4096))
        assert os.listdir(out / "blobs") == [result["blob_id"]]
    else:
        with pytest.raises(InputError, match="planted"):
            pack(src, out / "boot", out / "blobs", PackOptions(chunk_size=4096))
        assert ran == ["erofs-blob-finish" if where == "blob finish" else "MainThread"]
        assert os.listdir(out / "blobs") == [] and os.listdir(out) == ["blobs"]
    left = set(threading.enumerate()) - before
    assert not [t for t in left if t.name in tail]
    assert not [t for t in left if not t.daemon and t.is_alive()]


def test_walk_order_is_name_order_per_directory(tmp_path):
    """Without a prefetch list the blob follows the walk: each directory's files in name
    order (whatever order they were created in)."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["c", "a", "b"]
    for n in names:
        (src / n).write_bytes(n.encode() * 5000)
    boot, blobs, r = do_pack(src, tmp_path, compressor="none", chunk_size=4096)
    blob = open(blobs / r["blob_id"], "rb").read()
    assert blob[:15000] == b"a" * 5000 + b"b" * 5000 + b"c" * 5000


# --- bad input ------------------------------------------------------------------------------

def _only_expected(d, allowed):
    assert sorted(os.listdir(d)) == sorted(allowed)


@pytest.mark.parametrize("case", ["no-source", "source-file", "boot-in-source", "chunk-size",
                                  "bad-dict", "missing-prefetch", "relative-prefetch",
                                  "blob-dir-is-file", "compressor"])
def test_bad_input_one_line_error(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(70000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    args = [src, "-B", boot, "-D", blobs]
    stdin = None
    if case == "no-source":
        args[0] = tmp_path / "nothing"
    elif case == "source-file":
        args[0] = src / "f"
    elif case == "boot-in-source":
        args[2] = src / "boot"
    elif case == "chunk-size":
        args += ["--chunk-size", "12345"]
    elif case == "bad-dict":
        (tmp_path / "notrafs").write_bytes(bytes(8192))
        args += ["--chunk-dict", tmp_path / "notrafs"]
    elif case == "missing-prefetch":
        args += ["--prefetch-list", "-"]
        stdin = b"/f\n/nope\n"
    elif case == "relative-prefetch":
        args += ["--prefetch-list", "-"]
        stdin = b"f\n"
    elif case == "blob-dir-is-file":
        args[4] = src / "f"
    elif case == "compressor":
        args += ["--compressor", "lz4"]
    r = cli("pack", *args, input=stdin, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    _only_expected(blobs, [])
    assert not boot.exists()
    assert not boot.exists() and not (src / "boot").exists()
    _only_expected(tmp_path, ["src", "blobs"] + (["notrafs"] if case == "bad-dict" else []))
    _only_expected(src, ["f"])


def test_unreadable_file_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}").write_bytes(os.urandom(50000))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    # make one file vanish between the walk and the chunk read: when the walk (on its
    # own thread, beside the chunker) hands it over, after it was seen and recorded
    # (the C walk hands a step's files over in one _emit_many call, the Python walk each
    # in an _emit call)
    import erofs_tools.builder.rafs_walk as walk_mod
    real, real_many = walk_mod.WalkFeed._emit, walk_mod.WalkFeed._emit_many
    met = []

    def vanish(item):
        if os.path.basename(os.fsdecode(item[1])) == "f17":
            met.append(item)
            os.unlink(src / "f17")

    def emit(self, item):
        vanish(item)
        return real(self, item)

    def emit_many(self, items):
        for item in items:
            vanish(item)
        return real_many(self, items)

    monkeypatch.setattr(walk_mod.WalkFeed, "_emit", emit)
    monkeypatch.setattr(walk_mod.WalkFeed, "_emit_many", emit_many)
    from erofs_tools.errors import InputError
    with pytest.raises(InputError, match="f17"):
        pack(src, tmp_path / "boot", blobs, PackOptions())
    assert len(met) == 1
    assert os.listdir(blobs) == []
    assert sorted(os.listdir(tmp_path)) == ["blobs", "src"]


@pytest.mark.root
def test_chunk_info_index_above_16_bits(tmp_path):
    """CI indexes >= 65536 put bits 16-23 in device_id's high byte; the kernel masks them."""
    need_root()
    src = tmp_path / "src"
    src.mkdir()
    n = 66_000
    data = os.urandom(4096 * n)
    (src / "big").write_bytes(data)
    (src / "after").write_bytes(b"last chunk of the blob")
    boot, blobs, r = do_pack(src, tmp_path, chunk_size=4096, compressor="none")
    assert r["chunks_new"] == n + 1
    stats = validate_rafs_bootstrap(open(boot, "rb").read())
    assert stats["chunks"] == n + 1
    # the chunks at 65535/65536/65999 have CI indexes around the 16-bit boundary;
    # the whole-tree comparison reads every one of them through the kernel
    mount_and_compare(boot, blobs, src, tmp_path)


def test_nydus_vector_as_chunk_dict(tmp_path):
    """A bootstrap built with the nydus-image vector as chunk dict references its blob."""
    vec = str(NYDUS_VECTORS)
    vboot = os.path.join(vec, "rafs-v6-2.2.boot")
    vid = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    assert os.path.exists(vboot), f"test vector missing: {vboot}"
    import zstandard
    raw = open(os.path.join(vec, "blobs", vid), "rb").read()
    d = zstandard.ZstdDecompressor()
    src = tmp_path / "src"
    src.mkdir()
    (src / "lib.rs").write_bytes(d.decompress(raw[0:4828], max_output_size=1 << 20))
    (src / "sync_io.rs").write_bytes(d.decompress(raw[4828:7802], max_output_size=1 << 20))
    (src / "copy-of-lib.rs").write_bytes((src / "lib.rs").read_bytes())
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    r = pack(src, tmp_path / "boot", blobs, PackOptions(chunk_dicts=[vboot]))
    assert r["blob_id"] is None and r["chunks_dict"] == 3 and r["chunks_new"] == 0
    assert [b["blob_id"] for b in r["blobs"]] == [vid]
    validate_rafs_bootstrap(str(tmp_path / "boot"), {vid: len(raw)})
    mount_and_compare(tmp_path / "boot", os.path.join(vec, "blobs"), src, tmp_path)


def test_missing_blob_dir_is_created(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    blobs = tmp_path / "new" / "blobs"
    cli("pack", src, "-B", tmp_path / "boot", "-D", blobs, "-q")
    assert len(os.listdir(blobs)) == 1 and (tmp_path / "boot").stat().st_size % 4096 == 0
