"""validate_rafs_bootstrap(): every structural rule nydusd enforces (rafs-v6.md §2-§9).

Used by the pack tests on every bootstrap they build; tested here against the Nydus
vector (which must pass) and against mutations of it (which must fail).
"""
import os
import re
import stat

import pytest
from helpers import NYDUS_VECTORS

from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R

VEC_BOOT = str(NYDUS_VECTORS / "rafs-v6-2.2.boot")


class RafsInvalid(AssertionError):
    pass


def _check(cond, msg):
    if not cond:
        raise RafsInvalid(msg)


def _is_pow2(x):
    return x > 0 and not x & (x - 1)


def validate_rafs_bootstrap(path_or_bytes, blob_sizes=None):
    """Raise RafsInvalid unless the bootstrap follows the nydusd validation rules.

    Returns a summary dict (inodes walked, chunk indexes, blobs) for further checks.
    blob_sizes: optional {blob_id: file size} to check compressed sizes against.
    """
    buf = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else \
        open(path_or_bytes, "rb").read()
    size = len(buf)
    _check(size >= 4096 and size % 4096 == 0, f"bootstrap size {size} not a 4096 multiple")
    sb = E.SuperBlock.decode(buf, 1024)
    # §2 superblock
    _check(sb.magic == E.MAGIC, "magic")
    _check(sb.checksum == 0, "checksum must be 0")
    _check(sb.feature_compat & E.FEATURE_COMPAT_RAFS_V6, "RAFS_V6 compat bit")
    _check(not sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM, "SB_CHKSUM must be clear")
    _check(sb.blkszbits == 12, "blkszbits")
    _check(sb.sb_extslots == 0, "extslots")
    _check(sb.inos != 0, "inos")
    _check(sb.meta_blkaddr * 4096 <= size, "meta_blkaddr beyond bootstrap")
    _check(sb.xattr_blkaddr == 0, "xattr_blkaddr must be 0")
    _check(sb.feature_incompat == 0xC, f"feature_incompat {sb.feature_incompat:#x} != 0xc")
    _check(sb.u1 == 0, "u1")
    _check(sb.devt_slotoff * 128 == 1408, "devt_slotoff")
    _check(sb.dirblkbits == 0, "dirblkbits")
    _check(sb.root_nid != 0, "root nid 0")
    n = sb.extra_devices
    _check(n <= R.MAX_BLOBS, "too many blobs")
    if n == 0:
        _check(sb.blocks == 0, f"blocks {sb.blocks} without devices")
    # §3 ext superblock
    ext = R.ExtSuperBlock.decode(buf, 1152)
    fl = ext.s_flags
    comp_bits = [b for b in (R.FLAG_COMPRESSION_NONE, R.FLAG_COMPRESSION_LZ4,
                             R.FLAG_COMPRESSION_GZIP, R.FLAG_COMPRESSION_ZSTD) if fl & b]
    _check(len(comp_bits) == 1, f"flags {fl:#x}: exactly one compression")
    dig_bits = [b for b in (R.FLAG_DIGEST_BLAKE3, R.FLAG_DIGEST_SHA256) if fl & b]
    _check(len(dig_bits) == 1, f"flags {fl:#x}: exactly one digest")
    cs = ext.s_chunk_size
    _check(_is_pow2(cs) and R.CHUNK_SIZE_MIN <= cs <= R.CHUNK_SIZE_MAX, "chunk size")
    devt_end = 1408 + 128 * n
    tables = []
    bo, bs = ext.s_blob_table_offset, ext.s_blob_table_size
    _check(bo % 4096 == 0 and bo >= 4096 and bo >= devt_end, "blob table offset")
    _check(bs % 256 == 0 and bo + bs <= size, "blob table size")
    _check(bs // 256 == n, "blob table entries != extra_devices")
    tables.append((bo, bo + bs))
    co, csz = ext.s_chunk_table_offset, ext.s_chunk_table_size
    if csz:
        _check(co % 4096 == 0 and co >= 4096 and co >= devt_end, "chunk table offset")
        _check(csz % 80 == 0 and co + csz <= size, "chunk table size")
        tables.append((co, co + csz))
    po, ps = ext.s_prefetch_table_offset, ext.s_prefetch_table_size
    if ps and po:
        _check(po >= 4096 and po >= devt_end and ps % 4 == 0 and po + ps <= size,
               "prefetch table")
        tables.append((po, po + ps))
    tables.sort()
    for (_a0, a1), (b0, _b1) in zip(tables, tables[1:]):
        _check(a1 <= b0, "tables overlap")
    meta = sb.meta_blkaddr * 4096
    for a0, a1 in tables:
        _check(a1 <= meta or a0 >= meta, "table inside the meta area start")
    # §4 device table + §5 blob table
    blobs = []
    total_blocks = 0
    prev_end = None
    for i in range(n):
        d = E.DeviceSlot.decode(buf, 1408 + 128 * i)
        e = R.BlobEntry.decode(buf, bo + 256 * i)
        tag = d.tag
        _check(len(tag) == 64 and all(c in b"0123456789abcdef" for c in tag), "device tag")
        _check(d.blocks != 0, "device blocks 0")
        _check(buf[1408 + 128 * i + 72:1408 + 128 * (i + 1)] == bytes(56), "slot reserved")
        _check(e.blob_id == tag, "blob id != device tag")
        _check(e.blob_index == i, "blob_index != position")
        _check(e.chunk_size == cs, "blob chunk size != sb chunk size")
        _check(e.chunk_count <= 1 << 24, "chunk count")
        _check(e.compression_algo in R.COMPRESSOR_NAMES and e.digest_algo in R.DIGESTER_NAMES,
               "algorithms")
        _check(e.uncompressed_size <= 1 << 44 and e.compressed_size <= 1 << 40, "sizes")
        _check(e.features & R.BLOB_FEATURE_ALIGNED, "ALIGNED feature")
        _check(e.ci_compressed_size <= e.ci_uncompressed_size, "ci sizes")
        _check(e.ci_uncompressed_size == e.chunk_count * 16, "ci_uncompressed_size (CI v1)")
        _check(e.uncompressed_size == d.blocks * 4096, "device blocks != uncompressed size")
        if e.features & R.BLOB_FEATURE_HAS_TOC:
            _check(512 < e.blob_toc_size <= 4096 and e.blob_toc_size % 128 == 0, "toc size")
        if blob_sizes is not None:
            _check(blob_sizes[e.blob_id.decode()] == e.compressed_size, "blob file size")
        # mapped_blkaddr: 512 KiB-aligned after the bootstrap, ascending
        seg = R.BLOCK_SEG_ALIGNMENT // 4096
        _check(d.mapped_blkaddr % seg == 0, "mapped_blkaddr alignment")
        lo = (size // 4096) if prev_end is None else prev_end
        _check(d.mapped_blkaddr >= lo, "mapped_blkaddr order")
        prev_end = d.mapped_blkaddr + d.blocks
        total_blocks += d.blocks
        blobs.append(e)
    if n:
        _check(sb.blocks == total_blocks, f"sb blocks {sb.blocks} != sum {total_blocks}")
    # §9 chunk info table: sorted by (digest, blob_index + 1, index)
    cinfos = [R.ChunkInfo.decode(buf, co + 80 * k) for k in range(csz // 80)]
    keys = [(c.digest, c.blob_index + 1, c.index) for c in cinfos]
    _check(keys == sorted(keys), "chunk info table not sorted")
    for c in cinfos:
        _check(c.blob_index < n, "chunk info blob index")
        _check(c.index < blobs[c.blob_index].chunk_count, "chunk info index")
        _check(c.uncompressed_offset % 4096 == 0, "chunk info uoff alignment")
        _check((c.flags & R.CHUNK_FLAG_COMPRESSED) == (
            R.CHUNK_FLAG_COMPRESSED if c.compressed_size != c.uncompressed_size else 0),
            "chunk info compressed flag")
    cinfo_by_loc = {(c.blob_index, c.index): c for c in cinfos}
    # §7/§8 inodes (walk from the root)
    stats = {"inodes": 0, "chunks": 0, "regular": 0, "blobs": n}
    paths = {}
    seen = {}
    chunkbits_sb = cs.bit_length() - 1

    def inode(nid):
        _check(nid > 0, "nid 0")
        off = meta + 32 * nid
        _check(off + 32 <= size, f"nid {nid} beyond bootstrap")
        fmt = int.from_bytes(buf[off:off + 2], "little")
        _check(fmt & ~0xF == 0, f"nid {nid}: i_format {fmt:#x}")
        ext_ = fmt & 1
        ino = (E.ExtendedInode if ext_ else E.CompactInode).decode(buf, off)
        if ext_:
            _check(ino.i_nb == 0, f"nid {nid}: i_nb")
        _check(ino.i_nlink != 0, f"nid {nid}: nlink 0")
        layout = E.i_format_layout(fmt)
        _check(layout in (0, 2, 4), f"nid {nid}: layout {layout}")
        base = off + (64 if ext_ else 32) + E.xattr_ibody_size(ino.i_xattr_icount)
        _check(ino.i_xattr_icount != 1, f"nid {nid}: icount 1")
        if ino.i_xattr_icount:
            h = E.XattrIbodyHeader.decode(buf, off + (64 if ext_ else 32))
            _check(h.h_shared_count == 0, f"nid {nid}: shared xattrs")
        return off, ino, layout, base

    def data_of(nid, ino, layout, base):
        size_ = ino.i_size
        if layout == 2:
            full = size_ // 4096
            out = b""
            if full:
                out = buf[ino.i_u * 4096: ino.i_u * 4096 + full * 4096]
            tail = size_ - full * 4096
            _check(base % 4096 + tail <= 4096, f"nid {nid}: inline tail crosses a block")
            return out + buf[base:base + tail]
        if layout == 0:
            _check(ino.i_u * 4096 + size_ <= size, f"nid {nid}: flat data beyond bootstrap")
            return buf[ino.i_u * 4096:ino.i_u * 4096 + size_]
        raise RafsInvalid(f"nid {nid}: non-file with chunk layout")

    stack = [(sb.root_nid, sb.root_nid, b"/")]
    while stack:
        nid, parent, name = stack.pop()
        paths[name] = nid
        if nid in seen:
            continue
        off, ino, layout, base = inode(nid)
        seen[nid] = name
        stats["inodes"] += 1
        mode = ino.i_mode
        if stat.S_ISREG(mode):
            stats["regular"] += 1
            _check(layout == 4, f"{name}: regular file not chunk-based")
            cf = ino.i_u & 0xFFFF
            _check(cf & 0x20 and cf & ~0x3F == 0, f"{name}: chunk format {cf:#x}")
            cbits = 12 + (cf & 0x1F)
            cnt = (ino.i_size + (1 << cbits) - 1) >> cbits
            if cbits != chunkbits_sb:
                # big-chunk trick only: all chunks in one blob, contiguous
                cnt_fs = (ino.i_size + cs - 1) // cs
                cnt = cnt_fs
            start = (base + 7) // 8 * 8
            _check(start + 8 * cnt <= size, f"{name}: chunk indexes beyond bootstrap")
            for k in range(cnt):
                e = buf[start + 8 * k:start + 8 * k + 8]
                lo = int.from_bytes(e[0:2], "little")
                dev = int.from_bytes(e[2:4], "little")
                blk = int.from_bytes(e[4:8], "little")
                _check(1 <= (dev & 0xFF) <= n, f"{name}: chunk {k} device {dev:#x}")
                bi = (dev & 0xFF) - 1
                ci = lo | ((dev >> 8) << 16)
                _check(ci < blobs[bi].chunk_count, f"{name}: chunk {k} index {ci}")
                c = cinfo_by_loc.get((bi, ci))
                _check(c is not None, f"{name}: chunk {k} missing from the chunk info table")
                _check(c.uncompressed_offset == blk * 4096, f"{name}: chunk {k} blkaddr")
                length = min(cs, ino.i_size - k * cs)
                _check(c.uncompressed_size == length, f"{name}: chunk {k} size")
                _check((blk * 4096 + length) <= blobs[bi].uncompressed_size,
                       f"{name}: chunk {k} beyond blob")
                stats["chunks"] += 1
        elif stat.S_ISLNK(mode):
            _check(ino.i_size > 0, f"{name}: empty symlink")
            data_of(nid, ino, layout, base)
        elif stat.S_ISDIR(mode):
            data = data_of(nid, ino, layout, base)
            names = []
            for blk0 in range(0, len(data), 4096):
                block = data[blk0:blk0 + 4096]
                first = E.Dirent.decode(block, 0)
                cnt = first.nameoff // 12
                _check(12 <= first.nameoff < 4096 and first.nameoff % 12 == 0,
                       f"{name}: nameoff0")
                des = [E.Dirent.decode(block, 12 * i) for i in range(cnt)]
                for i, de in enumerate(des):
                    end = des[i + 1].nameoff if i + 1 < cnt else len(block)
                    nm = bytes(block[de.nameoff:end])
                    if i + 1 == cnt:
                        nm = nm.split(b"\0", 1)[0]
                    _check(0 < len(nm) <= 255, f"{name}: dirent name length")
                    names.append((nm, de))
            nms = [x[0] for x in names]
            _check(nms == sorted(nms), f"{name}: dirents not sorted")
            _check(b"." in nms and b".." in nms, f"{name}: missing . or ..")
            for nm, de in names:
                if nm == b".":
                    _check(de.nid == nid, f"{name}: '.' nid")
                    continue
                if nm == b"..":
                    _check(de.nid == parent, f"{name}: '..' nid")
                    continue
                _check(de.file_type != E.FT_UNKNOWN, f"{name}: dirent type")
                stack.append((de.nid, nid, name.rstrip(b"/") + b"/" + nm))
        else:
            _check(layout in (0, 2) and ino.i_size == 0, f"{name}: special file size")
    _check(stats["inodes"] == sb.inos, f"inos {sb.inos} != reachable {stats['inodes']}")
    stats["paths"] = paths
    return stats


def test_vector_is_valid():
    assert os.path.exists(VEC_BOOT), f"test vector missing: {VEC_BOOT}"
    s = validate_rafs_bootstrap(VEC_BOOT)
    paths = s.pop("paths")
    assert s == {"inodes": 3, "chunks": 2, "regular": 2, "blobs": 1}
    assert sorted(paths) == [b"/", b"/lib.rs", b"/sync_io.rs"] and paths[b"/"] == 128


@pytest.mark.parametrize("off,val,what", [
    (1024 + 4, b"\1\0\0\0", "checksum"),
    (1024 + 0x50, b"\x0e\0\0\0", "feature_incompat"),
    (1024 + 0x2C, b"\1\0\0\0", "xattr_blkaddr"),
    (1024 + 0x58, b"\x0a\0", "devt_slotoff"),
    (1152 + 20, b"\0\x30\0\0", "chunk size"),
    (1152 + 0, b"\x14\x01\0\0", "compression"),      # drop the ZSTD bit -> none set
    (4096 + 64, b"\1\0\0\0", "blob_index"),
    (4096 + 84, b"\x20\0\0\x70", "ALIGNED"),
    (1408 + 64, b"\0\0\0\0", "device blocks"),
])
def test_vector_mutations_fail(off, val, what):
    assert os.path.exists(VEC_BOOT), f"test vector missing: {VEC_BOOT}"
    buf = bytearray(open(VEC_BOOT, "rb").read())
    buf[off:off + len(val)] = val
    with pytest.raises(RafsInvalid, match=re.escape(what)):
        validate_rafs_bootstrap(bytes(buf))
