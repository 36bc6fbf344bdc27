"""Uncompressed cache-file form of a data blob (what the kernel reads via `device=`).

The cache file is the blob's uncompressed address space: each chunk at its uncompressed
offset (4 KiB aligned), zero padding between, size = the blob's uncompressed size. It is
built under a temporary name beside the target, every chunk is checked against its
digest while expanding, and the finished file is renamed to the blob id, so a file with
that name and the right size is complete.

The blob's meta and every chunk go through `reader.blob`: one blob-meta reader and one
chunk decoder for pack, mount and the daemon. (builder.cache re-exports this module.)
"""
from __future__ import annotations

import os

from erofs_tools.errors import DigestMismatchError, InputError
from erofs_tools.fsutil import atomic_output
from erofs_tools.reader import blob as rblob
from erofs_tools.reader.bootstrap import BlobInfo


def cache_path(cache_dir: str, blob_id: str) -> str:
    return os.path.join(cache_dir, blob_id)


def is_complete(path: str, info: BlobInfo) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_size == info.uncompressed_size


def expand_blob(blob_path: str, info: BlobInfo, cache_dir: str,
                chunk_digests: dict[int, bytes] | None = None) -> str:
    """Write the cache file of one blob unless it is already complete; -> its path.

    info: BlobInfo from the bootstrap's blob table. chunk_digests: optional {CI index:
    digest} from the bootstrap's chunk info table, used when the blob has no inlined
    digests (or in addition to them: then both must agree).
    """
    dest = cache_path(cache_dir, info.blob_id)
    if is_complete(dest, info):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    # chunks whose blob carries no digest are checked against the bootstrap's
    meta = info.read_meta(blob_path, chunk_digests)
    with open(blob_path, "rb") as src, atomic_output(dest, mode=0o644) as out:
        read_at = rblob.file_reader(src)
        for c in sorted(meta.chunks, key=lambda c: c.compressed_offset):
            want = (chunk_digests or {}).get(c.index)
            if want is not None and c.digest is not None and want != c.digest:
                raise DigestMismatchError(f"blob {info.blob_id}: chunk {c.index} digest mismatch")
            data = rblob.read_chunk(meta, c, read_at)
            out.seek(c.uncompressed_offset)
            out.write(data)
        out.truncate(info.uncompressed_size)
    return dest


def find_blob(blob_dir: str, blob_id: str) -> str:
    p = os.path.join(blob_dir, blob_id)
    if not os.path.isfile(p):
        raise InputError(f"blob {blob_id} not found in {blob_dir}")
    return p
