"""The daemon's storage layer: backends, per-blob cache files, chunk state, fetch planning.

Kernel-independent: front ends (fanotify, cachefiles) ask a `BlobManager` to make a byte
range of a blob's uncompressed address space present in its cache file; the manager plans
whole-chunk backend requests (the next one in flight while the previous is decoded),
decompresses and verifies every chunk and writes it at its uncompressed offset, only
then recording it as cached (`erofs_tools.reader.coldpath`: the C core, releasing the
GIL; `erofs_tools.reader.blob.decode_chunk` on the Python path kept for comparison).
"""

from fscache_daemon.errors import DaemonError


class StorageError(DaemonError):
    """The blob cache (cache files, chunk state, chunk map) cannot be used."""


class BackendError(DaemonError):
    """A backend could not deliver the bytes asked for."""


class BackendUnavailableError(BackendError):
    """The store behind a backend (registry, blob directory) refused or failed a read
    that was well formed: the API answers 502, not 400."""
