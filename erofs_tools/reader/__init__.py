"""Reader for plain EROFS and Nydus RAFS v6 images and their data blobs.

Every byte is untrusted: problems are CorruptImageError (or DigestMismatchError).
"""
from erofs_tools.reader.blob import (BlobChunk, BlobMeta, compute_blob_id, decode_chunk,
                                     open_blob, read_chunk, read_toc)

__all__ = ["BlobChunk", "BlobMeta", "compute_blob_id", "decode_chunk", "open_blob",
           "read_chunk", "read_toc"]
