"""Per-image and cross-image figures: files, chunks, dedup and compression."""
from __future__ import annotations

import hashlib

from erofs_tools.errors import ErofsToolsError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import round_up
from erofs_tools.reader.blobid import shown_id
from erofs_tools.reader.image import Image, _cstr
from erofs_tools.reader.zdata import is_compressed, state
from erofs_tools.reader.zmap import ALG_NAMES, FRAGMENT


def image_stats(img: Image):
    """Figures for one image, plus {digest: uncompressed size} of its stored chunks
    (returned separately as the second value, for cross-image sharing)."""
    files = dirs = symlinks = other = entries = 0
    seen = set()
    logical = 0
    flat_bytes = 0
    chunk_refs = 0
    holes = 0
    hole_bytes = 0
    unique = {}            # key -> dict(size, csize, digest)
    ci_by_off: dict[tuple[int, int], R.ChunkInfo] = {}
    for ci in img.chunk_infos:
        ci_by_off.setdefault((ci.blob_index, ci.uncompressed_offset), ci)
    rafs_bits = img.rafs.s_chunk_size.bit_length() - 1 if img.is_rafs else None
    metas = {}
    hash_budget = [(256 << 20) + 4 * img.size]
    zfiles = zbytes = 0
    zalg: dict[str, dict[str, int]] = {}
    zseen: set[tuple[int, int]] = set()

    def meta_of(dev):
        if dev not in metas:
            metas[dev] = img.blob_meta(dev)
        return metas[dev]

    for _path, _de, ino in img.walk():
        entries += 1
        if ino.nid in seen:
            continue
        seen.add(ino.nid)
        if ino.is_dir():
            dirs += 1
            continue
        if ino.is_lnk():
            symlinks += 1
            continue
        if not ino.is_reg():
            other += 1
            continue
        files += 1
        logical += ino.size
        if is_compressed(ino):
            zfiles += 1
            zbytes += ino.size
            _add_compressed(img, ino, zalg, zseen)
            continue
        if ino.layout != E.LAYOUT_CHUNK_BASED:
            flat_bytes += ino.size
            continue
        if img.is_rafs:
            _fmt, kbits = img.chunk_format(ino)
            refs = img.chunks(ino, chunk_bits=rafs_bits) if kbits >= rafs_bits else img.chunks(ino)
        else:
            refs = img.chunks(ino)
        for c in refs:
            if c.hole:
                holes += 1
                hole_bytes += c.length
                continue
            chunk_refs += 1
            key = (c.device, c.blkaddr)
            if key in unique:
                continue
            info = {"size": c.length, "csize": None, "digest": None}
            if c.device and img.is_rafs:
                m = meta_of(c.device)
                bc = m.chunk_at(c.blkaddr * 4096) if m is not None else None
                if bc is not None and m.zran is None:
                    info.update(size=bc.uncompressed_size, csize=bc.compressed_size,
                                digest=bc.digest)
                else:
                    # (zran: the chunk map's compressed range is the access point's span;
                    # the chunk table has the chunk's own part of the layer)
                    ci = ci_by_off.get((c.device - 1, c.blkaddr * 4096))
                    if ci is not None:
                        info.update(size=ci.uncompressed_size, csize=ci.compressed_size,
                                    digest=ci.digest)
                        if m is not None and m.zran is not None:
                            # zran: chunks' input ranges overlap; counted as a union
                            info.update(csize=0, crange=(c.device, ci.compressed_offset,
                                                         ci.compressed_offset
                                                         + ci.compressed_size))
            else:
                info["csize"] = c.length
                hash_budget[0] -= c.length
                try:
                    if hash_budget[0] < 0:
                        data = None     # overlapping chunks of a crafted image: stop hashing
                    elif c.device == 0:
                        data = img.read(c.blkaddr * img.blksz, c.length, "chunk")
                    elif img.blobs is not None:
                        data = img.blobs.read(img, c.device, c.blkaddr * img.blksz, c.length)
                    else:
                        data = None
                except ErofsToolsError:
                    data = None
                if data is not None:
                    info["digest"] = hashlib.sha256(data).digest()
            unique[key] = info
    packed = img.sb.packed_nid if img.sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS else 0
    if packed:
        try:
            pino = img.inode(packed)
            if is_compressed(pino):
                _add_compressed(img, pino, zalg, zseen)
        except ErofsToolsError:
            pass
    zstored = sum(a["bytes_stored"] for a in zalg.values())
    after_dedup = flat_bytes + zbytes + sum(u["size"] for u in unique.values())
    csizes = [u["csize"] for u in unique.values()]
    after_comp = flat_bytes + zstored + sum(csizes) if all(x is not None for x in csizes) \
        else None
    if after_comp is not None:
        after_comp += _union_bytes([u["crange"] for u in unique.values() if "crange" in u])
    stored_blocks = sum(round_up(u["size"], img.blksz) for u in unique.values())
    d = {
        "image": img.name, "kind": "rafs-v6" if img.is_rafs else "erofs",
        "entries": entries, "files": files, "directories": dirs, "symlinks": symlinks,
        "other": other, "hardlinks": entries - len(seen),
        "chunks": chunk_refs, "unique_chunks": len(unique), "holes": holes,
        "bytes_logical": logical, "bytes_holes": hole_bytes,
        "bytes_flat": flat_bytes,
        "compressed_files": zfiles, "bytes_compressed_files": zbytes,
        "bytes_chunks_before_dedup": logical - flat_bytes - zbytes - hole_bytes,
        "bytes_after_dedup": after_dedup,
        "bytes_after_compression": after_comp,
        "bytes_chunk_blocks": stored_blocks,
        "image_bytes": img.size,
    }
    if zalg:
        # ratio: decoded / stored bytes (fragments are stored in the packed inode)
        d["compression"] = {k: {**a, "ratio": round(a["bytes_decoded"] / a["bytes_stored"], 3)
                                if a["bytes_stored"] else None}
                            for k, a in sorted(zalg.items())}
    if img.is_rafs:
        blobs = []
        for i, b in enumerate(img.blob_entries):
            bd = {"blob_id": shown_id(b.blob_id),
                  "chunk_count": b.chunk_count, "compressed_size": b.compressed_size,
                  "uncompressed_size": b.uncompressed_size}
            m = meta_of(i + 1)
            if m is not None and m.zran is not None:
                bd["zran_access_points"] = len(m.zran.contexts)
                bd["chunk_data_bytes"] = b.compressed_size      # the gzip layer
                bd["chunk_bytes_uncompressed"] = sum(c.uncompressed_size for c in m.chunks)
            elif m is not None:
                bd["chunk_data_bytes"] = sum(c.compressed_size for c in m.chunks)
                bd["chunk_bytes_uncompressed"] = sum(c.uncompressed_size for c in m.chunks)
            blobs.append(bd)
        d["blobs"] = blobs
    digests = {}
    for u in unique.values():
        if u["digest"] is not None:
            digests[u["digest"]] = u["size"]
    return d, digests


def _add_compressed(img, ino, zalg, zseen):
    """Per algorithm: extents, decoded bytes and stored bytes (each pcluster once: dedupe
    shares them; fragments are stored in the packed inode, counted there)."""
    try:
        exts = state(img).zmap(ino).extents
    except ErofsToolsError:
        return
    for x in exts:
        name = "fragment" if x.kind == FRAGMENT else ALG_NAMES.get(x.alg, str(x.alg))
        a = zalg.setdefault(name, {"extents": 0, "bytes_decoded": 0, "bytes_stored": 0})
        a["extents"] += 1
        a["bytes_decoded"] += x.llen
        if x.kind != FRAGMENT and (x.pa, x.plen) not in zseen:
            zseen.add((x.pa, x.plen))
            a["bytes_stored"] += x.plen


def multi_stats(imgs):
    """Per-image figures and the totals across the given images."""
    per = []
    all_digests = {}
    owners = {}
    unknown = 0
    for idx, img in enumerate(imgs):
        d, digests = image_stats(img)
        per.append(d)
        if len(digests) < d["unique_chunks"]:
            unknown += d["unique_chunks"] - len(digests)
        for dg, size in digests.items():
            all_digests[dg] = size
            owners.setdefault(dg, set()).add(idx)
    shared = {dg for dg, o in owners.items() if len(o) > 1}
    total = {
        "images": len(per),
        "files": sum(p["files"] for p in per),
        "chunks": sum(p["chunks"] for p in per),
        "unique_chunks_per_image_sum": sum(p["unique_chunks"] for p in per),
        "unique_chunks": len(all_digests) + unknown,
        "chunks_without_digest": unknown,
        "bytes_logical": sum(p["bytes_logical"] for p in per),
        "bytes_after_dedup_per_image_sum": sum(p["bytes_after_dedup"] for p in per),
        "bytes_after_dedup_across_images": sum(all_digests.values())
        + sum(p["bytes_flat"] + p["bytes_compressed_files"] for p in per),
        "shared_chunks": len(shared),
        "shared_bytes": sum(all_digests[dg] for dg in shared),
        "shared_chunk_owners": {dg.hex(): [per[i]["image"] for i in sorted(owners[dg])]
                                for dg in sorted(shared)[:1000]},
    }
    return {"images": per, "total": total}


def super_summary(img: Image) -> dict:
    """Superblock, device table and RAFS tables of `img` as JSON-ready values."""
    sb = img.sb
    d = {"image": img.name, "size": img.size, "kind": "rafs-v6" if img.is_rafs else "erofs",
         "block_size": img.blksz, "root_nid": img.root_nid, "inodes": sb.inos,
         "blocks": img.blocks, "meta_blkaddr": sb.meta_blkaddr,
         "xattr_blkaddr": sb.xattr_blkaddr, "build_time": img.build_time,
         "build_time_nsec": sb.build_time_nsec,
         **({"epoch": img.epoch, "layout_48bit": True} if img.is_48bit else {}),
         "feature_compat": f"{sb.feature_compat:#x}",
         "feature_incompat": f"{sb.feature_incompat:#x}",
         "checksum": f"{sb.checksum:#010x}", "uuid": sb.uuid.hex(),
         "volume_name": shown_id(_cstr(sb.volume_name).decode("utf-8", "replace")),
         "extra_devices": sb.extra_devices, "devt_slotoff": sb.devt_slotoff,
         "devices": [{"id": i + 1, "tag": shown_id(d.tag),
                      "blocks": d.blocks | d.blocks_hi << 32,
                      "mapped_blkaddr": d.mapped_blkaddr}
                     for i, d in enumerate(img.devices)]}
    if img.metabox is not None:
        # metadata compression: the metabox inode, its decoded size, the inodes in it
        mino = img.inode(img.metabox.nid)
        d["metabox"] = {"nid": img.metabox.nid, "layout": mino.layout_name,
                        "size": img.metabox.size}
    z = img.zconfig
    if z is not None and sb.feature_incompat & E.FEATURE_INCOMPAT_COMPRESSED:
        d["compression"] = {
            "algorithms": [ALG_NAMES[a] for a in range(4) if z.algs & (1 << a)],
            "zero_padding": z.zero_padding, "big_pclusters": z.big_pcluster,
            "ztailpacking": bool(sb.feature_incompat & E.FEATURE_INCOMPAT_ZTAILPACKING),
            "fragments_or_dedupe": bool(sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS),
            "packed_nid": sb.packed_nid}
    prefixes = img.long_xattr_prefixes()
    if prefixes:
        d["xattr_prefixes"] = [p.decode("utf-8", "backslashreplace") for p in prefixes]
        if sb.feature_compat & E.FEATURE_COMPAT_ISHARE_XATTRS:
            # the xattr whose value is each inode's content fingerprint
            d["ishare_xattr_prefix_id"] = sb.ishare_xattr_prefix_id
    if img.is_rafs:
        ext = img.rafs
        d["rafs"] = {"flags": f"{ext.s_flags:#x}", "chunk_size": ext.s_chunk_size,
                     "blob_table": [ext.s_blob_table_offset, ext.s_blob_table_size],
                     "chunk_table": [ext.s_chunk_table_offset, ext.s_chunk_table_size],
                     "prefetch_table": [ext.s_prefetch_table_offset,
                                        ext.s_prefetch_table_size],
                     "prefetch": img.prefetch.tolist(),
                     "chunk_infos": len(img.chunk_infos)}
        d["blobs"] = [{
            "index": i, "blob_id": shown_id(b.blob_id),
            "chunk_size": b.chunk_size, "chunk_count": b.chunk_count,
            "compressor": R.COMPRESSOR_NAMES.get(b.compression_algo, b.compression_algo),
            "digester": R.DIGESTER_NAMES.get(b.digest_algo, b.digest_algo),
            "features": f"{b.features:#x}", "compressed_size": b.compressed_size,
            "uncompressed_size": b.uncompressed_size, "ci_offset": b.ci_offset,
            "ci_compressed_size": b.ci_compressed_size,
            "ci_uncompressed_size": b.ci_uncompressed_size,
            "blob_toc_size": b.blob_toc_size} for i, b in enumerate(img.blob_entries)]
    return d


def _union_bytes(ranges: list[tuple[int, int, int]]) -> int:
    """Bytes covered by (device, start, end) ranges, overlaps counted once."""
    total, cur = 0, None
    for dev, a, b in sorted(ranges):
        if cur is not None and cur[0] == dev and a <= cur[2]:
            cur = (dev, cur[1], max(cur[2], b))
            continue
        if cur is not None:
            total += cur[2] - cur[1]
        cur = (dev, a, b)
    if cur is not None:
        total += cur[2] - cur[1]
    return total
