"""The daemon's `warm` route (`POST /api/v1/warm`): what a mount of a bootstrap will need
first, fetched before that mount is asked for (zranwarm.py: a zran image's meta blobs),
through the very backend object the mount will use. A mixin of the Daemon, beside
lifecycle's MountLifecycle."""
from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

from erofs_tools.reader.zran import is_zran_entry
from fscache_daemon.blobopen import peek_blobs
from fscache_daemon.errors import DaemonError, NotFoundError
from fscache_daemon.storage.backends import parse_backend_spec
from fscache_daemon.zranwarm import ZranWarm

if TYPE_CHECKING:
    from fscache_daemon.storage.backends import Backend

log = logging.getLogger("fscache_daemon.lifecycle")


class WarmRoute:
    # what this mixin uses of the Daemon (set in its __init__, methods defined there)
    zran_warm: ZranWarm

    if TYPE_CHECKING:
        def _backend(self, spec: str, options: dict) -> Backend: ...
        def _drop_unused_backends(self) -> None: ...
        def _release_backend(self, be: Backend) -> None: ...

    def warm(self, bootstrap: str, backend: str, options: dict | None = None) -> dict:
        """Fetch and parse the zran meta blobs of `bootstrap`'s blob table through the
        backend a mount of it with `backend`/`options` will use, on threads of their own
        (zranwarm.py): its mount, if it comes within zranwarm.TTL, takes them. ->
        {"zran_blobs": how many were started}; errors are left to the mount."""
        if not isinstance(bootstrap, str) or not isinstance(backend, str):
            raise DaemonError("warm needs string bootstrap and backend")
        parse_backend_spec(backend)
        bootstrap = os.path.abspath(bootstrap)
        if not os.path.isfile(bootstrap):
            raise NotFoundError(f"{bootstrap}: no such bootstrap file")
        opts = dict(options or {})
        zran = [(b, e) for b, _end, e in peek_blobs(bootstrap) if is_zran_entry(e)]
        if not zran:
            return {"zran_blobs": 0}
        be = self._backend(backend, opts)
        started = 0
        try:
            for blob_id, entry in zran:
                be.register_blob(blob_id, int(entry.compressed_size))
                started += self.zran_warm.start(
                    be, blob_id, entry, lambda: self._backend(backend, opts),
                    functools.partial(self._let_go, be))
        finally:
            self._release_backend(be)
        log.info("warming %d zran meta blob(s) of %s (backend %s)", started, bootstrap,
                 backend)
        return {"zran_blobs": started}

    def _let_go(self, be: Backend) -> None:
        """A backend's use ends; closed if nothing else uses it."""
        self._release_backend(be)
        self._drop_unused_backends()

