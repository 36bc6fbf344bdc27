"""The blob cache directory as a whole: what each cache key occupies on disk, when it
was last used, and removing a key's files for the size limit (`--cache-size`).

A cache key's files are `<key>.blob`, `<key>.chunks` and `<key>.map` (blobcache.py).
Space is what `du` counts: allocated blocks (cache files are sparse). The time of last
use is the mtime of `<key>.chunks`, which the daemon touches when it releases a blob
(and which a sync rewrites while it is used): never the cache file's, whose mtime tells
blobcache that something wrote it after its record.

Removal renames the files out of the way first (`.evict-<key><suffix>`, one rename(2)
each) and unlinks them after: the caller does the renames while holding the lock a
mount takes to pin a blob, so a mount sees either the whole cache or none of it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SUFFIXES = (".blob", ".chunks", ".map")
EVICTING = ".evict-"
_KEY = re.compile(r"^[0-9a-f]{64}(@[0-9a-f]{1,64})?$")


@dataclass
class CacheEntry:
    key: str
    bytes: int = 0                 # allocated on disk
    last_used: float = 0.0         # mtime of <key>.chunks (else of any of its files)
    names: list[str] = field(default_factory=list)


def allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


def scan(directory: str) -> dict[str, CacheEntry]:
    """Every cache key with files in `directory` (what an interrupted removal set aside
    is `sweep`'s)."""
    out: dict[str, CacheEntry] = {}
    chunks_mtime: dict[str, float] = {}
    try:
        it = os.scandir(directory)
    except FileNotFoundError:
        return out
    with it:
        for e in it:
            suffix = next((s for s in SUFFIXES if e.name.endswith(s)), None)
            key = e.name[:-len(suffix)] if suffix else ""
            if not _KEY.match(key):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            ent = out.setdefault(key, CacheEntry(key))
            ent.bytes += allocated(st)
            ent.names.append(e.name)
            ent.last_used = max(ent.last_used, st.st_mtime)
            if suffix == ".chunks":
                chunks_mtime[key] = st.st_mtime
    for key, t in chunks_mtime.items():
        out[key].last_used = t
    return out


def touch(directory: str, key: str) -> None:
    """Record a use of `key` now (LRU order)."""
    try:
        os.utime(os.path.join(directory, key + ".chunks"))
    except OSError:
        pass


def set_aside(directory: str, key: str) -> list[str]:
    """Rename `key`'s files out of the way (cheap; under the pin lock): -> new paths."""
    moved = []
    for s in SUFFIXES:
        src = os.path.join(directory, key + s)
        dst = os.path.join(directory, f"{EVICTING}{key}{s}")
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            continue
        moved.append(dst)
    return moved


def unlink_all(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot remove: %s", p, e.strerror)


def sweep(directory: str) -> None:
    """Remove what an interrupted removal set aside."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(EVICTING)]
    except FileNotFoundError:
        return
    unlink_all([os.path.join(directory, n) for n in names])


def victims(entries: dict[str, CacheEntry], limit: int, keep) -> list[CacheEntry]:
    """The least recently used entries to remove so that the total fits `limit`,
    skipping those `keep(key)` says are in use (they may leave the total over it)."""
    total = sum(e.bytes for e in entries.values())
    out = []
    for e in sorted(entries.values(), key=lambda e: (e.last_used, e.key)):
        if total <= limit:
            break
        if keep(e.key):
            continue
        out.append(e)
        total -= e.bytes
    return out
