"""Gzip layers as other compressors and hostile writers shape them, indexed by `convert
--oci-ref` from the real docker-registry and read lazily through the fscache daemon
(real fanotify mounts): members with FEXTRA, FNAME, FCOMMENT and FHCRC, a new member at
every file's data start and every chunk boundary (so chunks start exactly at member
starts and access points) and inside chunks (a chunk's data across two members),
zero-length members, trailing zeros, stored (level 0) blocks and level-9 streams whose blocks copy from the window right after an access point. Every
file reads back as the layers extracted in order by GNU tar; the daemon's C cold path
(ern_cold_zran) and the local reader (check, unpack) both. A layer whose gzip CRC or ISIZE
is wrong, or with bytes other than zeros after its last member, is refused by convert
(its registry digest is right: only the gzip check can tell) and DST gets nothing."""
import gzip
import hashlib
import io
import json
import os
import random
import struct
import tarfile
import zlib

import pytest
from helpers import assert_same_tree, vocab_text
from registry_fixtures import registry  # noqa: F401
from test_tar_helpers import E, make_tar, reference_rootfs, run_cli

CHUNK = 0x10000


def _text(n, seed):
    return vocab_text(n, seed, 400)


def _member(data, level=6, fancy=False, block_every=0):
    """One gzip member; fancy: FEXTRA, FNAME, FCOMMENT and FHCRC in its header;
    block_every: a deflate block ends every that many input bytes (Z_BLOCK: the window
    is kept, so the next block may copy from before the boundary)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    step = block_every or len(data) or 1
    body = b"".join(c.compress(data[i:i + step]) + (c.flush(zlib.Z_BLOCK) if block_every
                                                    else b"")
                    for i in range(0, len(data), step)) + c.flush()
    flags = 2 | 4 | 8 | 16 if fancy else 0
    h = bytearray(b"\x1f\x8b\x08" + bytes([flags]) + bytes(4) + b"\x00\xff")
    if fancy:
        extra = b"RA\x06\x00zran!!"
        h += struct.pack("<H", len(extra)) + extra + b"layer.tar\x00" + b"a comment\x00"
        h += struct.pack("<H", zlib.crc32(bytes(h)) & 0xFFFF)
    return bytes(h) + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def _cuts(tar):
    """Every regular file's data start, each CHUNK boundary inside it, and every
    100,003 bytes."""
    cuts = set()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            if m.isfile():
                cuts.update(m.offset_data + o for o in range(0, m.size + 1, CHUNK))
    cuts.update(range(100_003, len(tar), 100_003))      # and inside chunks: a chunk's
    return sorted(c for c in cuts if 0 < c < len(tar))  # data across two members


def _members_at_cuts(tar):
    parts, prev = [], 0
    for i, c in enumerate(_cuts(tar) + [len(tar)]):
        parts.append(_member(tar[prev:c], fancy=i % 2 == 0))
        if i % 3 == 0:
            parts.append(_member(b""))                  # zero-length member
        prev = c
    return b"".join(parts) + bytes(700)                 # trailing zeros (tar writers pad)


def _layers():
    l1 = [E("dir", "dir"), E("dir/text", data=_text(1_500_000, 1)),
          E("dir/exact", data=_text(3 * CHUNK, 2)), E("empty", data=b""),
          E("link", "hardlink", link="dir/text"), E("small", data=b"small\n")]
    l2 = [E("rnd", data=random.Random(2).randbytes(300_000)),     # stored blocks
          E("dir/.wh.exact", "file"), E("dir", "dir"), E("more", data=_text(400_000, 3))]
    # random 30,000-byte block repeated: after every access point the output is copies
    # from up to 30,000 bytes back, nearly the whole window
    l3 = [E("rep", data=random.Random(4).randbytes(30_000) * 40),
          E("small", data=b"replaced\n")]
    t1, t2, t3 = (make_tar(x) for x in (l1, l2, l3))
    gz = [_members_at_cuts(t1), _member(t2, level=0) + _member(t2[:0]),
          _member(t3, level=9, fancy=True, block_every=50_001)]
    return [t1, t2, t3], gz


def _layout(path, tars, gzs):
    from erofs_tools.registry import Descriptor, OciLayout, build_manifest
    from erofs_tools.registry import mediatypes as mt
    lay = OciLayout(path, create=True)
    descs = [Descriptor(mt.OCI_LAYER_TAR_GZIP, d.digest, d.size)
             for d in (lay.write_blob(g) for g in gzs)]
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest()
                                       for t in tars]}}).encode()
    c = lay.write_blob(cfg)
    m = build_manifest(Descriptor(mt.OCI_CONFIG, c.digest, c.size), descs)
    lay.put_manifest(m, "v1")
    return lay, m


def _tar_files(tmp_path, tars):
    paths = []
    for i, t in enumerate(tars):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(t)
        paths.append(str(p))
    return paths


def test_shapes_are_what_they_claim():
    """The fixture's layers are the shapes under test (gzip(1)'s reading of them)."""
    tars, gzs = _layers()
    for t, g in zip(tars, gzs):
        assert gzip.decompress(g[:-700] if g.endswith(bytes(700)) else g) == t
    assert gzs[0].count(b"\x1f\x8b\x08\x1e") > 10 and gzs[0].endswith(bytes(700))
    assert len(_cuts(tars[0])) > 20
    # layer 3: access points inside the repeated block (not byte-aligned), windows used
    from erofs_tools._native_zran import ZranIndexer
    ix = ZranIndexer(64 << 10)
    for _piece in ix.feed(gzs[2]):
        pass
    ix.finish()
    inner = [p for p in ix.points if 0 < p.out_offset < len(tars[2]) - (64 << 10)]
    assert len(inner) >= 8 and any(p.bits for p in inner), inner


@pytest.mark.root
@pytest.mark.registry
def test_hostile_shapes_read_back_lazily_and_locally(tmp_path, registry):  # noqa: F811
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    tars, gzs = _layers()
    lay, m = _layout(str(tmp_path / "src"), tars, gzs)
    with registry.client() as c:
        push_from_layout(lay, c, "src/shapes", "v1")
    out = str(tmp_path / "out")
    r = json.loads(run_cli("convert", "--oci-ref", f"{registry.host}/src/shapes:v1",
                           f"{registry.host}/idx/shapes:v1", "--insecure", "--zran-span",
                           "64K", "--chunk-size", hex(CHUNK), "-o", out, "--json").stdout)
    assert all(x["contexts"] >= 1 for x in r["layers"]), r["layers"]
    ref = reference_rootfs(_tar_files(tmp_path, tars), str(tmp_path / "ref"))
    # locally: the reader's decoder (check inflates and verifies every chunk)
    for d in m.layers():
        os.symlink(lay.blob_path(d.digest), os.path.join(out, d.digest.split(":")[1]))
    boot = os.path.join(out, "image.boot")
    c = run_cli("check", boot, "--blob-dir", out, check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    run_cli("unpack", boot, "--blob-dir", out, "-o", str(tmp_path / "up"))
    assert_same_tree(ref, str(tmp_path / "up"), check_nlink=True)
    # lazily: the daemon's C cold path, meta blobs and layers from the registry
    for x in r["layers"]:
        os.unlink(os.path.join(out, x["meta_blob"]))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(boot, mnt, f"registry:{registry.host}/idx/shapes:v1")
        assert_same_tree(ref, mnt, check_nlink=True)
    finally:
        d.cleanup()


@pytest.mark.parametrize("how", ["crc", "isize", "garbage", "zeros-then-garbage",
                                 "truncated-member"])
def test_broken_gzip_is_refused_and_dst_stays_empty(tmp_path, how):
    tars, gzs = _layers()
    g = bytearray(_member(tars[1]))
    if how == "crc":
        g[-8] ^= 1
    elif how == "isize":
        g[-1] ^= 1
    elif how == "garbage":
        g += b"trailing"
    elif how == "zeros-then-garbage":
        g += bytes(100) + b"\x01"
    else:
        g += _member(b"next")[:6]
    lay, m = _layout(str(tmp_path / "src"), tars[:2], [gzs[0], bytes(g)])
    p = run_cli("convert", "--oci-ref", f"oci:{tmp_path / 'src'}:v1",
                f"oci:{tmp_path / 'dst'}:z", "--zran-span", "64K", check=False)
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 1 and last.startswith(b"error: ") and b"gzip" in last, p.stderr
    idx = tmp_path / "dst" / "index.json"
    assert not idx.exists() or json.loads(idx.read_text())["manifests"] == []
