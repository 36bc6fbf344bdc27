"""Where every chunk of one pack run went, in flat arrays instead of objects.

A pack of /usr/share places ~48k chunks, ~47k of them new: as Python objects (a
StoredChunk, a (digest, size) key, dict slots, a list per file) that was ~400 bytes per
chunk, a fifth of pack's peak memory. Here a new chunk is its digest (the key of one
dict) and four array slots (blob offsets and sizes, ~24 bytes); a file is its key and a
count, its chunks one 4-byte reference each, in file order.

References (`refs`): a new chunk is its CI index in the new blob (< 2^24); a chunk dict
chunk is DICT_REF | its position in `dict_chunks`.
"""
from __future__ import annotations

import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from erofs_tools._native_chunkio import ChunkInfoTable, chunk_indexes
from erofs_tools.builder.blob import BLKSZ, StoredChunk
from erofs_tools.builder.rafs_walk import NodeSet
from erofs_tools.builder.workpool import Started, started
from erofs_tools.format import rafs as R

if TYPE_CHECKING:
    from erofs_tools._native import NativeBuilder

DICT_REF = 1 << 31
_FLUSH_ENTRIES = 1 << 20     # chunk indexes handed to the C core at a time (8 MiB)
TABLE_PIECE = 1 << 20        # chunk info table bytes handed over at a time (BLKSZ multiple)


def _same(key: int) -> int | None:
    return key


def _without(regular: Iterable[int], with_chunks: bytearray) -> Iterable[int]:
    """The nodes of `regular` whose byte in `with_chunks` is 0 or past its end (the
    regular files that get no chunk indexes), ascending for a NodeSet."""
    if isinstance(regular, NodeSet):
        return regular.without(with_chunks)
    n = len(with_chunks)
    return [node for node in regular if node >= n or not with_chunks[node]]


class DigestTable:
    """digest (32 bytes) -> the index it was added with (0, 1, 2 ...): the digests back
    to back in one bytearray, an open-addressing table of indexes over them. No Python
    object per entry: long-lived small objects (a dict's digest keys and int values)
    pinned pymalloc's arenas, so pack's RSS grew with every transient object allocated
    between them (26 MiB of arenas for 11 MiB of objects)."""
    DIGEST = 32

    def __init__(self) -> None:
        self.digests = bytearray()
        # 256 KiB to start with: a big tree's table is rebuilt fewer times (each
        # rebuild hashes every digest again, in Python)
        self._slots = array.array("i", [-1]) * (1 << 16)
        self._mask = (1 << 16) - 1
        self.n = 0

    def digest(self, i: int) -> bytes:
        return bytes(self.digests[i * 32:i * 32 + 32])

    def get(self, digest: bytes) -> int | None:
        slots, mask, digests = self._slots, self._mask, self.digests
        h = hash(digest) & mask
        while True:
            i = slots[h]
            if i < 0:
                return None
            if digests[i * 32:i * 32 + 32] == digest:
                return i
            h = (h + 1) & mask

    def add(self, digest: bytes, find: bool = True) -> int:
        """Append `digest` (not in the table) as index n; -> n. find=False: kept as
        index n but never found by get (a second entry of a digest already there)."""
        if len(digest) != self.DIGEST:
            raise ValueError(f"digest of {len(digest)} bytes")
        i = self.n
        self.digests += digest
        self.n += 1
        if find:
            self._insert(digest, i)
        if self.n * 2 > len(self._slots):
            self._grow()
        return i

    def _insert(self, digest: bytes, i: int) -> None:
        slots, mask = self._slots, self._mask
        h = hash(digest) & mask
        while slots[h] >= 0:
            h = (h + 1) & mask
        slots[h] = i

    def _grow(self) -> None:
        """Twice the slots, each findable index inserted again in the old slots' order
        (the same table as _insert one by one would make). One loop with the probe
        inlined, over one bytes copy of the digests (a slice of it is the digest's own
        bytes, so its hash is the same): a method call, a bytearray slice and a bytes()
        per entry were ~0.6 us of the consumer's GIL each (/usr/share grows once, at
        32k chunks: ~20 -> ~9 ms). Filled before it replaces the old table, so a
        worker's `known` never probes a half-filled one."""
        old = self._slots
        size = len(old) * 2
        slots = array.array("i", [-1]) * size
        mask = size - 1
        digests = bytes(self.digests)
        for i in old:           # what was findable stays so (and nothing else)
            if i >= 0:
                h = hash(digests[i * 32:i * 32 + 32]) & mask
                while slots[h] >= 0:
                    h = (h + 1) & mask
                slots[h] = i
        self._slots = slots
        self._mask = mask


class ChunkRefs:
    """The chunks of the new blob and each file's chunk references, compactly."""

    def __init__(self) -> None:
        # the new blob's chunks by CI index: digest -> index (the first size met; the
        # same digest with another size, a digest collision, goes to `other`)
        self.new = DigestTable()
        self.other: dict[tuple[bytes, int], int] = {}
        self.coff = array.array("Q")
        self.csize = array.array("I")
        self.uoff = array.array("Q")
        self.usize = array.array("I")
        # chunk dict chunks referenced, by first use
        self.dict_chunks: list[StoredChunk] = []
        self._dict_ref: dict[int, int] = {}          # id(StoredChunk) -> its ref
        # files in placing order: key, number of ref slots; refs back to back
        self.files = array.array("I")
        self.nrefs = array.array("I")
        self.refs = array.array("I")
        self.repeat: dict[int, int] = {}     # ref slot -> its count when > 1 (hole runs)
        self.file_off: dict[int, int] = {}   # ref -> file offset of its first use, not 0

    # -- while placing ------------------------------------------------------------------
    def find_new(self, digest: bytes, size: int) -> int | None:
        """CI index of the new blob's chunk (digest, size), or None."""
        i = self.new.get(digest)
        if i is not None and self.usize[i] == size:
            return i
        return self.other.get((digest, size)) if self.other else None

    def add_new(self, digest: bytes, size: int, index: int, coff: int, csize: int,
                uoff: int, absent: bool = False) -> int:
        """Record the chunk the blob writer just appended as CI `index` (compressed at
        `coff`, `csize` bytes; uncompressed at `uoff`). absent: the caller knows
        `digest` is not in the table yet (one lookup less)."""
        i = len(self.usize)
        if index != i:
            raise AssertionError(f"blob chunk {index} recorded as {i}")
        # the size before the digest: a chunk worker's `known` (find_new) may look the
        # digest up between the two, and reads usize[i] as soon as it finds it
        self.usize.append(size)
        # index in the table == CI index: every new chunk's digest is there, in order
        if not absent and self.new.get(digest) is not None:
            self.other[(digest, size)] = i
            self.new.add(digest, find=False)
        else:
            self.new.add(digest)
        self.coff.append(coff)
        self.csize.append(csize)
        self.uoff.append(uoff)
        return i

    def dict_ref(self, sc: StoredChunk, file_offset: int) -> int:
        """The ref of chunk dict chunk `sc` (its first use's offset kept)."""
        ref = self._dict_ref.get(id(sc))
        if ref is None:
            ref = self._dict_ref[id(sc)] = DICT_REF | len(self.dict_chunks)
            self.dict_chunks.append(sc)
            self.file_off[ref] = file_offset
        return ref

    def append(self, file_key: int, ref: int, repeat: int = 1) -> None:
        """`ref` is the next chunk (or `repeat` chunks) of file `file_key`; a file's
        chunks come one after the other."""
        files = self.files
        if files and files[-1] == file_key:
            self.nrefs[-1] += 1
        else:
            files.append(file_key)
            self.nrefs.append(1)
        if repeat > 1:
            self.repeat[len(self.refs)] = repeat
        self.refs.append(ref)

    def clear(self) -> None:
        """Free the records (once the bootstrap has what it needs of them): the heap they
        held serves the bootstrap's write, so pack's peak does not rise there."""
        self.__init__()     # type: ignore[misc]

    # -- writing the bootstrap --------------------------------------------------------------
    def _files(self, node_of: Callable[[int], int | None]
               ) -> Iterable[tuple[int, int, int]]:
        """(node, first ref slot, ref slots) of every file that has a node."""
        pos = 0
        for key, n in zip(self.files, self.nrefs):
            node = node_of(key)
            if node is not None:
                yield node, pos, n
            pos += n

    def used_dict_blobs(self, node_of: Callable[[int], int | None]) -> set[int]:
        """Chunk dict blob indexes that the files with a node reference."""
        if not self.dict_chunks:
            return set()
        refs, dc = self.refs, self.dict_chunks
        out: set[int] = set()
        for _, pos, n in self._files(node_of):
            for ref in refs[pos:pos + n]:
                if ref & DICT_REF:
                    out.add(dc[ref & ~DICT_REF].blob_index)
        return out

    def _set_new_indexes(self, nb: NativeBuilder, fmt: int, regular: Iterable[int],
                         new_dev: int, new_used: bytearray) -> None:
        ents = chunk_indexes(self.refs, self.uoff, new_dev, new_used)
        nb.set_chunks_many(fmt, self.files, self.nrefs, ents)
        del ents
        files = self.files
        with_chunks = bytearray(max(files) + 1 if files else 0)
        for node in files:
            with_chunks[node] = 1
        nodes = array.array("I", _without(regular, with_chunks))
        nb.set_chunks_many(fmt, nodes, array.array("I", bytes(4 * len(nodes))),
                           array.array("Q"))

    def set_indexes(self, nb: NativeBuilder, fmt: int, regular: Iterable[int],
                    node_of: Callable[[int], int | None] | None, remap: Mapping[int, int]
                    ) -> tuple[bytearray, bytearray]:
        """Give every regular file its 8-byte chunk indexes (advise = CI index bits 0-15,
        device_id = blob index + 1 | CI index bits 16-23 << 8, blkaddr = uncompressed
        offset / 4096), many files per C call; regular files without chunks get none.
        node_of None: the file keys are the nodes.
        -> (flags of the new chunks referenced, flags of the dict chunks referenced)."""
        new_used = bytearray(len(self.usize))
        dict_used = bytearray(len(self.dict_chunks))
        new_dev = remap[-1] + 1 if self.usize else 0
        if node_of is None and not self.dict_chunks and not self.repeat and self.usize:
            # the common case (a directory pack: file keys are nodes, new chunks only,
            # no hole runs): every entry made in C, the files' arrays as they are
            self._set_new_indexes(nb, fmt, regular, new_dev, new_used)
            return new_used, dict_used
        if node_of is None:
            node_of = _same
        uoff, refs, repeat, dc = self.uoff, self.refs, self.repeat, self.dict_chunks
        nodes, counts, ents = array.array("I"), array.array("I"), array.array("Q")
        with_chunks = bytearray()        # one byte per node
        for node, pos, n in self._files(node_of):
            if node >= len(with_chunks):
                with_chunks.extend(bytes(node + 1 - len(with_chunks) + 4096))
            with_chunks[node] = 1
            nodes.append(node)
            total = 0
            for slot in range(pos, pos + n):
                ref = refs[slot]
                if ref & DICT_REF:
                    k = ref & ~DICT_REF
                    dict_used[k] = 1
                    sc = dc[k]
                    idx = sc.index
                    dev = (remap[sc.blob_index] + 1) | (((idx >> 16) & 0xFF) << 8)
                    e = (idx & 0xFFFF) | (dev << 16) | ((sc.uncompressed_offset // BLKSZ)
                                                        << 32)
                else:
                    new_used[ref] = 1
                    dev = new_dev | (((ref >> 16) & 0xFF) << 8)
                    e = (ref & 0xFFFF) | (dev << 16) | ((uoff[ref] // BLKSZ) << 32)
                count = repeat.get(slot, 1) if repeat else 1
                if count == 1:
                    ents.append(e)
                else:     # a run of hole chunks: C needs them spelled out anyway
                    ents.extend(array.array("Q", [e]) * count)
                total += count
            counts.append(total)
            if len(ents) >= _FLUSH_ENTRIES:
                nb.set_chunks_many(fmt, nodes, counts, ents)
                nodes, counts, ents = array.array("I"), array.array("I"), array.array("Q")
        empty = array.array("I", _without(regular, with_chunks))
        nodes.extend(empty)
        counts.extend(array.array("I", bytes(4 * len(empty))))
        nb.set_chunks_many(fmt, nodes, counts, ents)
        return new_used, dict_used

    def chunk_info_table(self, used: tuple[bytearray, bytearray],
                         remap: Mapping[int, int]) -> Iterator[bytearray]:
        """The chunk info table of the referenced chunks: one entry per distinct (digest,
        blob index, CI index), sorted by that key; in pieces of TABLE_PIECE bytes (the
        last one shorter), each given to the C core before the next is made (the whole
        table, 80 bytes a chunk, and the C core's copy of it were pack's peak)."""
        sized = self.sized_chunk_info_table(used, remap)
        if sized is not None:
            yield from sized[1]
            return
        piece = bytearray()
        for entry in self._table_entries(used, remap):
            piece += entry
            if len(piece) >= TABLE_PIECE:
                yield piece[:TABLE_PIECE]
                del piece[:TABLE_PIECE]
        if piece:
            yield piece

    def sized_chunk_info_table(self, used: tuple[bytearray, bytearray],
                               remap: Mapping[int, int]
                               ) -> tuple[int, Iterator[bytearray]] | None:
        """In the common case (new chunks only, one per digest): (the table's size in
        bytes, chunk_info_table's pieces), the size known before any piece is made, so
        that the table can be written after the rest of the bootstrap; else None."""
        new_used, dict_used = used
        if not (self.usize and not self.other and not any(dict_used)):
            return None
        # sorted and encoded in C (in Python: ~0.1 s of a /usr/share pack, with one
        # core idle)
        foff = array.array("Q", bytes(8 * len(self.usize)))
        for i, off in self.file_off.items():
            foff[i] = off
        table = ChunkInfoTable(self.new.digests, new_used, self.coff, self.csize,
                               self.uoff, self.usize, foff, remap[-1])

        def pieces() -> Iterator[bytearray]:
            # pieces of whole blocks but the last: 256 entries are 5 blocks
            step = TABLE_PIECE // (256 * R.ChunkInfo.SIZE) * 256
            for start in range(0, table.count, step):
                yield table.entries(start, min(step, table.count - start))
        return table.count * R.ChunkInfo.SIZE, pieces()

    def sized_table_started(self, used: tuple[bytearray, bytearray],
                            remap: Mapping[int, int]
                            ) -> Started[tuple[int, Iterator[bytearray]] | None]:
        """sized_chunk_info_table on a thread of its own; -> its Started, whose result()
        waits for and returns its result. pack's bootstrap sorts the table (C, without
        the GIL) while the C core lays the inodes out: both in the single-threaded tail,
        one core idle (/usr/share: ~8 ms of sort beside ~25 ms of layout). The records
        must not change until the result is taken (or the thread joined)."""
        return started(self.sized_chunk_info_table, used, remap, name="erofs-pack-table")

    def _table_entries(self, used: tuple[bytearray, bytearray],
                       remap: Mapping[int, int]) -> Iterator[bytes]:
        new_used, dict_used = used
        pack = R.ChunkInfo.pack
        new_blob = remap[-1] if self.usize else 0
        coff, csize, uoff, usize, file_off = (self.coff, self.csize, self.uoff, self.usize,
                                              self.file_off)
        comp = R.CHUNK_FLAG_COMPRESSED

        def new_entry(digest: bytes, i: int) -> bytes:
            cs, us = csize[i], usize[i]
            return pack(digest, new_blob, comp if cs != us else 0, cs, us, coff[i],
                        uoff[i], file_off.get(i, 0), i, 0)

        digest = self.new.digest
        if not self.other and not any(dict_used):
            # the common case: new chunks only, one per digest: sorted by digest alone,
            # bucket by bucket of the first byte (never a sort key per chunk at once:
            # 5 MiB of them for /usr/share)
            buckets: list[list[int]] = [[] for _ in range(256)]
            digests = self.new.digests
            for i in range(len(usize)):
                if new_used[i]:
                    buckets[digests[i * 32]].append(i)
            for b in buckets:
                b.sort(key=digest)
                for i in b:
                    yield new_entry(digest(i), i)
                b.clear()
            return
        rows: list[tuple[bytes, int, int, int]] = []      # (digest, blob, index, ref)
        for i in range(len(usize)):
            if new_used[i]:
                rows.append((digest(i), new_blob, i, i))
        for k, sc in enumerate(self.dict_chunks):
            if dict_used[k]:
                rows.append((sc.digest, remap[sc.blob_index], sc.index, DICT_REF | k))
        rows.sort(key=lambda r: r[:3])
        last = None
        for d, blob, idx, ref in rows:
            if (d, blob, idx) == last:
                continue
            last = (d, blob, idx)
            if ref & DICT_REF:
                yield self.dict_chunks[ref & ~DICT_REF].chunk_info_bytes(
                    blob, file_off.get(ref, 0))
            else:
                yield new_entry(d, ref)
