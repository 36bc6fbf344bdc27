"""The bootstrap's chunk indexes and chunk info table from StoredChunk objects per node:
what tar ingestion's zran, merge and optimize hand to write_bootstrap (a directory or
tar pack hands it the flat records of chunk_refs.ChunkRefs instead)."""
from __future__ import annotations

import array
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from erofs_tools.builder.blob import BLKSZ, StoredChunk

if TYPE_CHECKING:
    from erofs_tools._native import NativeBuilder


class ChunkRun:
    """`count` consecutive chunk indexes of one file naming the same stored chunk (a
    run of hole chunks of a sparse tar entry): one object, however long the run."""
    __slots__ = ("chunk", "count")

    def __init__(self, chunk: StoredChunk, count: int) -> None:
        self.chunk = chunk
        self.count = count


FileChunks = list[StoredChunk | ChunkRun]     # a file's chunks in file order
# what a node maps to: its chunk list, or (most files: one chunk) the one item itself,
# which saves a list per file (~90 bytes x 48k files of /usr/share)
NodeChunks = FileChunks | StoredChunk | ChunkRun


def runs(chunks: Iterable[StoredChunk | ChunkRun] | StoredChunk | ChunkRun
          ) -> Iterator[tuple[StoredChunk, int]]:
    """(StoredChunk, count) of a file's chunks: a list which may hold ChunkRuns, or one
    StoredChunk or ChunkRun alone."""
    if isinstance(chunks, StoredChunk):
        yield chunks, 1
        return
    if isinstance(chunks, ChunkRun):
        yield chunks.chunk, chunks.count
        return
    for c in chunks:
        if isinstance(c, ChunkRun):
            yield c.chunk, c.count
        else:
            yield c, 1


_FLUSH_ENTRIES = 1 << 20     # chunk indexes handed to the C core at a time (8 MiB)


def set_chunk_indexes(nb: NativeBuilder, fmt: int, regular: Iterable[int],
                       per_node: Mapping[int, NodeChunks], remap: dict[int, int]
                       ) -> list[StoredChunk]:
    """Give every regular file its 8-byte chunk indexes (advise = CI index bits 0-15,
    device_id = blob index + 1 | CI index bits 16-23 << 8, blkaddr = uncompressed offset
    / 4096), many files per call into the C core, from flat arrays; -> every chunk
    referenced, once each (the chunk info table's entries)."""
    used: list[StoredChunk] = []
    entry_of: dict[int, int] = {}        # id(StoredChunk) -> its index entry
    nodes, counts, ents = array.array("I"), array.array("I"), array.array("Q")

    def entry(sc: StoredChunk) -> int:
        e = entry_of.get(id(sc))
        if e is None:
            idx = sc.index
            dev = (remap[sc.blob_index] + 1) | (((idx >> 16) & 0xFF) << 8)
            e = entry_of[id(sc)] = ((idx & 0xFFFF) | (dev << 16)
                                    | ((sc.uncompressed_offset // BLKSZ) << 32))
            used.append(sc)
        return e

    for node in regular:
        pn = per_node.get(node)
        nodes.append(node)
        if pn is None:
            counts.append(0)
        elif type(pn) is StoredChunk:
            ents.append(entry(pn))
            counts.append(1)
        else:
            n = 0
            for sc, count in runs(pn):
                e = entry(sc)
                if count == 1:
                    ents.append(e)
                else:       # a run of hole chunks: C needs them spelled out anyway
                    ents.extend(itertools.repeat(e, count))
                n += count
            counts.append(n)
        if len(ents) >= _FLUSH_ENTRIES:
            nb.set_chunks_many(fmt, nodes, counts, ents)
            nodes, counts, ents = array.array("I"), array.array("I"), array.array("Q")
    nb.set_chunks_many(fmt, nodes, counts, ents)
    return used


def chunk_info_table(used: list[StoredChunk], remap: dict[int, int],
                      file_off: dict[int, int]) -> bytearray:
    """The chunk info table: one entry per distinct (digest, blob index, CI index),
    sorted by that key (two StoredChunk objects may name the same chunk)."""
    def key(sc: StoredChunk) -> tuple[bytes, int, int]:
        return sc.digest, remap[sc.blob_index], sc.index

    out = bytearray()
    last = None
    for sc in sorted(used, key=key):
        k = key(sc)
        if k != last:
            out += sc.chunk_info_bytes(k[1], file_off.get(id(sc), 0))
            last = k
    return out
