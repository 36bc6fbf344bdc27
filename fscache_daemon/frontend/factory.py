"""Choosing a front end: what the kernel offers, and the adapter for a --frontend name."""

from __future__ import annotations

import os

from fscache_daemon.errors import DaemonError, FrontendError
from fscache_daemon.frontend.base import Frontend, NullFrontend


def fanotify_available() -> str | None:
    """None if pre-content fanotify works here, else why not."""
    try:
        from fscache_daemon.frontend import fanotify_abi as abi
        fd = abi.fanotify_init(abi.FAN_CLASS_PRE_CONTENT | abi.FAN_CLOEXEC,
                               os.O_RDWR | os.O_LARGEFILE)
    except (FrontendError, OSError) as e:
        return str(e)
    os.close(fd)
    return None


def make_frontend(kind: str, cache_dir: str, threads: int) -> Frontend:
    if kind == "auto":
        why = fanotify_available()
        if why is None:
            kind = "fanotify"
        else:
            from fscache_daemon.frontend import cachefiles as cf
            if cf.unavailable_reason() is None:
                kind = "cachefiles"
            else:
                raise FrontendError(f"no usable front end: fanotify: {why}; cachefiles: "
                                    f"{cf.unavailable_reason()}")
    from fscache_daemon.frontend.cachefiles_adapter import CachefilesAdapter
    from fscache_daemon.frontend.fanotify_adapter import FanotifyFrontend
    if kind == "fanotify":
        return FanotifyFrontend(cache_dir)
    if kind == "fanotify-local":
        return FanotifyFrontend(cache_dir, holder=False)
    if kind == "cachefiles":
        return CachefilesAdapter(cache_dir, threads)
    if kind == "none":
        return NullFrontend()
    raise DaemonError(f"unknown front end {kind!r}")
