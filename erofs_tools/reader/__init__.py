"""Reader for plain EROFS and Nydus RAFS v6 images and their data blobs.

Every byte is untrusted: problems are CorruptImageError (or DigestMismatchError).
`blob` is the one blob-meta reader and chunk decoder, `bootstrap` the one reader of a
bootstrap's blob and chunk tables; the builder, mount, convert and the daemon use them.
"""
from erofs_tools.reader.blob import (
    BlobChunk,
    BlobMeta,
    decode_chunk,
    open_blob,
    read_chunk,
    read_toc,
)
from erofs_tools.reader.blobid import compute_blob_id
from erofs_tools.reader.bootstrap import BlobInfo, BootstrapTables

__all__ = ["BlobChunk", "BlobInfo", "BlobMeta", "BootstrapTables", "compute_blob_id",
           "decode_chunk", "open_blob", "read_chunk", "read_toc"]
