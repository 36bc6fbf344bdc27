"""An image the daemon mounted (or is about to mount, or that the kernel still uses after
it was unmounted here), as recorded in mounts.json."""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

MOUNTING = "mounting"       # intent recorded, mount(2) not known to have succeeded
MOUNTED = "mounted"         # mounted at `mountpoint` (mount id `mount_id`) in our namespace
DETACHED = "detached"       # gone from our mount point, its superblock still alive


def persisted_options(options: dict) -> dict:
    """A mount's options as mounts.json keeps them: a proxy URL without its userinfo
    (the user name and password for the proxy).

    The password is kept nowhere, and a restarted daemon cannot read it again: its only
    source is the mount request (the API call, `fscache-daemon mount --proxy`), which no
    one repeats at a restart. A mount taken back reads through the proxy without
    credentials; a proxy that then answers 407 counts as failed and the reads go direct
    (transport.proxy_failed), as for a dead proxy. Mounting the image again with the
    proxy's credentials gives them back to its reads. The record says that they were
    dropped (`proxy_credentials_dropped`), for the restart's log."""
    proxy = options.get("proxy")
    if not isinstance(proxy, str) or not proxy_has_userinfo(proxy):
        return options
    p = urllib.parse.urlsplit(proxy)
    bare = urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path,
                                    p.query, p.fragment))
    return {**options, "proxy": bare}


def proxy_has_userinfo(url: str) -> bool:
    return "@" in urllib.parse.urlsplit(url).netloc


class Image:
    def __init__(self, mountpoint: str, bootstrap: str, source_bootstrap: str,
                 backend_spec: str, blob_ids: Iterable[str], prefetch: bool,
                 domain: str | None, options: dict | None,
                 prefetch_ranges: Iterable[tuple[int, int, int]] = (),
                 mounted_at: float | None = None, state: str = MOUNTING,
                 mount_id: int | None = None, instances: Iterable[str] = (),
                 blob_keys: Iterable[str] | None = None) -> None:
        self.mountpoint = mountpoint            # canonical (realpath)
        self.bootstrap = bootstrap              # the daemon's copy, in the cache dir
        self.source_bootstrap = source_bootstrap
        self.backend_spec = backend_spec
        self.blob_ids = list(blob_ids)
        # per blob, the cache key it is served under (the blob id, or a variant
        # `<id>@<table digest prefix>` when another image's chunk table for that id
        # disagrees): recorded so that a restart re-attaches each mount to its own file
        self.blob_keys = list(blob_keys) if blob_keys else list(self.blob_ids)
        self.prefetch = prefetch
        self.domain = domain
        self.options = dict(options or {})
        self.prefetch_ranges = list(prefetch_ranges)
        self.mounted_at = mounted_at or time.time()
        self.fsid = os.path.basename(bootstrap).split(".")[0]
        self.state = state
        self.mount_id: int | None = mount_id
        # names of the EROFS superblock(s) this mount made (/sys/fs/erofs/<name>)
        self.instances: list[str] = list(instances)
        # (EROFS instance, its default read_ahead_kb) while a larger window is set
        self.readahead_restore: tuple[str, int] | None = None
        # set once the daemon lets go of the image (its blobs released at umount, or the
        # daemon stopping): the workers tied to the mount (start set, library chase) end
        self.stop = threading.Event()
        self.chase: Any = None     # its libchase.LibraryChase once file runs are known

    @property
    def user(self) -> str:
        """How blob_users names this image: its mount point while mounted there."""
        if self.state == DETACHED:
            return f"{self.mountpoint} (detached: {','.join(self.instances) or '?'})"
        return self.mountpoint

    def to_json(self) -> dict:
        return {"mountpoint": self.mountpoint, "bootstrap": self.bootstrap,
                "source_bootstrap": self.source_bootstrap, "backend": self.backend_spec,
                "blobs": self.blob_ids, "blob_keys": self.blob_keys,
                "prefetch": self.prefetch, "domain": self.domain,
                "options": persisted_options(self.options),
                "mounted_at": self.mounted_at,
                "state": self.state, "mount_id": self.mount_id,
                "instances": self.instances,
                **({"proxy_credentials_dropped": True}
                   if proxy_has_userinfo(str(self.options.get("proxy") or "")) else {})}
