"""`erofs-tools pack`: a Nydus RAFS v6 bootstrap plus one data blob from a directory.

Steps:
1. Walk SOURCE with the mkfs directory walker into the C node-graph builder; regular
   files are handed to the chunker (path, size, sparse) instead of being given file
   data. Without a prefetch list the walk is the C one (csrc/walk.c, listing the regular
   files it meets), runs on its own thread and the chunker takes
   each file as the walk meets it (each directory's entries in name order, so the order
   is the same on every filesystem); with one, the walk ends first and the prefetch
   files go first, then the rest by path.
2. Chunk, hash and compress every regular file (chunker.ChunkPipeline, parallel, in
   that deterministic order) and append the distinct chunks that no chunk dict holds to
   a new blob (blob.BlobWriter).
3. Blob list: the chunk-dict blobs that are actually referenced (in dict order) first,
   then the new blob. Every regular file becomes CHUNK_BASED with 8-byte indexes
   (advise = CI index bits 0-15, device_id = blob index + 1 | CI index bits 16-23 << 8,
   blkaddr = uncompressed offset / 4096).
4. Bootstrap map (rafs-v6.md §1): ext superblock at 1152, device table at slot 11, blob
   table at round_up(1408 + 128 N, 4096), prefetch table right after it, meta_blkaddr
   after the tables with the root at nid 128, inodes laid out by the C core, then the
   chunk info table at a 4 KiB-aligned offset after everything the C core wrote.

Some of the bootstrap depends on the layout (the chunk info table appended after
everything the C core wrote, its offset in the ext superblock, the prefetch nids, the
device slots' mapped_blkaddr which follows the final bootstrap size, sb.blocks = sum of
the blob blocks, 0 without blobs): the C core takes them after layout and before
writing (put_bytes after layout, set_device, set_sb_blocks).
"""
from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from erofs_tools._native import BuildOptions, NativeBuilder
from erofs_tools._native_put import put_buffer, reserve_bytes, start_writeback
from erofs_tools.builder.blob import BLKSZ, BlobWriter
from erofs_tools.builder.chunk_dict import ChunkDict
from erofs_tools.builder.chunk_refs import ChunkRefs
from erofs_tools.builder.chunker import (
    COMPRESSORS,
    DIGESTERS,
    ChunkKey,
    ChunkPipeline,
    ChunkResult,
    FileItem,
    check_chunk_size,
)
from erofs_tools.builder.mkfs import check_paths
from erofs_tools.builder.node_chunks import NodeChunks, chunk_info_table, runs, set_chunk_indexes
from erofs_tools.builder.options import MkfsOptions, Progress
from erofs_tools.builder.rafs_walk import (
    BootstrapNodes,
    RafsWalker,
    WalkFeed,
    normalize_prefetch,
    prefetch_order,
)
from erofs_tools.builder.workpool import Started
from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import atomic_output, round_up

if TYPE_CHECKING:
    from _typeshed import StrPath

    from erofs_tools.reader.bootstrap import BlobInfo

ROOT_NID = R.ROOT_NID


@dataclass
class PackOptions:
    chunk_size: int = R.CHUNK_SIZE_DEFAULT
    digester: str = "blake3"
    compressor: str = "zstd"
    chunk_dicts: list[str] = field(default_factory=list)     # bootstrap paths
    prefetch: list[str | bytes] | None = None                 # image paths ("/a/b")
    timestamp: int | None = None                         # -T: every mtime + build time
    workers: int | None = None

    def check(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.digester not in DIGESTERS:
            raise InputError(f"unknown digester {self.digester!r} (choose blake3 or sha256)")
        if self.compressor not in COMPRESSORS:
            raise InputError(f"unknown compressor {self.compressor!r} "
                             "(choose zstd, lz4_block or none)")


@dataclass
class TreeInfo:
    """What write_bootstrap needs to know of a tree source besides its node graph."""
    regular: Collection[int]     # node ids of regular files (their chunk indexes)
    has_xattrs: bool


def bootstrap_nodes(max_blobs: int, nprefetch: int, build_time: int | None,
                    force_extended: bool = False) -> BootstrapNodes:
    """A node graph for a bootstrap that will list at most `max_blobs` blobs and
    `nprefetch` prefetch entries (their tables sit below the inodes, so they are
    reserved first). force_extended: every inode extended (full mtimes; tar sources and
    merge, whose trees have no common mtime)."""
    _, _, meta_addr = layout_constants(max_blobs, nprefetch)
    return BootstrapNodes(BuildOptions(
        meta_blkaddr=meta_addr // BLKSZ, first_nid=ROOT_NID,
        feature_compat=E.FEATURE_COMPAT_RAFS_V6,
        feature_incompat=E.FEATURE_INCOMPAT_CHUNKED_FILE | E.FEATURE_INCOMPAT_DEVICE_TABLE,
        sb_checksum=False, shared_xattrs=False, inline_data=True,
        force_extended=force_extended, build_time=build_time, build_time_nsec=0,
        uuid=bytes(16), devt_slotoff=R.DEVT_SLOTOFF))


class PackResult(dict[str, Any]):
    """pack's summary (what --json prints)."""


def pack(source: StrPath, bootstrap: StrPath, blob_dir: StrPath,
         opts: PackOptions | None = None, progress: Progress | None = None) -> PackResult:
    """Build BOOTSTRAP and one blob in BLOB_DIR from directory SOURCE; -> summary dict.

    Nothing is left behind on error: blob and bootstrap are written under temporary
    names and renamed only when both are complete.
    """
    # The pack allocates a few objects per entry and per chunk and frees nothing until
    # the end; the cyclic GC would only rescan them (measured 5-8 % of the CPU time).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _pack(os.fspath(source), os.fspath(bootstrap), os.fspath(blob_dir), opts,
                     progress)
    finally:
        if was_enabled:
            gc.enable()


class ChunkPlacer:
    """Where the chunks of one pack run go (directory walk, tar stream): the new blob's
    writer, chunks stored already, the chunk dicts, each file's chunks, the counters."""

    def __init__(self, opts: PackOptions, blob_dir: str, cdict: ChunkDict) -> None:
        self.cdict = cdict
        self.refs = ChunkRefs()          # the new blob's chunks, each file's chunks
        self.stats = {"chunks_total": 0, "chunks_new": 0, "chunks_dedup": 0,
                      "chunks_dict": 0, "bytes_total": 0, "bytes_new": 0, "bytes_dict": 0,
                      "bytes_dedup": 0}
        self.pipe = ChunkPipeline(opts.chunk_size, opts.digester, opts.compressor,
                                  workers=opts.workers, known=self.known,
                                  known_many=self.known_many)
        # last: the blob's temporary file is the one thing the caller must abort()
        # placeholder blob index, remapped at write; the chunk digests are the ones
        # self.refs keeps of the new chunks, in CI order (place() records each chunk the
        # writer appends)
        self.writer = BlobWriter(blob_dir, opts.chunk_size, opts.compressor, opts.digester,
                                 blob_index=-1, digests=self.refs.new.digests)

    def known(self, key: ChunkKey) -> bool:
        """Stored already: the pipeline need not compress it again."""
        # refs.find_new and DigestTable.get inlined (a chunk worker asks this once per
        # chunk, GIL held; slots and mask read in one statement: the consumer's _grow
        # replaces both between two of its own statements, never inside this one)
        refs = self.refs
        table = refs.new
        digest = key[0]
        slots, mask, digests = table._slots, table._mask, table.digests
        h = hash(digest) & mask
        while (i := slots[h]) >= 0:
            if digests[i * 32:i * 32 + 32] == digest:
                if refs.usize[i] == key[1]:
                    return True
                break
            h = (h + 1) & mask
        if refs.other and key in refs.other:
            return True
        return key in self.cdict.chunks if self.cdict.chunks else False

    def known_many(self, digests: Sequence[bytes | None], sizes: Sequence[int]
                   ) -> list[bool]:
        """known() of each (digest, size) of a batch (None: a hole, False), the
        table read once: a snapshot of it may miss a chunk stored meanwhile (compressed
        again, the consumer finds it stored), never find one that is not."""
        refs = self.refs
        table = refs.new
        slots, mask, digs = table._slots, table._mask, table.digests
        usize, other, dchunks = refs.usize, refs.other, self.cdict.chunks
        out: list[bool] = []
        for digest, size in zip(digests, sizes):
            found = False
            if digest is not None:
                h = hash(digest) & mask
                while (i := slots[h]) >= 0:
                    if digs[i * 32:i * 32 + 32] == digest:
                        found = usize[i] == size
                        break
                    h = (h + 1) & mask
                if not found and (other or dchunks):
                    key = (digest, size)
                    found = key in other or key in dchunks
            out.append(found)
        return out

    def place(self, r: ChunkResult) -> None:
        """Where chunk result `r` lives: a chunk this image already stored, one of a chunk
        dict, or a new one appended to the blob; appended to its file's chunks and
        counted. `r.repeat` > 1 (the rest of a hole run) counts the repeats as dedups of
        the first. Once per chunk with the GIL held: the common cases first, with as few
        lookups and calls as they need."""
        st = self.stats
        refs = self.refs
        size = r.size
        digest = r.digest
        st["chunks_total"] += 1
        st["bytes_total"] += size
        # refs.find_new inlined: one table lookup, whose answer add_new reuses
        ref = refs.new.get(digest)
        absent = ref is None
        if ref is not None and refs.usize[ref] != size:
            ref = None
        if ref is None and refs.other:
            ref = refs.other.get((digest, size))
        if ref is not None:
            st["chunks_dedup"] += 1
            st["bytes_dedup"] += size
            if r.claim is not None:
                # claimed again by a worker that checked `known` just before the first
                # copy was stored: its bytes are never taken, and the claim would keep
                # them (with "none", its batch's whole buffer) until the end
                self.pipe.release((digest, size))
        else:
            key = (digest, size)
            sc = self.cdict.chunks.get(key) if self.cdict.chunks else None
            if sc is not None:
                st["chunks_dict"] += 1
                st["bytes_dict"] += size
                # met again and again: the first use's offset wins
                ref = refs.dict_ref(sc, r.file_offset)
            else:
                stored = r.stored_bytes()
                index, coff, uoff = self.writer.append_chunk(stored, size, digest)
                ref = refs.add_new(digest, size, index, coff, len(stored), uoff, absent)
                # stored now answers `known`: the pipeline's claim is no longer needed
                self.pipe.release(key)
                st["chunks_new"] += 1
                st["bytes_new"] += size
                if r.file_offset:       # its first use; absent means 0
                    refs.file_off[ref] = r.file_offset
        if r.repeat > 1:
            more = r.repeat - 1
            st["chunks_total"] += more
            st["chunks_dedup"] += more
            st["bytes_total"] += more * size
            st["bytes_dedup"] += more * size
        refs.append(r.file_key, ref, r.repeat)

    def place_batch(self, results: list[ChunkResult]) -> int:
        """place() each of `results` (a batch) in order; -> the bytes they cover. Without
        chunk dicts one loop, lookups inlined, the new chunks to the writer in one call:
        per-chunk Python held the GIL the workers and the walk wait for."""
        if self.cdict.chunks:
            nbytes = 0
            for r in results:
                self.place(r)
                nbytes += r.size * r.repeat
            return nbytes
        refs = self.refs
        table = refs.new
        usize, other, file_off = refs.usize, refs.other, refs.file_off
        files, nrefs, rrefs = refs.files, refs.nrefs, refs.refs
        # ChunkPipeline.release inlined
        release = self.pipe._claims.pop
        digests = table.digests
        slots, mask = table._slots, table._mask
        index = self.writer.count
        new_stored: list[bytes | memoryview] = []
        new_sizes: list[int] = []
        total = dedup = dedup_bytes = new_bytes = 0
        n_total = len(results)
        # no compression: new chunks back to back in the batch's read buffer go to the
        # writer as one uncopied piece of it; `pos`: where the next read chunk starts
        rbuf: memoryview | None = getattr(results, "buf", None)
        raw = rbuf is not None
        rbuf = rbuf if rbuf is not None else memoryview(b"")
        pos = 0
        run_start = run_end = -1
        # compressed: the run of stored chunks being gathered (its buffer, start, end)
        # and each new chunk's stored size
        zbase: memoryview | None = None
        zstart = zend = 0
        new_csizes: list[int] = []
        for r in results:
            size = r.size
            digest = r.digest
            total += size
            at = -1
            if raw and type(r.data) is memoryview:      # read: not a hole
                at = pos
                pos += size
            # DigestTable.get, inlined
            h = hash(digest) & mask
            while True:
                ref = slots[h]
                if ref < 0 or digests[ref * 32:ref * 32 + 32] == digest:
                    break
                h = (h + 1) & mask
            absent = ref < 0
            if not absent and usize[ref] != size:
                ref = -1
            if ref < 0 and other:
                ref = other.get((digest, size), -1)
            if ref >= 0:
                dedup += 1
                dedup_bytes += size
                if r.claim is not None:
                    # claimed again by a worker that checked `known` just before the
                    # first copy was stored (see place)
                    release((digest, size), None)
            else:
                if at >= 0:
                    if at != run_end:
                        if run_end > run_start:
                            new_stored.append(rbuf[run_start:run_end])
                        run_start = at
                    run_end = at + size
                elif raw:
                    if run_end > run_start:
                        new_stored.append(rbuf[run_start:run_end])
                        run_start = run_end = -1
                    new_stored.append(r.stored_bytes())
                else:
                    # compressed: chunks back to back in their batch's stored buffer
                    # (the claim's base) make one run, one piece for the writer
                    c = r.claim
                    if c is not None and c.data is not None and not c.taken:
                        # ChunkResult.stored_bytes inlined: its batch is done
                        data, c.data, c.taken = c.data, None, True
                    else:
                        data = r.stored_bytes()
                    n = len(data)
                    new_csizes.append(n)
                    zb = c.base if c is not None else None
                    zoff = c.off if c is not None else 0
                    if zb is not None and zb is zbase and zoff == zend:
                        zend += n
                    else:
                        if zbase is not None:
                            new_stored.append(zbase[zstart:zend])
                        if zb is not None:
                            zbase, zstart, zend = zb, zoff, zoff + n
                        else:
                            zbase = None
                            new_stored.append(data)
                    del data
                ref = index
                index += 1
                # ChunkRefs.add_new without the offsets (append_chunks below adds
                # them); the size first: a worker's `known` may find the digest at once
                usize.append(size)
                if absent:
                    digests += digest
                    slots[h] = ref
                    table.n += 1
                    if table.n * 2 > len(slots):
                        table._grow()
                        slots, mask = table._slots, table._mask
                else:
                    other[(digest, size)] = ref
                    table.add(digest, find=False)
                new_sizes.append(size)
                if r.claim is not None:     # "none" makes no claims
                    release((digest, size), None)
                new_bytes += size
                if r.file_offset:       # its first use; absent means 0
                    file_off[ref] = r.file_offset
            rep = r.repeat
            if rep > 1:        # the rest of a hole run: dedups of its first chunk
                n_total += rep - 1
                total += (rep - 1) * size
                dedup += rep - 1
                dedup_bytes += (rep - 1) * size
                refs.repeat[len(rrefs)] = rep
            # ChunkRefs.append, inlined
            key = r.file_key
            if files and files[-1] == key:
                nrefs[-1] += 1
            else:
                files.append(key)
                nrefs.append(1)
            rrefs.append(ref)
        if run_end > run_start:
            new_stored.append(rbuf[run_start:run_end])
        if zbase is not None:
            new_stored.append(zbase[zstart:zend])
            del zbase
        if new_sizes:
            self.writer.append_chunks(new_stored, new_sizes, refs.coff, refs.csize,
                                      refs.uoff, raw=raw,
                                      csizes=None if raw else new_csizes)
        st = self.stats
        st["chunks_total"] += n_total
        st["bytes_total"] += total
        st["chunks_dedup"] += dedup
        st["bytes_dedup"] += dedup_bytes
        st["chunks_new"] += len(new_sizes)
        st["bytes_new"] += new_bytes
        return total


def _pack(source: str, bootstrap: str, blob_dir: str, opts: PackOptions | None,
          progress: Progress | None) -> PackResult:
    opts = opts or PackOptions()
    opts.check()
    t0 = time.monotonic()
    check_paths(bootstrap, source)
    # Like nydus-image, create the blob directory when it is missing.
    try:
        os.makedirs(blob_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"blob directory {blob_dir}: {e.strerror}") from None
    cdict = ChunkDict(opts.chunk_dicts, opts.digester, opts.chunk_size)

    mk = MkfsOptions(timestamp=opts.timestamp, shared_xattrs=False, whiteouts="keep")
    ts = mk.effective_timestamp()
    prefetch = normalize_prefetch(opts.prefetch)
    # The blob count is known only after chunking but the builder takes meta_blkaddr up
    # front: reserve room for every blob that may be listed (all dict blobs + the new
    # one). Without chunk dicts (or when all dict blobs are used) this is exactly the
    # nydus-image layout; otherwise a few zero bytes stay between tables and inodes.
    nb = bootstrap_nodes(len(cdict.blobs) + 1, len(prefetch), ts)
    walker = RafsWalker(nb, mk, source, track_paths=bool(prefetch),
                         on_entry=progress.scan if progress is not None else None)
    feed: WalkFeed | None = None
    files_in: Iterable[FileItem]
    if prefetch:
        # prefetch files go first: the whole tree must be known before chunking
        walker.walk(source)
        prefetch_nodes, prefetch_files = prefetch_order(walker, prefetch)
        files = nb.files
        first = set(prefetch_files)
        order = prefetch_files + sorted((n for n in files if n not in first),
                                        key=lambda n: files[n].path)
        files_in = ((n, files[n].path, files[n].size, files[n].sparse) for n in order)
    else:
        # chunked in walk order while the walk goes on
        prefetch_nodes = []
        feed = WalkFeed(walker, source)
        files_in = feed.files()

    # -- chunking ---------------------------------------------------------------------
    done_bytes = 0
    placer: ChunkPlacer | None = None
    try:
        try:
            placer = ChunkPlacer(opts, blob_dir, cdict)
            # compressed: the modules the blob's finish and the bootstrap need imported
            # while the workers compress (the main thread mostly waits for them), not
            # after the last chunk, when one core idles (~0.03 s of a /usr/share pack).
            # Not without compression: they would count in its peak memory
            warm = 16 if opts.compressor != "none" else -1
            for batch in placer.pipe.run_batches(files_in):
                nbytes = placer.place_batch(batch)
                del batch
                warm -= 1
                if not warm:
                    _warm_imports()
                if progress is not None:
                    done_bytes += nbytes
                    if feed is not None:
                        progress.scan(walker.entries, walker.bytes, done_bytes)
                    else:
                        progress.write(done_bytes, walker.bytes or 1)
        finally:
            if feed is not None:
                feed.close()
        writer = placer.writer
        # finished on a thread while the bootstrap sets the chunk indexes (both in the
        # single-threaded tail)
        new_info = writer.finish_started()
    except BaseException:
        if placer is not None:
            placer.writer.abort()
        raise

    try:
        result = write_bootstrap(nb, walker, bootstrap, opts, cdict, new_info,
                                 placer.refs, {}, prefetch_nodes, ts)
        if new_info is not None:
            writer.commit()
    except BaseException:
        writer.abort()
        raise
    if progress is not None:
        progress.done()
    result.update(placer.stats)
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["source"] = source
    return result


def _warm_imports() -> None:
    """What BlobWriter.finish imports (BlobInfo: the reader layer, ~0.02-0.04 s)"""
    import erofs_tools.reader.bootstrap  # noqa: F401


def layout_constants(nblobs: int, nprefetch: int) -> tuple[int, int, int]:
    """(blob table, prefetch table, inode area) offsets for NBLOBS and NPREFETCH."""
    blob_off = round_up(R.DEVT_OFFSET + E.DeviceSlot.SIZE * nblobs, BLKSZ)
    prefetch_off = blob_off + R.BlobEntry.SIZE * nblobs
    meta_addr = round_up(prefetch_off + 4 * nprefetch, BLKSZ)
    return blob_off, prefetch_off, meta_addr


def _write_pieces(fd: int, offset: int, length: int, pieces: Iterable[bytearray],
                  path: str) -> None:
    """pwrite `pieces` back to back from `offset`; they must make `length` bytes."""
    pos = offset
    for piece in pieces:
        view = memoryview(piece)
        while view:
            try:
                n = os.pwrite(fd, view, pos)
            except OSError as e:
                raise InputError(f"cannot write {path}: {e.strerror}") from None
            view = view[n:]
            pos += n
    if pos != offset + length:
        raise AssertionError(f"chunk info table of {pos - offset} bytes, {length} expected")


def write_bootstrap(nb: NativeBuilder, walker: TreeInfo | RafsWalker, bootstrap: str,
                    opts: PackOptions, cdict: ChunkDict | None,
                    new_info: BlobInfo | Started[BlobInfo] | None,
                    per_node: Mapping[int, NodeChunks] | ChunkRefs, file_off: dict[int, int],
                    prefetch_nodes: Sequence[int], ts: int | None,
                    blob_list: Sequence[BlobInfo] | None = None,
                    node_of: Mapping[int, int] | None = None) -> PackResult:
    """Lay out and write the RAFS v6 bootstrap for the node graph `nb` (from
    bootstrap_nodes): the one bootstrap writer of pack, of tar ingestion and of merge.
    `walker` describes the tree source (a TreeInfo or the directory walker);
    `per_node`: node -> its chunks in file order (StoredChunk or ChunkRun), with
    `file_off` (id(StoredChunk) -> file offset of its first use when not 0); or the
    ChunkRefs of a ChunkPlacer, whose file keys are nodes or, given `node_of`, keys of
    it (files whose key it lacks are left out); they are used up (cleared) here, and `nb`
    is closed once written. `new_info`: the new blob, or its finish running
    (BlobWriter.finish_started), waited for once the chunk indexes are set."""
    refs = per_node if isinstance(per_node, ChunkRefs) else None
    key_node: Callable[[int], int | None] = \
        (lambda k: k) if node_of is None else node_of.get
    # -- blob list: referenced dict blobs first, then the new one --------------------
    # (blob_list: the exact final list, chunks' blob_index already final; used by merge)
    if blob_list is not None:
        blobs = list(blob_list)
        remap = {i: i for i in range(len(blobs))}
    else:
        if refs is not None:
            used = sorted(refs.used_dict_blobs(key_node))
        else:
            assert not isinstance(per_node, ChunkRefs)
            used = sorted({sc.blob_index for chunks in per_node.values()
                           for sc, _ in runs(chunks) if sc.blob_index >= 0})
        dict_blobs = cdict.blobs if cdict is not None else []     # merge: none
        blobs = [dict_blobs[i] for i in used]
        remap = {old: new for new, old in enumerate(used)}
    if new_info is not None:
        remap[-1] = len(blobs)
    nblobs = len(blobs) + (new_info is not None)
    if nblobs > R.MAX_BLOBS:
        raise InputError(f"image would reference {nblobs} blobs (at most {R.MAX_BLOBS})")
    blob_off, prefetch_off, meta_addr = layout_constants(nblobs, len(prefetch_nodes))
    if meta_addr > nb.options.meta_blkaddr * BLKSZ:
        raise AssertionError("tables overrun the reserved area")

    # -- chunk indexes ------------------------------------------------------------------
    chunkbits = opts.chunk_size.bit_length() - 1
    fmt = E.CHUNK_FORMAT_INDEXES | (chunkbits - E.BLKSZ_BITS)
    table_job: Started[tuple[int, Iterator[bytearray]] | None] | None = None
    if refs is not None:
        refs_used = refs.set_indexes(nb, fmt, walker.regular,
                                     None if node_of is None else node_of.get, remap)
        table_job = refs.sized_table_started(refs_used, remap)     # sorted during layout
    else:
        assert not isinstance(per_node, ChunkRefs)
        referenced = set_chunk_indexes(nb, fmt, walker.regular, per_node, remap)
    try:
        new_blob = new_info.result() if isinstance(new_info, Started) else new_info
        if new_blob is not None:
            blobs.append(new_blob)

        # -- tables before the inode area -----------------------------------------------
        flags = (R.COMPRESSION_FLAGS[opts.compressor] | R.DIGEST_FLAGS[opts.digester]
                 | R.FLAG_EXPLICIT_UID_GID)
        if walker.has_xattrs:
            flags |= R.FLAG_HAS_XATTR
        if blobs and all(b.features & R.BLOB_FEATURE_INLINED_CHUNK_DIGEST for b in blobs):
            flags |= R.FLAG_INLINED_CHUNK_DIGEST
        blob_table = b"".join(b.blob_entry(i).encode() for i, b in enumerate(blobs))
        for b in blobs:
            nb.add_device(b.blob_id.encode(), b.blocks, 0)   # mapped_blkaddr patched below
        if blob_table:
            nb.put_bytes(blob_off, blob_table)
        if prefetch_nodes:
            nb.put_bytes(prefetch_off, bytes(4 * len(prefetch_nodes)))
        info = nb.layout()
        sized = None if table_job is None else table_job.result()
    except BaseException:
        if table_job is not None:
            # its thread reads the records: not left running past a failure
            table_job.join()
        raise
    if info.root_nid != ROOT_NID:
        raise AssertionError(f"root nid {info.root_nid}, expected {ROOT_NID}")

    # -- chunk info table, sorted by (digest, blob_index + 1, index) ---------------------
    # appended after everything the C core wrote, piece after piece (each but the last a
    # BLKSZ multiple, so that the next one starts at the image's new end)
    ctable_off = info.image_size
    ctable_len = 0
    # the common case (a directory pack: new chunks only): the table's size is known
    # first, its room reserved, and its pieces written into the file after the rest
    # of the bootstrap, once the node graph is freed (the C core's copy of the whole
    # table, ~4 MiB for /usr/share, beside the graph was pack's peak memory)
    later: Iterator[bytearray] | None = None
    if refs is not None:
        if sized is not None:
            ctable_len, later = sized
            if ctable_len:
                reserve_bytes(nb, ctable_off, ctable_len)
            pieces: Iterable[bytearray] = ()
        else:
            pieces = refs.chunk_info_table(refs_used, remap)
        del sized
    else:
        pieces = [chunk_info_table(referenced, remap, file_off)]
        del referenced
    for piece in pieces:
        if piece:
            put_buffer(nb, ctable_off + ctable_len, piece)   # the C core keeps a copy
            ctable_len += len(piece)
    del pieces
    if refs is not None:
        del refs_used
        if later is None:
            refs.clear()        # the caller's records are used up (ChunkPlacer.refs)
    total = round_up(ctable_off + ctable_len, BLKSZ) if ctable_len else ctable_off
    if nb.refresh_info().image_size != total:
        raise AssertionError("C core placed the chunk info table elsewhere")

    ext = R.ExtSuperBlock(
        s_flags=flags, s_blob_table_offset=blob_off, s_blob_table_size=len(blob_table),
        s_chunk_size=opts.chunk_size,
        s_chunk_table_offset=ctable_off if ctable_len else 0,
        s_chunk_table_size=ctable_len,
        s_prefetch_table_offset=prefetch_off if prefetch_nodes else 0,
        s_prefetch_table_size=4 * len(prefetch_nodes))

    seg = R.BLOCK_SEG_ALIGNMENT
    sb_blocks = sum(b.blocks for b in blobs)
    # the tables below the first inode, the chunk info table appended at the image end,
    # device slots and sb.blocks, all given to the C core after layout
    nb.put_bytes(R.EXT_SUPER_OFFSET, ext.encode())
    if prefetch_nodes:
        nb.put_bytes(prefetch_off,
                     b"".join(nb.nid(n).to_bytes(4, "little") for n in prefetch_nodes))
    pos = round_up(total, seg)
    for i, b in enumerate(blobs):
        nb.set_device(i + 1, b.blocks, pos // BLKSZ)
        pos = round_up(pos + b.uncompressed_size, seg)
    nb.set_sb_blocks(sb_blocks)

    umask = os.umask(0)
    os.umask(umask)
    with atomic_output(bootstrap, mode=0o666 & ~umask) as f:
        nb.write(f.fileno())
        nb.close()          # the graph is written: its memory serves the table
        if later is not None:
            assert refs is not None
            # the disk writes what the C core wrote while the table is written: the
            # fsync (~8 MiB for /usr/share) then waits only for the rest
            start_writeback(f.fileno())
            _write_pieces(f.fileno(), ctable_off, ctable_len, later, bootstrap)
            del later
            refs.clear()
    return PackResult(
        bootstrap=bootstrap, bootstrap_size=total, inodes=info.inodes,
        blobs=[dict(b.as_dict(), blob_index=i, new=(b is new_blob))
               for i, b in enumerate(blobs)],
        blob_id=new_blob.blob_id if new_blob else None,
        chunk_size=opts.chunk_size, compressor=opts.compressor, digester=opts.digester,
        chunk_info_entries=ctable_len // R.ChunkInfo.SIZE,
        prefetch_entries=len(prefetch_nodes))

