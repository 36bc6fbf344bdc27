"""Access traces: the order in which a mounted image's chunks and files are first needed.

What a trace sees is what reaches the cache files: every read EROFS makes of a blob's
cache file while the blob is incomplete raises a pre-content event (fanotify) or an
on-demand request (cachefiles). Those events are answered in three places, and each
records the first access of what it answers, without waiting for anything:

- the daemon's fast path (range cached, loop thread) and fill (range fetched, worker):
  `TraceRecorder.note`, a set lookup and an append per chunk not seen before;
- the fanotify fd holder, for ranges already set in the shared filled bitmap (most
  reads of a file the readahead fetched ahead of its reader): it never forwards those
  events, so it keeps its own first-access log per marked file
  (`fanotify_marks.TouchLog`: one bitmap test per event, a record per first touch) and
  the daemon pulls it when a trace is exported (`FanotifyFrontend.touches`), and before
  the file is unmarked (its blob completed: the holder forgets the file).

Recording at fill time instead would be wrong: the daemon fills what its readahead and
prefetch expect, not what readers read. A blob whose cache was already complete at mount
is not marked, raises no event and shows nothing (say so: `complete_blobs`); trace a cold
cache. Timestamps are CLOCK_MONOTONIC in both processes, reported in seconds after the
image's mount. A blob shared by two mounted images: mounting the second re-arms the
first-access records of the blob (`rearm`, in the holder too), so each image's trace
lists the first access after its own mount, whichever image read it.

A blob completed by fetching (readahead, prefetch) while some of its chunks were never
read stays marked (`Frontend.blob_complete(keep_mark=True)`): unmarked, the first reads of
those chunks would raise no event and be missing from the trace.

The export maps chunks to files (storage.image.chunk_owners): a chunk several files
share (deduplicated) goes to the one already in the trace, else the first by path.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fscache_daemon.storage.image import chunk_owners

TRACE_VERSION = 1


class _KeyLog:
    """First accesses of one cache key (one BlobManager's cache file)."""
    __slots__ = ("mgr", "seen", "log")

    def __init__(self, mgr) -> None:
        self.mgr = mgr
        self.seen: set[int] = set()                 # CI indexes already recorded
        self.log: list[tuple[int, int]] = []        # (monotonic ns, CI index)


class TraceRecorder:
    """Per cache key, the chunks first accessed and when. `daemon` gives the open blobs
    (`blobs`: cache key -> BlobManager) and the front end (`touches(mgr)` if it has one)."""

    def __init__(self, daemon: Any) -> None:
        self._d = daemon
        self._logs: dict[str, _KeyLog] = {}
        self._t0: dict[tuple[str, float], int] = {}   # image -> mount time, monotonic ns
        self._lock = threading.Lock()

    def note(self, key: str, mgr, offset: int, length: int) -> None:
        """A reader needs [offset, offset+length) of `key`'s cache file (cheap: the
        front end's loop thread calls this for every event it answers)."""
        kl = self._logs.get(key)
        if kl is None or kl.mgr is not mgr:
            kl = self._open(key, mgr)
        t = 0
        for c in mgr.meta.chunks_for_range(offset, max(1, length)):
            if c.index not in kl.seen:
                kl.seen.add(c.index)
                t = t or time.monotonic_ns()
                kl.log.append((t, c.index))

    def _open(self, key: str, mgr) -> _KeyLog:
        with self._lock:
            kl = self._logs.get(key)
            if kl is None or kl.mgr is not mgr:
                # a new manager (first use, or the blob was released and opened again):
                # start afresh, and forget the logs of released blobs (bounded memory)
                blobs = self._d.blobs
                for k in [k for k, v in self._logs.items() if blobs.get(k) is not v.mgr]:
                    del self._logs[k]
                kl = self._logs[key] = _KeyLog(mgr)
            return kl

    def first_accesses(self, key: str, mgr, since: int = 0) -> dict[int, int]:
        """{CI index: monotonic ns of its first access at or after `since`} from every
        source."""
        out: dict[int, int] = {}
        kl = self._logs.get(key)
        if kl is not None and kl.mgr is mgr:
            for t, idx in list(kl.log):
                if t >= since and (idx not in out or t < out[idx]):
                    out[idx] = t
        touches = getattr(self._d.frontend, "touches", None)
        if touches is not None:
            for off, n, t in touches(mgr):
                if t < since:
                    continue
                for c in mgr.meta.chunks_for_range(off, max(1, n)):
                    if c.index not in out or t < out[c.index]:
                        out[c.index] = t
        return out

    def rearm(self, mgr) -> None:
        """Another image was mounted with `mgr`'s blob: from now on a chunk's next access
        is recorded again, as the first one for that image (an access to the shared
        cache file cannot be told to one image; each image's trace keeps the first one
        after its mount). Earlier records stay, for the images mounted before."""
        kl = self._logs.get(mgr.key)
        if kl is not None and kl.mgr is mgr:
            kl.seen = set()     # a new set: note() may be iterating the old one
        rearm = getattr(self._d.frontend, "rearm_touches", None)
        if rearm is not None:
            rearm(mgr)

    def fully_read(self, mgr) -> bool:
        """Every chunk of `mgr`'s blob had its first access: later reads add nothing to
        a trace (the front end may stop watching the complete blob)."""
        return len(self.first_accesses(mgr.key, mgr)) >= len(mgr.meta.chunks)

    def _mount_time(self, img) -> int:
        """The image's mount on the monotonic clock (from its wall-clock mount time, the
        only one mounts.json keeps), worked out once so that exports agree."""
        ident = (img.mountpoint, img.mounted_at)
        with self._lock:
            t0 = self._t0.get(ident)
            if t0 is None:
                if len(self._t0) > 4096:
                    self._t0.clear()
                t0 = time.monotonic_ns() - int((time.time() - img.mounted_at) * 1e9)
                self._t0[ident] = t0
            return t0

    def export(self, img) -> dict:
        """The trace of mounted (or detached) image `img` as a JSON-able dict."""
        now_ns = time.monotonic_ns()
        t0 = self._mount_time(img)
        chunks: dict[tuple[int, int], tuple[int, Any]] = {}  # (blob, uoff) -> (t, chunk)
        complete, open_blobs = [], []
        for bi, key in enumerate(img.blob_keys):
            mgr = self._d.blobs.get(key)
            if mgr is None:
                continue
            open_blobs.append(bi)
            # not what was read through another image before this one was mounted
            firsts = self.first_accesses(key, mgr, since=t0)
            if not firsts and mgr.complete():
                complete.append(img.blob_ids[bi])
            for idx, t in firsts.items():
                c = mgr.meta.chunk_by_index(idx)
                chunks[(bi, c.uncompressed_offset)] = (t, c)
        wanted: dict[int, set[int]] = {}
        for bi, uoff in chunks:
            wanted.setdefault(bi, set()).add(uoff)
        owners = chunk_owners(img.bootstrap, wanted)
        entries: dict[int, dict] = {}          # nid -> entry, in first-access order
        unattributed = []
        for (bi, uoff), (t, c) in sorted(chunks.items(), key=lambda kv: (kv[1][0], kv[0])):
            rec = {"blob": bi, "uncompressed_offset": uoff,
                   "uncompressed_size": c.uncompressed_size,
                   "compressed_offset": c.compressed_offset,
                   "compressed_size": c.compressed_size,
                   "first_access": round((t - t0) / 1e9, 6)}
            cands = sorted(owners.get((bi, uoff), ()))
            if not cands:
                unattributed.append(rec)
                continue
            path, nid, fo = next((o for o in cands if o[1] in entries), cands[0])
            e = entries.get(nid)
            if e is None:
                e = entries[nid] = {"path": path, "inode": nid,
                                    "first_access": rec["first_access"], "chunks": []}
            e["chunks"].append(dict(rec, file_offset=fo))
        out = []
        for e in entries.values():
            ranges: list[list[int]] = []
            for c in sorted(e["chunks"], key=lambda c: c["file_offset"]):
                if ranges and ranges[-1][0] + ranges[-1][1] == c["file_offset"]:
                    ranges[-1][1] += c["uncompressed_size"]
                else:
                    ranges.append([c["file_offset"], c["uncompressed_size"]])
            e["file_ranges"] = ranges
            out.append(e)
        return {"version": TRACE_VERSION,
                "image": {"mountpoint": img.mountpoint, "bootstrap": img.source_bootstrap,
                          "blobs": list(img.blob_ids), "mounted_at": img.mounted_at,
                          "state": img.state},
                "recorded_for": round((now_ns - t0) / 1e9, 3),
                "complete_blobs": complete,
                "entries": out, "unattributed": unattributed}


def find_image(images: list, mountpoint: str | None = None,
               bootstrap: str | None = None):
    """The one image mounted at `mountpoint` or from `bootstrap` (the path given at
    mount, or the daemon's copy); None if there is none."""
    for img in images:
        if mountpoint is not None and img.mountpoint == os.path.realpath(mountpoint):
            return img
        if bootstrap is not None and os.path.realpath(bootstrap) in (
                os.path.realpath(img.source_bootstrap), img.bootstrap):
            return img
    return None
