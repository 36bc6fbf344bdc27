"""On-disk structures of EROFS and Nydus RAFS v6, in one place.

`erofs` holds the kernel-visible format (superblock, inodes, dirents, xattrs, device
slots); `rafs` holds what Nydus adds (extended superblock, blob table, chunk info, blob
meta header, compression-info entries, blob TOC). Both are pure Python: they decode from
and encode to bytes and check nothing beyond sizes; semantic validation belongs to the
reader, which treats every byte as untrusted.
"""
