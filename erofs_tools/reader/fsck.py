"""Structural and data checks of an image (and its blobs): the library side of `check`."""
from __future__ import annotations

import os
import stat as _stat
from typing import NamedTuple

from erofs_tools.errors import CorruptImageError, ErofsToolsError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.reader.blob import decode_chunk, read_zran_chunk
from erofs_tools.reader.blobid import compute_blob_id, shown_id
from erofs_tools.reader.image import Image, _cstr
from erofs_tools.reader.zdata import ZChecker, is_compressed

# The kernel keeps inode times as a signed 64-bit count of seconds (timespec64), which
# is what an extended inode's 64-bit i_mtime is read into; ext4 holds up to 2446 and
# clamps beyond. So any mtime below 2^63 s is valid, year 2400 included.
MAX_MTIME = (1 << 63) - 1


class Problem(NamedTuple):
    path: str          # inode path, "superblock", "blob <id>", ...
    message: str

    def __str__(self):
        return f"{self.path}: {self.message}"


def _shown(path: bytes, limit: int = 300) -> str:
    """A path for a one-line report: its last `limit` bytes at most."""
    if len(path) > limit:
        path = b"..." + path[-limit:]
    return os.fsdecode(path)


def _msg(e, name):
    s = str(e)
    prefix = f"{name}: "
    return s[len(prefix):] if s.startswith(prefix) else s


def xattr_name_filter(img: Image, ino) -> int | None:
    """The inode's xattr name filter (h_name_filter), None without xattrs or without
    the feature (then every name may be there)."""
    if not ino.xattr_icount or not img.sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER:
        return None
    hdr = E.XattrIbodyHeader.decode(img.space_of(ino).read(ino.offset + ino.inode_size,
                                              E.XattrIbodyHeader.SIZE,
                                              f"inode {ino.nid} xattrs"), 0)
    return int(hdr.h_name_filter)


def filtered_out(img: Image, ino) -> list[bytes]:
    """The xattr names of `ino` that its name filter (FEATURE_COMPAT_XATTR_FILTER) rules
    out: none in a sound image. A name hashes as the kernel hashes a lookup: xxh32 of
    what follows its short prefix, seeded with the filter seed plus the prefix's index."""
    pairs = img.xattrs(ino)
    flt = xattr_name_filter(img, ino)
    if not flt or not pairs:
        return []
    from erofs_tools._native_sums import xxh32
    out = []
    for name, _ in pairs:
        index, rest = 0, name
        for i, prefix in E.XATTR_PREFIXES.items():
            if name.startswith(prefix):
                index, rest = i, name[len(prefix):]
                break
        if flt >> (xxh32(rest, E.XATTR_FILTER_SEED + index) % E.XATTR_FILTER_BITS) & 1:
            out.append(name)
    return out


def check_superblock(img: Image):
    out = []
    sb = img.sb
    add = lambda m: out.append(Problem("superblock", m))  # noqa: E731
    if b"\0" not in sb.volume_name:
        add("volume name has no NUL terminator")
    if img.size % img.blksz:
        add(f"image size {img.size} is not a multiple of the block size")
    if img.root_nid > 0xFFFF and not img.is_48bit:
        add("root nid does not fit 16 bits")
    for i, d in enumerate(img.devices):
        if d.blocks == 0 and img.is_rafs:
            add(f"device {i + 1}: 0 blocks")
        if img.is_rafs and len(_cstr(d.tag)) != R.BLOB_ID_LEN:
            add(f"device {i + 1}: tag is not a 64-character blob id")
    if not img.is_rafs:
        return out
    ext = img.rafs
    if sb.checksum:
        add("RAFS superblock checksum field must be 0")
    if sb.feature_incompat != (E.FEATURE_INCOMPAT_CHUNKED_FILE | E.FEATURE_INCOMPAT_DEVICE_TABLE):
        add(f"RAFS feature_incompat {sb.feature_incompat:#x} is not 0xc")
    if sb.xattr_blkaddr:
        add("RAFS xattr_blkaddr must be 0")
    if sb.extra_devices and sb.devt_slotoff != R.DEVT_SLOTOFF:
        add(f"RAFS devt_slotoff {sb.devt_slotoff} is not {R.DEVT_SLOTOFF}")
    if sb.inos == 0:
        add("inode count is 0")
    if len(img.blob_entries) != len(img.devices):
        add(f"{len(img.blob_entries)} blob table entries for {len(img.devices)} devices")
    comp_flags = ext.s_flags & (R.FLAG_COMPRESSION_NONE | R.FLAG_COMPRESSION_LZ4
                                | R.FLAG_COMPRESSION_GZIP | R.FLAG_COMPRESSION_ZSTD)
    if bin(comp_flags).count("1") != 1:
        add(f"RAFS flags {ext.s_flags:#x}: not exactly one compression flag")
    if bin(ext.s_flags & (R.FLAG_DIGEST_BLAKE3 | R.FLAG_DIGEST_SHA256)).count("1") != 1:
        add(f"RAFS flags {ext.s_flags:#x}: not exactly one digest flag")
    for i, b in enumerate(img.blob_entries):
        bid = shown_id(b.blob_id)
        where = f"blob table[{i}]"
        if len(_cstr(b.blob_id)) != R.BLOB_ID_LEN:
            out.append(Problem(where, "blob id is not 64 characters"))
        if i < len(img.devices) and _cstr(img.devices[i].tag) != _cstr(b.blob_id):
            out.append(Problem(where, f"blob id {bid} differs from device tag"))
        if b.blob_index != i:
            out.append(Problem(where, f"blob_index {b.blob_index} is not its position"))
        if b.chunk_size != ext.s_chunk_size:
            out.append(Problem(where, f"chunk size {b.chunk_size:#x} differs from the superblock's"))
        if b.chunk_count > R.MAX_CHUNKS_PER_BLOB:
            out.append(Problem(where, f"chunk count {b.chunk_count} too large"))
        if b.compression_algo not in R.COMPRESSOR_NAMES or b.digest_algo not in R.DIGESTER_NAMES:
            out.append(Problem(where, "unknown compression or digest algorithm"))
        if not b.features & R.BLOB_FEATURE_ALIGNED:
            out.append(Problem(where, "ALIGNED feature missing"))
        if b.ci_compressed_size > b.ci_uncompressed_size:
            out.append(Problem(where, "CI compressed size larger than uncompressed"))
        esz = R.CI_V2_SIZE if b.features & R.BLOB_FEATURE_CHUNK_INFO_V2 else R.CI_V1_SIZE
        if esz == R.CI_V1_SIZE and b.ci_uncompressed_size != b.chunk_count * esz:
            out.append(Problem(where, f"CI size {b.ci_uncompressed_size} != {b.chunk_count} x 16"))
        if b.uncompressed_size % 4096 or b.uncompressed_size > 1 << 44 or b.compressed_size > 1 << 40:
            out.append(Problem(where, "bad blob sizes"))
        if i < len(img.devices) and img.devices[i].blocks * 4096 != b.uncompressed_size:
            out.append(Problem(where, "device blocks do not match the uncompressed blob size"))
    for k, ci in enumerate(img.chunk_infos):
        where = f"chunk info[{k}]"
        if ci.blob_index >= len(img.blob_entries):
            out.append(Problem(where, f"blob index {ci.blob_index} out of range"))
            continue
        b = img.blob_entries[ci.blob_index]
        if ci.index >= b.chunk_count:
            out.append(Problem(where, f"CI index {ci.index} beyond the blob's {b.chunk_count} chunks"))
        if ci.uncompressed_offset % 4096 or ci.uncompressed_offset + ci.uncompressed_size > b.uncompressed_size:
            out.append(Problem(where, "uncompressed range outside the blob"))
        if not 0 < ci.uncompressed_size <= ext.s_chunk_size:
            out.append(Problem(where, f"uncompressed size {ci.uncompressed_size} out of range"))
    return out


def _rafs_chunk_bits(img):
    return img.rafs.s_chunk_size.bit_length() - 1


def check_image(img: Image, blobs=None, verify_data=True):
    """Every problem found, as Problems. `blobs` (a BlobSource) enables data/digest checks
    of extra devices; without it only device-0 data and metadata are checked."""
    problems = check_superblock(img)
    name = img.name
    if blobs is not None:
        img.blobs = blobs
    links: dict[int, int] = {}          # nid -> dirent count
    subdirs = {}        # dir nid -> number of subdirectories
    # nids seen, not their paths: a tree 30,000 levels deep would hold 30,000 paths of
    # up to 60 KB each; a path is looked up again only for a problem found at the end
    first_path = set()
    ci_by_blob_off: dict[tuple[int, int], R.ChunkInfo] = {}
    for ci in img.chunk_infos:
        ci_by_blob_off.setdefault((ci.blob_index, ci.uncompressed_offset), ci)
    bad_chunks: dict[int, set[int]] = {}         # device -> set of corrupt CI indexes
    blob_problems = []
    if blobs is not None:
        blob_problems = check_blobs(img, blobs, bad_chunks)

    zc = ZChecker(img)

    def on_error(path, e):
        problems.append(Problem(_shown(path), _msg(e, name)))

    def add(path, m):
        problems.append(Problem(_shown(path), m))

    for path, de, ino in img.walk(on_error=on_error):
        nid = ino.nid
        links[nid] = links.get(nid, 0) + 1
        if nid in first_path:
            if ino.is_dir():
                add(path, "directory linked twice")
            continue
        first_path.add(nid)
        if de is not None:
            ft = E.file_type_of_mode(ino.mode)
            if de.file_type != ft:
                add(path, f"dirent file type {de.file_type} does not match mode {ino.mode:o}")
        if ino.mtime_nsec >= 10**9:
            add(path, f"mtime nanoseconds {ino.mtime_nsec} out of range")
        elif ino.mtime > MAX_MTIME:
            add(path, f"mtime {ino.mtime} beyond what the kernel can hold")
        if not ino.reserved_ok:
            add(path, "extended inode i_nb (reserved) is not 0")
        try:
            hidden = filtered_out(img, ino)
            if hidden:
                # the kernel would answer ENODATA for them: the xattr is lost
                add(path, f"xattr name filter hides {', '.join(map(repr, hidden))}")
        except CorruptImageError as e:
            add(path, _msg(e, name))
        try:
            if ino.is_dir():
                ents = img.dirents(ino)
                names = [d.name for d in ents]
                if names != sorted(names):
                    add(path, "wrong dirent name order")
                # (duplicate names: reported by img.walk, which skips such a directory)
                subdirs[nid] = 0
                for d in ents:
                    if d.name in (b".", b".."):
                        continue
                    if d.file_type == E.FT_DIR:
                        subdirs[nid] += 1
            elif ino.is_lnk():
                img.readlink(ino)
            elif ino.is_reg() and is_compressed(ino):
                zc.check_inode(ino, verify_data)
            elif ino.is_reg():
                _check_file(img, path, ino, verify_data, ci_by_blob_off, add, bad_chunks)
            else:
                if ino.size:
                    add(path, f"special file with size {ino.size}")
                if ino.ftype in (_stat.S_IFIFO, _stat.S_IFSOCK) and ino.i_u:
                    pass
        except ErofsToolsError as e:
            add(path, _msg(e, name))
    _check_packed(img, zc, verify_data, problems)
    # link counts
    wrong = {}
    for nid in first_path:
        try:
            ino = img.inode(nid)
        except CorruptImageError:
            continue
        if ino.is_dir():
            want = 2 + subdirs.get(nid, 0)
        else:
            want = links.get(nid, 0)
        if ino.nlink != want:
            wrong[nid] = f"nlink {ino.nlink}, expected {want}"
    if wrong:
        for path, _de, ino in img.walk(on_error=lambda p, e: None):
            m = wrong.pop(ino.nid, None)
            if m is not None:
                add(path, m)
            if not wrong:
                break
    problems.extend(blob_problems)
    return problems


def _check_packed(img, zc, verify_data, problems):
    """The packed inode (file tails of -Efragments images) is in no directory: check it
    on its own, and say when the decode budget stopped the data checks."""
    nid = img.sb.packed_nid
    if nid and img.sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS:
        try:
            ino = img.inode(nid)
            if not ino.is_reg():
                problems.append(Problem("packed inode", f"nid {nid} is not a regular file"))
            elif is_compressed(ino):
                zc.check_inode(ino, verify_data)
            else:
                for _ in img.map_data(ino):
                    pass
        except ErofsToolsError as e:
            problems.append(Problem("packed inode", _msg(e, img.name)))
    if zc.exhausted:
        problems.append(Problem("compressed data", "decodes to more than 4096 times the "
                                "image size; the rest was not verified"))


def _check_file(img, path, ino, verify_data, ci_by_blob_off, add, bad_chunks):
    found = [0]

    def note(p, m):
        """add, counted: a run of identical chunk references is checked once only
        while it is found sound."""
        found[0] += 1
        add(p, m)

    if ino.layout == E.LAYOUT_CHUNK_BASED:
        refs = img.chunks(ino)
        if img.is_rafs:
            bits = _rafs_chunk_bits(img)
            _fmt, kbits = img.chunk_format(ino)
            # the same granularity: one list (a sparse file may have millions)
            rrefs = img.chunks(ino, chunk_bits=bits) if kbits > bits else refs
            prev = None
            for c in rrefs:
                # a run of one chunk found sound (a hole's zero chunk) is checked once;
                # every reference of an unsound one is still reported
                same = (c.device, c.blkaddr, c.length, c.ci_index, c.hole)
                if same == prev:
                    continue
                mark = found[0]
                try:
                    if c.hole:
                        note(path, f"chunk {c.index}: hole in a RAFS image")
                        continue
                    if c.device == 0 or c.device > len(img.blob_entries):
                        note(path, f"chunk {c.index}: blob device {c.device} out of range")
                        continue
                    bi = c.device - 1
                    off = c.blkaddr * 4096
                    ci = ci_by_blob_off.get((bi, off))
                    meta = img.blob_meta(c.device)
                    if meta is not None:
                        bc = meta.chunk_at(off)
                        if bc is None:
                            note(path, f"chunk {c.index}: no chunk at offset {off} of blob {meta.blob_id}")
                            continue
                        if c.ci_index and bc.index != c.ci_index:
                            note(path, f"chunk {c.index}: index says CI entry {c.ci_index}, blob has {bc.index}")
                        if bc.uncompressed_size != c.length:
                            note(path, f"chunk {c.index}: blob chunk is {bc.uncompressed_size} bytes, file needs {c.length}")
                    elif img.chunk_infos:
                        if ci is None:
                            note(path, f"chunk {c.index}: blob {bi} offset {off} not in the chunk info table")
                        elif ci.uncompressed_size != c.length:
                            note(path, f"chunk {c.index}: chunk info says {ci.uncompressed_size} bytes, file needs {c.length}")
                        elif c.ci_index and ci.index != c.ci_index:
                            note(path, f"chunk {c.index}: CI index {c.ci_index} differs from the chunk info table's {ci.index}")
                finally:
                    prev = same if found[0] == mark else None
        # bounds of every mapped chunk; blob chunk digests are verified once per chunk
        # in check_blobs (reading each file would repeat that for every reference)
        bs = img.blksz
        prev = None
        for c in refs:
            if c.hole:
                continue
            same = (c.device, c.blkaddr, c.length)
            if same == prev:
                continue
            mark = found[0]
            if c.device == 0:
                if c.blkaddr * bs + c.length > img.size:
                    note(path, f"chunk {c.index}: block {c.blkaddr} outside the image")
            elif img.blobs is not None:
                try:
                    d = img.blobs.device(c.device)
                except ErofsToolsError:
                    continue        # reported once by check_blobs
                end = c.blkaddr * bs + c.length
                size = d.meta.uncompressed_size if d.meta is not None else d.size
                if end > size:
                    note(path, f"chunk {c.index}: [{c.blkaddr * bs}, {end}) outside device "
                              f"{c.device} ({size} bytes)")
                elif d.meta is not None:
                    for bc in d.meta.chunks_for_range(c.blkaddr * bs, c.length):
                        if bc.index in bad_chunks.get(c.device, ()):
                            note(path, f"chunk {c.index}: uses corrupt blob chunk {bc.index} "
                                      f"of blob {d.meta.blob_id}")
            prev = same if found[0] == mark else None
        return
    # flat layouts: the reader checks bounds and the inline tail without copying data
    for _ in img.map_data(ino):
        pass


def check_blobs(img, blobs, bad_chunks=None):
    """Decode and verify every chunk of every blob; check each blob id. Corrupt chunk
    indexes go to bad_chunks[device]."""
    out = []
    bad_chunks = bad_chunks if bad_chunks is not None else {}
    for dev in range(1, len(img.devices) + 1):
        tag = img.blob_id(dev)
        where = f"blob {tag}"
        try:
            d = blobs.device(dev)
        except ErofsToolsError as e:
            out.append(Problem(where, str(e)))
            continue
        meta = d.meta
        if meta is None:
            continue
        bad = 0
        for c in meta.chunks:
            try:
                if meta.zran is not None:
                    read_zran_chunk(meta, c, d.read_at, True)
                else:
                    raw = d.read_at(c.compressed_offset, c.compressed_size)
                    decode_chunk(meta, c, raw, True)
            except ErofsToolsError as e:
                out.append(Problem(where, f"chunk {c.index}: {str(e).split(': ', 2)[-1]}"))
                bad_chunks.setdefault(dev, set()).add(c.index)
                bad += 1
        expected = tag
        if dev in getattr(blobs, "blob_files", {}):
            # a blob given by path carries its own bootstrap, written with a placeholder
            # id: the blob is named by its real id, if at all
            base = os.path.basename(blobs.blob_files[dev])
            expected = base if len(base) == 64 and all(ch in "0123456789abcdef" for ch in base) \
                else None
        if img.is_rafs and expected and len(expected) == 64:
            size = os.fstat(d.f.fileno()).st_size
            got = compute_blob_id(d.read_at, size, meta.digest_region)
            if got != expected:
                # Registry pipelines (convert, nydusify) rename blobs to their OCI layer
                # digest: the sha256 of the whole file, digest array included.
                got = compute_blob_id(d.read_at, size)
            if got != expected:
                out.append(Problem(where, f"content does not match the blob id (sha256 {got})"
                                   + ("" if bad else "; no chunk fails to decode, so the change "
                                      "is in bytes that do not alter chunk data")))
    return out
