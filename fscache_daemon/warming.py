"""The daemon's `warm` route (`POST /api/v1/warm`): what a mount of a bootstrap will need
first, fetched before that mount is asked for (zranwarm.py: a zran image's meta blobs),
through the very backend object the mount will use. A mixin of the Daemon, beside
lifecycle's MountLifecycle; and MountWarmer, a mount's own warming of its backend (its
first round trips and blob checks) while its bootstrap is copied and parsed."""
from __future__ import annotations

import _thread
import functools
import logging
import os
import threading
from typing import TYPE_CHECKING

from erofs_tools.reader.zran import is_zran_entry
from fscache_daemon.blobopen import EarlyChecks, peek_blobs
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


class MountWarmer:
    """Warms the mount's backend (Backend.warm) on a thread of its own and holds it until
    the mount is over (no other mount's failure closes it meanwhile); a mount that ends
    first does not wait for it. Before warming, it starts the blobs' last-byte checks
    from the user's bootstrap (`checks`, blobopen.py)."""

    def __init__(self, owner, spec: str, options: dict, bootstrap: str):
        self.owner = owner
        self._lock = threading.Lock()
        self._over = False
        self._held = None
        self.checks = EarlyChecks()
        _thread.start_new_thread(self._run, (spec, options, bootstrap))

    def _run(self, spec: str, options: dict, bootstrap: str) -> None:
        try:
            be = self.owner._backend(spec, options)
        except Exception as e:  # noqa: BLE001 - the mount meets it again and reports it
            log.debug("backend %s: not warmed: %s", spec, e)
            return
        try:
            # each check holds the backend as long as it runs (it may outlive the mount)
            self.checks.start(be, bootstrap, lambda: self.owner._backend(spec, options),
                              lambda: self._release(be), self.owner.zran_warm)
        except Exception as e:  # noqa: BLE001 - the mount checks the blobs itself
            log.debug("backend %s: no early blob checks: %s", spec, e)
        try:
            be.warm()
        except Exception as e:  # noqa: BLE001 - as above
            log.debug("backend %s: not warmed: %s", spec, e)
        with self._lock:
            if not self._over:
                self._held = be
                return
        self._release(be)

    def _release(self, be) -> None:
        self.owner._release_backend(be)
        self.owner._drop_unused_backends()

    def done(self) -> None:
        with self._lock:
            self._over = True
            be, self._held = self._held, None
        if be is not None:
            self._release(be)
