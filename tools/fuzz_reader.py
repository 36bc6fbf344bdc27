"""Mutation fuzzer for the reader, check, unpack, inspect and stat.

    python tools/fuzz_reader.py --cases 20000 --jobs 2 [--seed S] [--json]

A tool, not part of the library: it drives the builder (seed images) and the reader,
so it sits above both layers (DEVELOPING.md).

Seeds are small, valid images with their blobs (the Nydus test vectors, mkfs.erofs
images when erofs-utils is installed, our own mkfs and pack output). Each case applies
1-3 mutations (bit flips, byte writes, truncation/extension, field-level writes to
superblock, RAFS tables, inodes, dirents, chunk indexes, xattr headers, CI tables, blob
meta headers and TOCs, block splices) and runs every read-side operation under a
wall-clock alarm in a worker process whose address space is capped with RLIMIT_AS.
The only acceptable outcome of an operation is success or an ErofsToolsError; anything
else (another exception, a timeout, a crash, a MemoryError) is reported with the case
number, which reproduces it: `--only N`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import signal
import stat as _stat
import subprocess
import sys
import tempfile
import time
import traceback

from erofs_tools.errors import ErofsToolsError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R

UNPACK_LIMIT = 64 << 20


class CaseTimeout(BaseException):
    pass


class Seed:
    def __init__(self, name, image, blobs=None, devices=None):
        self.name = name
        self.image = bytes(image)
        self.blobs = dict(blobs or {})        # tag -> bytes (Nydus blobs, blob dir)
        self.devices = list(devices or [])    # raw device files, in order
        self.fields = {}                      # target -> [(offset, size, label)]


# --------------------------------------------------------------------------- corpus --
def _nydus_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    # the Nydus-written vectors the test suite keeps in the repository
    for cand in (os.environ.get("EROFS_TOOLS_NYDUS_TESTDATA"),
                 os.path.join(here, "..", "tests", "data", "nydus")):
        if cand and os.path.isdir(cand):
            return cand
    return None


def _small_tree(root):
    os.makedirs(root)
    j = os.path.join

    def w(rel, data, mode=0o644):
        p = j(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)

    rnd = random.Random(7)
    w("a.txt", b"hello\n")
    w("empty", b"")
    w("block", bytes(rnd.getrandbits(8) for _ in range(4096)))
    w("mid", bytes(rnd.getrandbits(8) for _ in range(9000)), 0o755)
    w("dup1", b"same" * 5000)
    w("dup2", b"same" * 5000)
    # compressible text of several clusters (compressed seeds: many extents, a prefix
    # copy for dedupe's partial references, tails for ztailpacking and fragments)
    words = [b"erofs ", b"cluster ", b"inode ", b"block ", b"data\n"]
    text = b"".join(rnd.choice(words) for _ in range(6000))
    w("text", text)
    w("text-prefix", text[:11000])
    w("sub/inner/leaf", b"leaf")
    for i in range(40):      # long names: the directory spans two blocks
        w(f"dir/n{i:03d}-{'z' * (100 + i % 20)}", b"%d" % i)
    os.link(j(root, "a.txt"), j(root, "hard"))
    os.symlink("a.txt", j(root, "link"))
    os.symlink("../../../etc/passwd", j(root, "sub", "evil"))
    os.symlink("/abs/target", j(root, "abs"))
    os.mkfifo(j(root, "fifo"))
    if os.geteuid() == 0:
        os.mknod(j(root, "chr"), _stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.setxattr(j(root, "sub"), "trusted.overlay.opaque", b"y")
    for n in ("a.txt", "mid", "dup1", "dup2"):
        os.setxattr(j(root, n), "user.tag", b"shared-value")
    os.setxattr(j(root, "mid"), "user.only", b"x" * 100)
    # fixed times (and fixed uuids below) keep the corpus, hence every case, reproducible
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in dirnames + filenames:
            os.utime(j(dirpath, n), ns=(1_700_000_000_123_456_789,) * 2, follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_123_456_789,) * 2)
    return root


ZSEEDS_REF = (("mkfs.erofs-lz4", ["-zlz4"]),
              ("mkfs.erofs-lz4hc-ztail", ["-zlz4hc", "-Eztailpacking"]),
              ("mkfs.erofs-lzma-frag-dedupe", ["-zlzma", "-Efragments,dedupe", "-C16384"]),
              ("mkfs.erofs-zstd-big-full", ["-zzstd", "-C65536", "-Elegacy-compress"]),
              ("mkfs.erofs-deflate-dedupe", ["-zdeflate", "-Ededupe,ztailpacking"]))
# seeds added later: chosen by every 8th case only (case % 8 == 7), so that the cases
# of the others stay what they were (tests/test_fuzz_reader.py replays some by number)
LATE_SEEDS_REF = (("mkfs.erofs-48bit", ["-E48bit"]),
                  ("mkfs.erofs-dot-omitted", ["-Edot-omitted"]),
                  # metadata compression: the inodes in the metabox, plain or lz4hc
                  ("mkfs.erofs-metabox", ["-m4096"]),
                  ("mkfs.erofs-metabox-lz4hc", ["-zlz4hc", "-C65536", "-m65536"]))
# our mkfs's newer layouts (late too): directories in the packed inode (--zD), chunk-based
# files (block map; 8-byte indexes and an extra device), the 48-bit layout's extent records
LATE_SEEDS_OURS = (("erofs-tools-mkfs-zD", ["--zD", "-z", "lz4hc", "-E", "fragments"], False),
                   ("erofs-tools-mkfs-chunk", ["--chunksize=4096"], False),
                   ("erofs-tools-mkfs-chunk-blobdev", ["--chunksize=8192"], True),
                   ("erofs-tools-mkfs-48bit-lzma", ["-E48bit", "-z", "lzma", "-C65536"], False))
# the shapes of the metadata zone (--MZ: the inode records after the data, nid 0 a block
# before them; with -m in the metabox), compressed index images (--tar=i -z: the tar their
# device, the packed inode or metabox compressed, the algorithm records before the device
# slot) and an --incremental image (two layers over an lz4hc base: the base's root record
# rewritten in place, ".." fixed up, a hardlink's nlink lowered by a whiteout); late too
NEWER_SEEDS_OURS = (("erofs-tools-mkfs-MZ", ["--MZ"]),
                    ("erofs-tools-mkfs-MZ-m", ["--MZ", "-m4096"]),
                    ("erofs-tools-tari-lz4hc-zD", ["--tar=i", "-zlz4hc", "--zD"]),
                    ("erofs-tools-tari-m-lzma", ["--tar=i", "-m4096", "-zlzma"]),
                    ("erofs-tools-incremental-lz4hc", ["-zlz4hc"]))
LATE_SEEDS = {"mkfs.erofs-48bit", "mkfs.erofs-dot-omitted", "erofs-tools-mkfs-dot-omitted",
              "mkfs.erofs-metabox", "mkfs.erofs-metabox-lz4hc",
              *(name for name, _a, _d in LATE_SEEDS_OURS),
              *(name for name, _a in NEWER_SEEDS_OURS)}
ZSEEDS_OURS = (("lz4hc", 16384), ("zstd", 0), ("lzma", 0), ("deflate", 0))


def build_corpus(work):
    seeds = []
    nd = _nydus_dir()
    if nd:
        boot = open(os.path.join(nd, "rafs-v6-2.2.boot"), "rb").read()
        bid = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
        blob = open(os.path.join(nd, "blobs", bid), "rb").read()
        seeds.append(Seed("nydus-vector", boot, {bid: blob}))
        try:
            from erofs_tools.reader.blob import read_toc, read_toc_section
            tb = open(os.path.join(nd, "toc",
                                   "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"),
                      "rb").read()
            ra = lambda o, n: tb[o:o + n]  # noqa: E731
            tboot = read_toc_section(ra, len(tb), read_toc(ra, len(tb)), R.TOC_NAME_BOOTSTRAP)
            from erofs_tools.reader.image import Image
            tag = Image(tboot).blob_id(1)
            seeds.append(Seed("nydus-inline-meta", tboot, {tag: tb}))
        except ErofsToolsError:
            pass
    src = _small_tree(os.path.join(work, "tree"))
    if shutil.which("mkfs.erofs"):
        for name, args, blobdev in (("mkfs.erofs", [], False), ("mkfs.erofs-x1", ["-x1"], False),
                                    ("mkfs.erofs-chunk", ["--chunksize=4096"], False),
                                    ("mkfs.erofs-blobdev", ["--chunksize=8192"], True)):
            img = os.path.join(work, name + ".img")
            extra = []
            dev = os.path.join(work, name + ".dev")
            if blobdev:
                open(dev, "wb").close()
                extra = [f"--blobdev={dev}"]
            p = subprocess.run(["mkfs.erofs", "--quiet", "-T1700000000",
                                "-U00000000-0000-0000-0000-000000000001", *args, *extra, img, src],
                               capture_output=True)
            if p.returncode == 0:
                seeds.append(Seed(name, open(img, "rb").read(),
                                  devices=[open(dev, "rb").read()] if blobdev else None))
        # compressed: every algorithm, and the layouts mkfs.erofs 1.9 writes; the 48-bit
        # layout (the root nid in its le16 field), directories without "."
        for name, args in ZSEEDS_REF + LATE_SEEDS_REF:
            img = os.path.join(work, name + ".img")
            p = subprocess.run(["mkfs.erofs", "--quiet", "-T1700000000",
                                "-U00000000-0000-0000-0000-000000000001", *args, img, src],
                               capture_output=True)
            if p.returncode == 0:
                seeds.append(Seed(name, open(img, "rb").read()))
    try:
        from erofs_tools.builder.mkfs import mkfs as our_mkfs
        from erofs_tools.builder.options import Compression, MkfsOptions
        img = os.path.join(work, "ours.img")
        our_mkfs(img, src, MkfsOptions(uuid=bytes(15) + b"\1"))
        seeds.append(Seed("erofs-tools-mkfs", open(img, "rb").read()))
        for alg, pcluster in ZSEEDS_OURS:
            img = os.path.join(work, f"ours-{alg}.img")
            our_mkfs(img, src, MkfsOptions(uuid=bytes(15) + b"\1",
                                           compress=Compression(alg, None, pcluster)))
            seeds.append(Seed(f"erofs-tools-mkfs-z{alg}", open(img, "rb").read()))
        # the 48-bit layout (the root nid in rootnid_8b), directories without "."
        img = os.path.join(work, "ours-dot-omitted.img")
        our_mkfs(img, src, MkfsOptions(uuid=bytes(15) + b"\1", sb_48bit=True,
                                       dot_omitted=True))
        seeds.append(Seed("erofs-tools-mkfs-dot-omitted", open(img, "rb").read()))
    except Exception:  # noqa: BLE001 - optional seed; the builder may be mid-work
        pass
    seeds += _late_ours(work, src)
    try:
        bdir = os.path.join(work, "blobs")
        os.makedirs(bdir, exist_ok=True)
        boot = os.path.join(work, "pack.boot")
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "pack", "-q", "-B", boot,
                            "-D", bdir, "--chunk-size", "4K", src], capture_output=True)
        if p.returncode == 0:
            blobs = {n: open(os.path.join(bdir, n), "rb").read() for n in os.listdir(bdir)}
            seeds.append(Seed("erofs-tools-pack", open(boot, "rb").read(), blobs))
    except OSError:
        pass
    try:
        seeds.append(_zran_seed(work))
    except Exception:  # noqa: BLE001 - optional seed; the builder may be mid-work
        pass
    for s in seeds:
        resign = s.fields.get("zran-resign")
        s.fields = field_map(s)
        if resign:
            s.fields["zran-resign"] = resign
            s.fields[("blob", resign[1])] = resign[2]
    return seeds


def _late_ours(work, src):
    """The LATE_SEEDS_OURS images, made by `erofs-tools mkfs` from _late_tree, and the
    NEWER_SEEDS_OURS ones."""
    csrc = _late_tree(work, src)
    out = []
    for name, args, blobdev in LATE_SEEDS_OURS:
        img = os.path.join(work, name + ".img")
        dev = os.path.join(work, name + ".dev")
        extra = [f"--blobdev={dev}"] if blobdev else []
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-T1700000000",
                            "-U00000000-0000-0000-0000-000000000001", *args, *extra, img,
                            csrc], capture_output=True)
        if p.returncode == 0:
            out.append(Seed(name, open(img, "rb").read(),
                            devices=[open(dev, "rb").read()] if blobdev else None))
    return out + _newer_ours(work, csrc)


def _late_tree(work, src):
    """The small tree plus a sparse file and another duplicate (holes and shared chunks
    for the chunk-based seeds), a file of several 64 KiB lclusters and one of noise
    between text."""
    csrc = _small_tree(os.path.join(work, "tree-chunk"))
    with open(os.path.join(csrc, "sparse"), "wb") as f:
        f.write(b"head" * 1024)
        f.seek(5 * 4096)
        f.write(b"mid" * 2000)
        f.truncate(12 * 4096 + 100)
    shutil.copyfile(os.path.join(src, "mid"), os.path.join(csrc, "mid-copy"))
    shutil.copystat(os.path.join(src, "mid"), os.path.join(csrc, "mid-copy"))
    # several lclusters of 64 KiB (many extent records), text around noise (plain ones)
    rnd = random.Random(8)
    words = [b"erofs ", b"extent ", b"record ", b"chunk ", b"packed\n"]
    with open(os.path.join(csrc, "big"), "wb") as f:
        f.write(b"".join(rnd.choice(words) + b"%d " % rnd.getrandbits(24)
                         for _ in range(20000)))
    with open(os.path.join(csrc, "mixed"), "wb") as f:
        f.write(b"".join(rnd.choice(words) for _ in range(4000)) + rnd.randbytes(140000) +
                b"".join(rnd.choice(words) for _ in range(4000)))
    for n in ("sparse", "mid-copy", "big", "mixed", "."):
        os.utime(os.path.join(csrc, n), ns=(1_700_000_000_123_456_789,) * 2)
    return csrc


def _newer_ours(work, csrc):
    """The NEWER_SEEDS_OURS images from the same tree (--tar=i: a tar of it, the device)."""
    import tarfile

    tar = os.path.join(work, "tree-chunk.tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(csrc, arcname=".")          # (tarfile adds a directory's entries sorted)
    layers = _incremental_layers(work)

    def mkfs(img, source, *args):
        return subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-T1700000000",
                               "-U00000000-0000-0000-0000-000000000001", *args, img, source],
                              capture_output=True).returncode == 0
    out = []
    for name, args in NEWER_SEEDS_OURS:
        img = os.path.join(work, name + ".img")
        if "--tar=i" in args:
            if mkfs(img, tar, *args):
                out.append(Seed(name, open(img, "rb").read(), devices=[open(tar, "rb").read()]))
        elif "incremental" in name:
            if mkfs(img, csrc, *args) and all(mkfs(img, d, "--incremental", "--ovlfs-strip")
                                              for d in layers):
                out.append(Seed(name, open(img, "rb").read()))
        elif mkfs(img, csrc, *args):
            out.append(Seed(name, open(img, "rb").read()))
    return out


def _incremental_layers(work):
    """Two layers over _small_tree: files replaced and added, a new directory in a kept
    one, and (as root) overlayfs whiteouts: one removes a hardlink of a.txt (its nlink
    drops), one a whole directory."""
    l1, l2 = os.path.join(work, "layer1"), os.path.join(work, "layer2")
    for rel, data in (("layer1/mid", b"replaced " * 700), ("layer1/sub/new/file", b"new\n"),
                      ("layer1/added", b"added " * 3000), ("layer2/sub/inner/leaf2", b"l2"),
                      ("layer2/dir/n000-later", b"later " * 40), ("layer2/top", b"top")):
        p = os.path.join(work, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if os.geteuid() == 0:
        os.mknod(os.path.join(l1, "hard"), _stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.mknod(os.path.join(l2, "dup2"), _stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.mknod(os.path.join(l2, "sub", "inner", "leaf"), _stat.S_IFCHR | 0o600,
                 os.makedev(0, 0))
    for d in (l1, l2):
        for dirpath, dirnames, filenames in os.walk(d, topdown=False):
            for n in dirnames + filenames:
                os.utime(os.path.join(dirpath, n), ns=(1_700_000_100_000_000_000,) * 2,
                         follow_symlinks=False)
        os.utime(d, ns=(1_700_000_100_000_000_000,) * 2)
    return l1, l2


def _zran_seed(work):
    """A gzip tar layer indexed by `convert --oci-ref`'s builder (docs/zran.md), its meta
    blob stored with a raw CI area so that field mutations reach the zran contexts and
    CI v2 entries; mutate() re-signs the meta blob (its sha256 in the blob table), as a
    hostile index author would, so the parser behind the digest check is what is fuzzed."""
    import gzip
    import hashlib
    import tarfile

    from erofs_tools.builder.zran import pack_zran_layer
    from erofs_tools.reader import blob as rblob
    from erofs_tools.reader.image import Image
    rnd = random.Random(16)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, size in (("a.txt", 90_000), ("b.txt", 150_000), ("c", 0), ("d.txt", 5000)):
            data = bytes(rnd.choice(b"zran fuzz\n") for _ in range(size))
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    gz = gzip.compress(raw.getvalue(), mtime=0)
    layer = hashlib.sha256(gz).hexdigest()
    d = os.path.join(work, "zran")
    os.makedirs(d, exist_ok=True)
    boot = os.path.join(d, "l.boot")
    r = pack_zran_layer(io.BytesIO(gz), "sha256:" + layer, len(gz), boot, d,
                        chunk_size=0x1000, span=64 << 10)
    meta = open(os.path.join(d, r["meta_blob"]), "rb").read()
    image = bytearray(open(boot, "rb").read())
    img = Image(bytes(image))
    e = img.blob_entries[0]
    entry_off = img.rafs.s_blob_table_offset
    area = rblob._decompress("zstd" if e.ci_compressor else "none",
                             meta[:e.ci_compressed_size], e.ci_uncompressed_size, "seed")
    hdr = R.BlobMetaHeader.decode(meta, e.ci_compressed_size)
    toc = rblob.read_toc(lambda o, n: meta[o:o + n], len(meta))
    dg = toc.entries[R.TOC_NAME_BLOB_DIGEST]
    digests = meta[dg.compressed_offset:dg.compressed_offset + dg.compressed_size]
    hdr.ci_compressor, hdr.ci_compressed_size = 0, len(area)
    hb = hdr.encode()
    entries = [R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_META,
                          uncompressed_digest=hashlib.sha256(area).digest(),
                          compressed_offset=0, compressed_size=len(area),
                          uncompressed_size=len(area)),
               R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_DIGEST,
                          uncompressed_digest=hashlib.sha256(digests).digest(),
                          compressed_offset=len(area) + len(hb),
                          compressed_size=len(digests), uncompressed_size=len(digests))]
    tb = b"".join(t.encode() for t in entries)
    tb += R.tar_header(R.TOC_NAME_TOC, len(tb))
    new_meta = bytes(area) + hb + digests + tb
    e.ci_compressor, e.ci_compressed_size = 0, len(area)
    e.blob_toc_size, e.blob_toc_digest = len(tb), hashlib.sha256(tb).digest()
    e.blob_meta_size = len(new_meta)
    e.blob_meta_digest = hashlib.sha256(new_meta).digest()
    image[entry_off:entry_off + R.BlobEntry.SIZE] = e.encode()
    meta_tag = e.blob_meta_digest.hex()
    fields = [(off, size, label) for off, size, label in
              _record_fields(R.BlobMetaHeader, len(area), "zbmh")]
    for k in range(min(hdr.ctx_count, 16)):
        fields += _record_fields(R.ZranContext, hdr.ctx_offset + k * R.ZranContext.SIZE,
                                 f"zctx[{k}]")
    for k in range(min(hdr.ci_entries, 16)):
        for w, label in ((0, "uncomp"), (8, "comp"), (16, "data")):
            fields.append((k * R.CI_V2_SIZE + w, 8, f"zci{k}.{label}"))
            fields.append((k * R.CI_V2_SIZE + w + 4, 4, f"zci{k}.{label}.hi"))
    s = Seed("zran", bytes(image), {layer: gz, meta_tag: new_meta})
    s.fields = {"zran-resign": (entry_off, meta_tag, fields)}
    return s


def _resign_zran(seed, image, blobs):
    """A zran seed's mutated meta blob, renamed to its sha256 and recorded in the blob
    table (unless the mutation removed it)."""
    import hashlib
    entry_off, tag, _fields = seed.fields["zran-resign"]
    meta = blobs.pop(tag, None)
    if meta is None:
        return image
    new = hashlib.sha256(meta).digest()
    blobs[new.hex()] = meta
    buf = bytearray(image)
    lay = R.BlobEntry.field_layout()
    for name, value in (("blob_meta_digest", new), ("blob_meta_size",
                                                    len(meta).to_bytes(8, "little"))):
        off, size = lay[name]
        if entry_off + off + size <= len(buf):
            buf[entry_off + off:entry_off + off + size] = value
    return bytes(buf)


# ------------------------------------------------------------------------ field maps --
def _record_fields(cls, base, label):
    out = []
    off = 0
    import struct
    for name, code in cls.FIELDS:
        size = struct.calcsize("<" + code)
        if name is not None and not code.endswith("s"):
            out.append((base + off, size, f"{label}.{name}"))
        off += size
    return out


def field_map(seed):
    """Offsets of interesting fields in the seed's image and blobs."""
    from erofs_tools.reader.image import Image
    fields = {"image": []}
    f = fields["image"]
    f += _record_fields(E.SuperBlock, E.SUPER_OFFSET, "sb")
    img = Image(seed.image)
    if img.is_48bit:
        f += [(E.SUPER_OFFSET + E.SB_BUILD_TIME32_OFFSET, 4, "sb.build_time32"),
              (E.SUPER_OFFSET + E.SB_ROOTNID_8B_OFFSET, 8, "sb.rootnid_8b")]
    if img.metabox is not None:
        # its nid, its inode, its map header and first extent records or indexes (the
        # inodes inside it are compressed bytes: the random mutations reach them)
        f.append((E.SUPER_OFFSET + E.SB_METABOX_NID_OFFSET, 8, "sb.metabox_nid"))
        mino = img.inode(img.metabox.nid)
        f += _record_fields(E.ExtendedInode if mino.version else E.CompactInode,
                            mino.offset, "metabox")
        h = (mino.data_end + 7) // 8 * 8
        f += [(h, 4, "metabox.z.extents_lo"), (h + 4, 2, "metabox.z.advise"),
              (h + 6, 2, "metabox.z.extents_hi")]
        f += [(h + 16 + 16 * k, 4, f"metabox.ext{k}.plen") for k in range(4)]
        f += [(h + 20 + 16 * k, 4, f"metabox.ext{k}.pstart") for k in range(4)]
    if img.sb.feature_incompat & E.FEATURE_INCOMPAT_COMPR_CFGS:
        # per-algorithm records after the superblock: le16 length + payload
        f += [(1152, 2, "zcfg0.len"), (1154, 4, "zcfg0.data"), (1168, 2, "zcfg1.len"),
              (1170, 4, "zcfg1.data")]
    if img.sb.packed_nid:
        try:
            pino = img.inode(img.sb.packed_nid)
            cls = E.ExtendedInode if pino.version else E.CompactInode
            f += _record_fields(cls, pino.offset, "packed")
            h = (pino.data_end + 7) // 8 * 8
            f += [(h, 4, "packed.z.fragoff_idata"), (h + 4, 2, "packed.z.advise"),
                  (h + 8, 8, "packed.z.index0")]
        except ErofsToolsError:
            pass
    if img.is_rafs:
        f += _record_fields(R.ExtSuperBlock, R.EXT_SUPER_OFFSET, "ext")
        for i in range(len(img.blob_entries)):
            f += _record_fields(R.BlobEntry, img.rafs.s_blob_table_offset + i * 256, f"blob[{i}]")
        for i in range(len(img.chunk_infos)):
            f += _record_fields(R.ChunkInfo, img.rafs.s_chunk_table_offset + i * 80, f"ci[{i}]")
    for i in range(len(img.devices)):
        f += _record_fields(E.DeviceSlot, img.sb.devt_slotoff * 128 + i * 128, f"dev[{i}]")
    seen = set()
    plain_box = _plain_metabox_runs(img)
    for _p, _d, ino in img.walk():
        if ino.nid in seen:
            continue
        if ino.nid >> E.NID_METABOX_BIT:
            # in the metabox: compressed bytes (the random mutations reach them), or
            # stored plain (-m without -z): the record's fields where its bytes lie
            seen.add(ino.nid)
            at = _in_runs(plain_box, ino.offset, ino.inode_size)
            if at is not None:
                f += _record_fields(E.ExtendedInode if ino.version else E.CompactInode,
                                    at, f"mbinode{ino.nid & 0xFFFFFFFF}")
            if ino.is_dir():
                f += _dirent_fields(img, ino)       # (its blocks are in the image)
            continue
        seen.add(ino.nid)
        cls = E.ExtendedInode if ino.version else E.CompactInode
        f += _record_fields(cls, ino.offset, f"inode{ino.nid}")
        if ino.xattr_icount:
            f.append((ino.offset + ino.inode_size + 4, 1, f"inode{ino.nid}.h_shared_count"))
            f.append((ino.offset + ino.inode_size + 12, 4, f"inode{ino.nid}.xattr0"))
        if ino.layout == E.LAYOUT_CHUNK_BASED:
            fmt = ino.i_u & 0xFFFF
            unit = 8 if fmt & E.CHUNK_FORMAT_INDEXES else 4
            start = (ino.data_end + unit - 1) // unit * unit
            for k in range(min(len(img.chunks(ino)), 8)):
                if unit == 8:
                    f.append((start + 8 * k, 2, f"inode{ino.nid}.chunk{k}.advise"))
                    f.append((start + 8 * k + 2, 2, f"inode{ino.nid}.chunk{k}.device"))
                    f.append((start + 8 * k + 4, 4, f"inode{ino.nid}.chunk{k}.blkaddr"))
                else:
                    f.append((start + 4 * k, 4, f"inode{ino.nid}.chunk{k}.blkaddr"))
        if ino.layout in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT):
            # map header, then the first index entries (full: 8 bytes; compact: packs)
            h = (ino.data_end + 7) // 8 * 8
            f.append((h, 4, f"inode{ino.nid}.z.fragoff_idata"))
            f.append((h + 4, 2, f"inode{ino.nid}.z.advise"))
            f.append((h + 6, 1, f"inode{ino.nid}.z.algtype"))
            f.append((h + 7, 1, f"inode{ino.nid}.z.clusterbits"))
            adv = int.from_bytes(img.data[h + 4:h + 6], "little")
            if ino.layout == E.LAYOUT_COMPRESSED_FULL and adv & E.ADVISE_EXTENTS:
                # the 48-bit layout's extent records (4, 8, 16 or 32 bytes): plen, then
                # pstart_lo, pstart_hi, lstart_lo as the size holds them
                rs = E.extent_recsize(adv)
                f.append((h, 4, f"inode{ino.nid}.z.extents_lo"))
                f.append((h + 6, 2, f"inode{ino.nid}.z.extents_hi"))
                r0 = (h + 8 + rs - 1) // rs * rs + (8 if rs == 4 else 0)
                if rs == 4:
                    f.append((r0 - 8, 8, f"inode{ino.nid}.ext.pstart"))
                try:
                    from erofs_tools.reader.zdata import state
                    nrec = len(state(img).zmap(ino).extents)
                except ErofsToolsError:
                    nrec = 1
                for k in range(min(nrec, 8)):
                    b = r0 + rs * k
                    for w, label in ((0, "plen"), (4, "pstart_lo"), (8, "pstart_hi"),
                                     (12, "lstart_lo")):
                        if w < rs:
                            f.append((b + w, 4, f"inode{ino.nid}.ext{k}.{label}"))
            elif ino.layout == E.LAYOUT_COMPRESSED_FULL:
                for k in range(8):
                    b = h + 16 + 8 * k
                    f.append((b, 2, f"inode{ino.nid}.li{k}.advise"))
                    f.append((b + 2, 2, f"inode{ino.nid}.li{k}.clusterofs"))
                    f.append((b + 4, 2, f"inode{ino.nid}.li{k}.delta0"))
                    f.append((b + 4, 4, f"inode{ino.nid}.li{k}.blkaddr"))
            else:
                for k in range(12):
                    f.append((h + 8 + 2 * k, 2, f"inode{ino.nid}.ci{k}"))
        if ino.is_dir():
            f += _dirent_fields(img, ino)
    for tag, blob in seed.blobs.items():
        bf = []
        n = len(blob)
        bf.append((n - 512 + 124, 12, "toc.tar.size"))
        for i in range(4):
            base = n - 512 - 512 + 128 * i
            if base >= 0:
                bf += _record_fields(R.TocEntry, base, f"toc[{i}]")
        try:
            from erofs_tools.reader.blob import BlobMeta
            m = BlobMeta.from_blob(lambda o, k, blob=blob: blob[o:o + k], n)
            ci_off = m.chunks[-1].compressed_offset + m.chunks[-1].compressed_size + 512 \
                if m.chunks else 0
            for c in m.chunks[:8]:
                bf.append((ci_off + 16 * c.index, 8, f"ci{c.index}.uncomp"))
                bf.append((ci_off + 16 * c.index + 8, 8, f"ci{c.index}.comp"))
            hdr = ci_off + 16 * len(m.chunks)
            bf += _record_fields(R.BlobMetaHeader, hdr, "bmh")
        except ErofsToolsError:
            pass
        fields[("blob", tag)] = [x for x in bf if 0 <= x[0] and x[0] + x[1] <= n]
    return fields


def _dirent_fields(img, ino):
    """The first 16 dirents of each block of a directory stored in the image."""
    f = []
    if ino.layout in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT):
        return f        # (--zD: a compressed directory's dirents are compressed bytes)
    for _fo, length, dev, phys in img.map_data(ino):
        if dev != 0:
            continue
        # dirents at the start of each block of directory data
        for b in range(0, length, img.blksz):
            base = phys + b
            n0 = int.from_bytes(img.data[base + 8:base + 10], "little")
            for i in range(min(n0 // 12, 16)):
                f.append((base + 12 * i, 8, f"dir{ino.nid}.de{i}.nid"))
                f.append((base + 12 * i + 8, 2, f"dir{ino.nid}.de{i}.nameoff"))
                f.append((base + 12 * i + 10, 1, f"dir{ino.nid}.de{i}.type"))
    return f


def _plain_metabox_runs(img):
    """[(metabox offset, length, image offset)] of a metabox stored plain, else []."""
    if img.metabox is None:
        return []
    try:
        mino = img.inode(img.metabox.nid)
        if mino.layout not in (E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE):
            return []
        return [(fo, n, phys) for fo, n, dev, phys in img.map_data(mino) if dev == 0]
    except ErofsToolsError:
        return []


def _in_runs(runs, off, size):
    for fo, n, phys in runs:
        if fo <= off and off + size <= fo + n:
            return phys + off - fo
    return None


# ------------------------------------------------------------------------- mutations --
INTERESTING = (0, 1, 2, 7, 8, 12, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFF, 0x8000,
               0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 32,
               1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1)


def _targets(seed):
    t = [("image", None)]
    t += [("blob", tag) for tag in seed.blobs]
    t += [("device", i) for i in range(len(seed.devices))]
    return t


def mutate(seed, rnd):
    """-> (image bytes, {tag: blob bytes}, [device bytes], description)."""
    bufs = {("image", None): bytearray(seed.image)}
    for tag, b in seed.blobs.items():
        bufs[("blob", tag)] = bytearray(b)
    for i, d in enumerate(seed.devices):
        bufs[("device", i)] = bytearray(d)
    desc = []
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        key = rnd.choice(_targets(seed)) if rnd.random() < 0.4 else ("image", None)
        buf = bufs[key]
        kind = rnd.choices(("bitflip", "bytes", "truncate", "extend", "field", "splice"),
                           (25, 15, 6, 3, 45, 6))[0]
        name = key[0] if key[1] is None else f"{key[0]}:{str(key[1])[:8]}"
        if not buf:
            kind = "extend"
        if kind == "bitflip":
            for _ in range(rnd.randint(1, 8)):
                pos = rnd.randrange(len(buf))
                buf[pos] ^= 1 << rnd.randrange(8)
            desc.append(f"{name}:bitflip")
        elif kind == "bytes":
            for _ in range(rnd.randint(1, 4)):
                pos = rnd.randrange(len(buf))
                buf[pos] = rnd.choice((0, 0xFF, rnd.getrandbits(8)))
            desc.append(f"{name}:bytes")
        elif kind == "truncate":
            cut = rnd.randrange(len(buf))
            del buf[cut:]
            desc.append(f"{name}:truncate@{cut}")
        elif kind == "extend":
            buf += bytes(rnd.choice((1, 512, 4096))) if rnd.random() < 0.5 else \
                bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64)))
            desc.append(f"{name}:extend")
        elif kind == "field":
            fk = "image" if key[0] == "image" else key if key[0] == "blob" else None
            flist = seed.fields.get(fk) if fk else None
            if not flist:
                pos = rnd.randrange(len(buf))
                buf[pos] ^= 0xFF
                desc.append(f"{name}:byte")
                continue
            off, size, label = rnd.choice(flist)
            if off + size > len(buf):
                continue
            old = int.from_bytes(buf[off:off + size], "little")
            mx = (1 << (8 * size)) - 1
            choice = rnd.randrange(6)
            if choice == 0:
                val = rnd.choice(INTERESTING)
            elif choice == 1:
                val = old + rnd.choice((-1, 1, 2, -2, 12, -12, 32, 4096))
            elif choice == 2:
                val = rnd.getrandbits(8 * size)
            elif choice == 3:
                val = old ^ (1 << rnd.randrange(8 * size))
            elif choice == 4:
                val = old * 2 + rnd.randrange(2)
            else:
                val = rnd.choice((len(seed.image), len(seed.image) // 32, 128, 36, 64))
            val &= mx
            buf[off:off + size] = val.to_bytes(size, "little")
            desc.append(f"{name}:{label}={val:#x}")
        elif kind == "splice":
            n = rnd.choice((12, 32, 64, 512, 4096))
            if len(buf) > n:
                a = rnd.randrange(len(buf) - n)
                b = rnd.randrange(len(buf) - n)
                buf[b:b + n] = buf[a:a + n]
                desc.append(f"{name}:splice{n}")
    image = bytes(bufs[("image", None)])
    blobs = {tag: bytes(bufs[("blob", tag)]) for tag in seed.blobs}
    devices = [bytes(bufs[("device", i)]) for i in range(len(seed.devices))]
    if "zran-resign" in seed.fields:
        image = _resign_zran(seed, image, blobs)
    return image, blobs, devices, " ".join(desc)


# -------------------------------------------------------------------------- one case --
class _Sink(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        return len(b)


def run_operations(image, blobs, devices, work):
    """Every read-side operation on one (possibly hostile) image; -> list of outcomes.
    Raises anything that is not an ErofsToolsError."""
    from erofs_tools.reader.blob import BlobMeta
    from erofs_tools.reader.data import BlobSource
    from erofs_tools.reader.fsck import check_image
    from erofs_tools.reader.image import Image
    from erofs_tools.reader.stats import image_stats, super_summary
    from erofs_tools.reader.unpack import unpack_to_dir, unpack_to_tar
    from erofs_tools.reader.zdata import is_compressed
    from erofs_tools.reader.zdata import state as zstate

    outcomes = []
    bdir = os.path.join(work, "blobs")
    os.makedirs(bdir, exist_ok=True)
    for tag, data in blobs.items():
        with open(os.path.join(bdir, tag), "wb") as f:
            f.write(data)
        try:
            m = BlobMeta.from_blob(lambda o, n, d=data: d[o:o + n], len(data), tag)
            BlobMeta.from_bytes(m.to_bytes())
            outcomes.append("blob:ok")
        except ErofsToolsError:
            outcomes.append("blob:err")
    devpaths = []
    for i, data in enumerate(devices):
        p = os.path.join(work, f"dev{i}")
        with open(p, "wb") as f:
            f.write(data)
        devpaths.append(p)

    def op(name, fn):
        try:
            fn()
            outcomes.append(f"{name}:ok")
        except ErofsToolsError as e:
            s = str(e)
            if not s.isprintable():     # one line, no terminal escapes
                raise AssertionError(f"{name}: multi-line error message: {s!r}") from None
            outcomes.append(f"{name}:err")

    img_box = []

    def open_img():
        img = Image(image)
        img.blobs = BlobSource(img, blob_dir=bdir if blobs else None, devices=devpaths)
        img_box.append(img)

    op("open", open_img)
    if not img_box:
        return outcomes
    img = img_box[0]

    def inspect():
        json.dumps(super_summary(img))
        for _p, _d, ino in img.walk():
            ino.as_dict()
            img.xattrs(ino)
            if ino.is_lnk():
                img.readlink(ino)
            if ino.layout == E.LAYOUT_CHUNK_BASED:
                img.chunks(ino)
            if is_compressed(ino):
                zstate(img).zmap(ino)

    op("inspect", inspect)
    problems = []
    op("check", lambda: problems.extend(check_image(img, img.blobs)))
    outcomes.append("check:problems" if problems else "check:clean")
    out = os.path.join(work, "out")
    unpack_errors = []

    def unpack():
        try:
            unpack_to_dir(img, out, [], limit=UNPACK_LIMIT)
        except ErofsToolsError as e:
            unpack_errors.append(str(e))
            raise

    op("unpack", unpack)
    if not problems and unpack_errors and "exceeds the limit" not in unpack_errors[0]:
        # check said clean but the image cannot be extracted: check misses a rule
        outcomes.append("check-clean-unpack-failed")
        outcomes.append("note:" + unpack_errors[0][:300])
    shutil.rmtree(out, ignore_errors=True)
    op("tar", lambda: unpack_to_tar(img, _Sink(), [], limit=UNPACK_LIMIT))
    op("stat", lambda: image_stats(img))
    op("runs", lambda: outcomes.append(_check_runs(img)))
    op("pins", lambda: outcomes.append(_check_pins(img)))
    img.blobs.close()
    img.close()
    return outcomes


def _check_runs(img):
    """The daemon's mount walk (reader.runs.data_runs: the C walk of csrc/fileruns.c)
    must give what the reader's own walk gives, or leave the image to it."""
    from erofs_tools._native_runs import file_runs_walk
    from erofs_tools.reader.runs import _reader_runs

    limit = 1 << 16
    got = file_runs_walk(img.data, img.meta_off, img.blkszbits, img.root_nid,
                         img.device_id_mask, len(img.devices), limit)
    if got is None:
        _reader_runs(img, limit, 0)
        return "runs:reader-walk"
    want = _reader_runs(img, limit, 0)
    if got != want:
        raise AssertionError(f"runs: the C walk differs from the reader's: {len(got[0])} "
                             f"files / {len(got[1])} runs against {len(want[0])} / "
                             f"{len(want[1])}")
    return "runs:c-walk" + (" with runs" if got[1] else "")


def _check_pins(img):
    """The C core's pin tables (csrc/chunkmap.c) must equal the reader's chunk_pins, with
    the same table digest text; the chunk map made from them must hold only pins."""
    from erofs_tools.reader.bootstrap import chunk_pin_tables, chunk_pins

    try:
        want = chunk_pins(img)
    except ErofsToolsError:
        want = None
    try:
        got = chunk_pin_tables(img)
    except ErofsToolsError:
        if want is not None:
            raise AssertionError("pins: the C core refuses a table the reader takes") from None
        raise
    if want is None:
        raise AssertionError("pins: the C core takes a table the reader refuses")
    maps = 0
    for b, (t, w) in enumerate(zip(got, want, strict=True)):
        if dict(t.items()) != w:
            raise AssertionError(f"pins: blob {b}: C pins differ from the reader's")
        text = b"".join(b"%d:%d:%d:%d:%d:" % (k, p.uncompressed_offset, p.uncompressed_size,
                                              p.compressed_offset, p.compressed_size)
                        + p.digest for k, p in sorted(w.items()))
        if t.table_text() != text:
            raise AssertionError(f"pins: blob {b}: table text differs")
        if not w:
            continue
        usize = max(p.uncompressed_offset + p.uncompressed_size for p in w.values())
        csize = max(p.compressed_offset + p.compressed_size for p in w.values())
        # what the daemon passes: a blob-table entry's u64 and a file size
        usize, csize = min(usize, (1 << 64) - 4096), min(csize, (1 << 64) - 1)
        for raw in (False, True):
            made = t.chunk_map(len(w), (usize + 4095) // 4096 * 4096, csize, 1 << 20, raw)
            if made is None:
                continue
            entries, make_chunks = made
            chunks = make_chunks()
            maps += 1
            if len(chunks) != len(w) or any(tuple(c[1:7]) != tuple(w[c.index])
                                             for c in chunks):
                raise AssertionError(f"pins: blob {b}: chunk map differs from its pins")
    return f"pins:{'tables' if got else 'none'}" + (" with maps" if maps else "")


def _alarm(signum, frame):
    raise CaseTimeout()


def worker(args):
    """Runs cases [start, start+count) and prints one JSON line per case."""
    if args.mem:
        lim = args.mem << 20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    signal.signal(signal.SIGALRM, _alarm)
    seeds = _load_corpus(args.corpus)
    for case in range(args.start, args.start + args.count):
        rnd = random.Random(f"{args.seed}-{case}")
        late = [s for s in seeds if s.name in LATE_SEEDS]
        pool = (late if late and case % 8 == 7 else
                [s for s in seeds if s.name not in LATE_SEEDS] or late)
        seed = pool[rnd.randrange(len(pool))]
        image, blobs, devices, desc = mutate(seed, rnd)
        print(json.dumps({"case": case, "start": True}), flush=True)
        work = tempfile.mkdtemp(prefix="fuzz-", dir=args.tmp)
        t0 = time.monotonic()
        rec = {"case": case, "seed": seed.name, "mutation": desc}
        try:
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            rec["outcomes"] = run_operations(image, blobs, devices, work)
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec["ok"] = True
        except CaseTimeout:
            rec.update(ok=False, error=f"timeout after {args.timeout}s")
        except MemoryError:
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec.update(ok=False, error="MemoryError (address-space limit)")
        except BaseException as e:  # noqa: BLE001 - everything else is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500],
                       traceback=traceback.format_exc()[-3000:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            shutil.rmtree(work, ignore_errors=True)
        rec["seconds"] = round(time.monotonic() - t0, 4)
        print(json.dumps(rec), flush=True)


def _save_corpus(seeds, path):
    import pickle
    with open(path, "wb") as f:
        pickle.dump([(s.name, s.image, s.blobs, s.devices, s.fields) for s in seeds], f)


def _load_corpus(path):
    import pickle
    with open(path, "rb") as f:
        raw = pickle.load(f)
    seeds = []
    for name, image, blobs, devices, fields in raw:
        s = Seed(name, image, blobs, devices)
        s.fields = fields
        seeds.append(s)
    return seeds


def run(cases, jobs=2, seed=0, timeout=10.0, mem=1024, only=None, progress=None,
        seed_filter=None):
    """Run the fuzzer; -> summary dict (counts, failures, timing). `seed_filter`: only
    the seeds whose name holds one of these substrings (cases then differ from an
    unfiltered run with the same seed)."""
    tmp = tempfile.mkdtemp(prefix="erofs-fuzz-")
    try:
        seeds = build_corpus(os.path.join(tmp, "corpus"))
        if seed_filter:
            seeds = [x for x in seeds if any(f in x.name for f in seed_filter)]
            if not seeds:
                raise SystemExit(f"no seed matches {seed_filter}")
        corpus = os.path.join(tmp, "corpus.pkl")
        _save_corpus(seeds, corpus)
        ids = [only] if only is not None else list(range(cases))
        # split into contiguous ranges per job; a crashed worker restarts after its case
        per = (len(ids) + jobs - 1) // jobs
        ranges = [(ids[i], min(per, len(ids) - i)) for i in range(0, len(ids), per)]
        results = {}
        crashes = []
        t0 = time.monotonic()
        import threading
        lock = threading.Lock()

        def run_range(start, count):
            end = start + count
            while start < end:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker",
                       "--corpus", corpus, "--start", str(start), "--count", str(end - start),
                       "--seed", str(seed), "--timeout", str(timeout), "--mem", str(mem),
                       "--tmp", tmp]
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
                errbuf = []
                # stream and buffer passed as arguments: bound to this worker, not to
                # whatever p and errbuf name after a restart
                t = threading.Thread(target=lambda err, buf: buf.append(err.read()),
                                     args=(p.stderr, errbuf), daemon=True)
                t.start()
                last_started = None
                done_here = set()
                for line in p.stdout:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("start"):
                        last_started = rec["case"]
                        continue
                    done_here.add(rec["case"])
                    with lock:
                        results[rec["case"]] = rec
                        if progress:
                            progress(len(results))
                rc = p.wait()
                t.join()
                err = "".join(errbuf)
                if last_started is not None and last_started not in done_here:
                    rec = {"case": last_started, "ok": False,
                           "error": f"worker died (rc {rc}): {err[-300:]}"}
                    with lock:
                        crashes.append(rec)
                        results[last_started] = rec
                    start = last_started + 1
                elif rc != 0:
                    with lock:
                        crashes.append({"case": start, "ok": False,
                                        "error": f"worker failed (rc {rc}): {err[-1000:]}"})
                    return
                else:
                    return

        threads = [threading.Thread(target=run_range, args=r) for r in ranges]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in crashes:
            results.setdefault(c["case"], c)
        elapsed = time.monotonic() - t0
        recs = [results[k] for k in sorted(results)]
        fails = [r for r in recs if not r.get("ok")]
        outcome_counts = {}
        notes = []
        for r in recs:
            for o in r.get("outcomes", ()):
                if o.startswith("note:"):
                    notes.append({"case": r["case"], "note": o[5:]})
                    continue
                outcome_counts[o] = outcome_counts.get(o, 0) + 1
        per_seed = {}
        for r in recs:
            per_seed[r.get("seed", "?")] = per_seed.get(r.get("seed", "?"), 0) + 1
        secs = sorted(r.get("seconds", 0) for r in recs if "seconds" in r)
        return {
            "cases": len(recs), "failures": fails, "elapsed_s": round(elapsed, 1),
            "cases_per_s": round(len(recs) / elapsed, 1) if elapsed else None,
            "seeds": [s.name for s in seeds], "cases_per_seed": per_seed,
            "outcomes": outcome_counts,
            "check_clean_but_unpack_failed": notes[:50],
            "slowest_case_s": secs[-1] if secs else None,
            "median_case_s": secs[len(secs) // 2] if secs else None,
            "timeout_s": timeout, "mem_limit_mib": mem, "seed": seed,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--mem", type=int, default=1024, help="RLIMIT_AS per worker, MiB")
    ap.add_argument("--only", type=int, help="run just this case number")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seeds", help="comma-separated substrings: fuzz only the seeds whose "
                    "name holds one (e.g. -z,lz4,ztail for the compressed ones)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    res = run(args.cases, args.jobs, args.seed, args.timeout, args.mem, args.only,
              seed_filter=args.seeds.split(",") if args.seeds else None)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            if k != "failures":
                print(f"{k}: {v}")
        for f in res["failures"][:50]:
            print(f"FAIL case {f['case']} [{f.get('seed')}] {f.get('mutation')}: {f['error']}")
            if f.get("traceback"):
                print(f["traceback"])
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
