"""Chunk dictionaries: chunks of existing RAFS v6 bootstraps that a new image references.

`ChunkDict` turns several bootstraps (read and checked by the reader layer's
`BootstrapTables`) into one lookup (digest, size) -> chunk location, with the dict blobs
numbered first in the new image.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from erofs_tools.builder.blob import StoredChunk
from erofs_tools.errors import InputError
from erofs_tools.format import rafs as R

if TYPE_CHECKING:
    from erofs_tools.reader.bootstrap import BlobInfo, BootstrapTables


def __getattr__(name: str) -> Any:
    # BootstrapTables lives in the reader layer; re-exported for the builder's callers,
    # imported when first used (pack without chunk dicts never reads a bootstrap: the
    # reader's modules are ~2 MiB of its RSS)
    if name == "BootstrapTables":
        from erofs_tools.reader.bootstrap import BootstrapTables
        return BootstrapTables
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BootstrapTables", "ChunkDict"]


class ChunkDict:
    """Chunks of one or more bootstraps, looked up by (digest, size).

    Dict blobs are numbered 0..n-1 in the order the bootstraps (and their blob tables)
    are given; a blob listed by several dicts keeps its first index.
    """

    def __init__(self, paths: Iterable[str] = (), digester: str = "blake3",
                 chunk_size: int | None = None) -> None:
        self.blobs: list[BlobInfo] = []
        self._blob_index: dict[str, int] = {}                       # blob id -> new index
        self.chunks: dict[tuple[bytes, int], StoredChunk] = {}     # (digest, size) -> chunk
        if paths:
            from erofs_tools.reader.bootstrap import BootstrapTables
            for p in paths:
                self._add(BootstrapTables.read(p), digester, chunk_size)

    def _add(self, t: BootstrapTables, digester: str, chunk_size: int | None) -> None:
        if t.digester != digester:
            raise InputError(f"chunk dict {t.path} uses {t.digester} digests, not {digester}")
        if chunk_size is not None and t.blobs and t.ext.s_chunk_size != chunk_size:
            raise InputError(f"chunk dict {t.path} has chunk size {t.ext.s_chunk_size}, "
                             f"not {chunk_size}")
        remap = {}
        for i, b in enumerate(t.blobs):
            if b.blob_id not in self._blob_index:
                if b.digester != digester:
                    raise InputError(f"chunk dict {t.path}: blob {b.blob_id} uses "
                                     f"{b.digester} digests")
                self._blob_index[b.blob_id] = len(self.blobs)
                self.blobs.append(b)
            remap[i] = self._blob_index[b.blob_id]
        for c in t.chunks:
            key = (c.digest, c.uncompressed_size)
            if key in self.chunks:
                continue
            self.chunks[key] = StoredChunk(c.digest, remap[c.blob_index], c.index,
                                           c.compressed_offset, c.compressed_size,
                                           c.uncompressed_offset, c.uncompressed_size)
        if len(self.blobs) > R.MAX_BLOBS - 1:
            raise InputError(f"chunk dicts list {len(self.blobs)} blobs, at most "
                             f"{R.MAX_BLOBS - 1} fit beside the new one")

    def get(self, key: tuple[bytes, int]) -> StoredChunk | None:
        return self.chunks.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.chunks

    def __len__(self) -> int:
        return len(self.chunks)
