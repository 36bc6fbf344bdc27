"""Uncompressed cache-file form of a data blob (what the kernel reads via `device=`).

The cache file is the blob's uncompressed address space: each chunk at its uncompressed
offset (4 KiB aligned), zero padding between, size = the blob's uncompressed size. It is
built under a temporary name beside the target, every chunk is checked against its
digest while expanding, and the finished file is renamed to the blob id, so a file with
that name and the right size is complete.
"""
import hashlib
import os
import tempfile

import blake3
import zstandard

from erofs_tools.builder.blob import BlobMeta
from erofs_tools.errors import CorruptImageError, DigestMismatchError, InputError

_DIGEST = {"blake3": lambda b: blake3.blake3(b).digest(),
           "sha256": lambda b: hashlib.sha256(b).digest()}


def cache_path(cache_dir, blob_id):
    return os.path.join(cache_dir, blob_id)


def is_complete(path, info):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_size == info.uncompressed_size


def expand_blob(blob_path, info, cache_dir, chunk_digests=None):
    """Write the cache file of one blob unless it is already complete; -> its path.

    info: BlobInfo from the bootstrap's blob table. chunk_digests: optional {CI index:
    digest} from the bootstrap's chunk info table, used when the blob has no inlined
    digests (or in addition to them).
    """
    dest = cache_path(cache_dir, info.blob_id)
    if is_complete(dest, info):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    meta = BlobMeta.read(blob_path, info)
    digest = _DIGEST[info.digester]
    dctx = zstandard.ZstdDecompressor()
    fd, tmp = tempfile.mkstemp(prefix=f".{info.blob_id[:16]}-", suffix=".tmp", dir=cache_dir)
    try:
        with open(blob_path, "rb") as src, os.fdopen(fd, "wb") as out:
            order = sorted(range(len(meta.entries)), key=lambda k: meta.entries[k][2])
            for k in order:
                uoff, us, coff, cs = meta.entries[k]
                src.seek(coff)
                data = src.read(cs)
                if len(data) != cs:
                    raise CorruptImageError(f"blob {blob_path}: chunk {k} truncated")
                if cs != us:
                    if info.compressor != "zstd":
                        raise CorruptImageError(
                            f"blob {blob_path}: unsupported compressor {info.compressor}")
                    try:
                        data = dctx.decompress(data, max_output_size=us)
                    except zstandard.ZstdError as e:
                        raise CorruptImageError(
                            f"blob {blob_path}: chunk {k} does not decompress: {e}") from None
                    if len(data) != us:
                        raise CorruptImageError(f"blob {blob_path}: chunk {k} has a wrong size")
                want = []
                if meta.digests is not None:
                    want.append(meta.digests[k])
                if chunk_digests and k in chunk_digests:
                    want.append(chunk_digests[k])
                if want:
                    got = digest(data)
                    if any(w != got for w in want):
                        raise DigestMismatchError(
                            f"blob {info.blob_id}: chunk {k} digest mismatch")
                out.seek(uoff)
                out.write(data)
            out.truncate(info.uncompressed_size)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest


def find_blob(blob_dir, blob_id):
    p = os.path.join(blob_dir, blob_id)
    if not os.path.isfile(p):
        raise InputError(f"blob {blob_id} not found in {blob_dir}")
    return p
