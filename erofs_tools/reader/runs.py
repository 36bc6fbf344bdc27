"""The data runs of an image's regular files: where each file's data lies contiguous in
the blobs (a whole file, or a piece between deduplicated chunks that live elsewhere), for
the daemon's file-aware readahead (fscache_daemon/storage/image.py file_runs).

One walk of the tree in the C core (csrc/fileruns.c, the GIL released: ~1 s of Python
CPU for a 50,000-file bootstrap became a few milliseconds); the reader's own walk
(Image.walk, map_data) where the tree holds something the C walk leaves to it (an entry
the reader refuses: it skips that one and goes on).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

from erofs_tools._native_runs import file_runs_lists, file_runs_raw
from erofs_tools.errors import ErofsToolsError

Runs = tuple[list[bytes], list[tuple[int, int, int, int]]]


def data_runs(img, max_inodes: int = 1 << 22, pause_every: int = 0) -> Runs:
    """(paths, runs): the regular files of open image `img` whose data lies in a blob,
    in walk order, a file at its first link, at most `max_inodes` regular files walked;
    runs are (file number in paths, blob index: device - 1, start, end), uncompressed
    offsets, in that order too. Unreadable entries are skipped. `pause_every`: the
    reader's walk (the fallback) lets other threads run every that many files."""
    return data_runs_later(img, max_inodes, pause_every)()


def data_runs_later(img, max_inodes: int = 1 << 22, pause_every: int = 0
                    ) -> Callable[[], Runs]:
    """data_runs in two steps: the walk now (the C core's, the GIL released), its Python
    lists when the function returned is called (a caller working beside other threads
    makes them when those are done). The fallback walk is done whole now."""
    # (the C walk knows the usual layout only: the 48-bit one's and the metabox's are
    # the reader's)
    raw = None if img.is_48bit or img.metabox is not None else file_runs_raw(
        img.data, img.meta_off, img.blkszbits, img.root_nid, img.device_id_mask,
        len(img.devices), max_inodes)
    if img._flags[img._slot]:           # the walk read after the image file shrank
        raise img._torn()
    if raw is not None:
        return functools.partial(file_runs_lists, *raw)
    found = _reader_runs(img, max_inodes, pause_every)
    return lambda: found


def _reader_runs(img, max_inodes: int, pause_every: int) -> Runs:
    paths: list[bytes] = []
    runs: list[tuple[int, int, int, int]] = []
    seen: set[int] = set()
    for p, _d, ino in img.walk(on_error=lambda _p, _e: None):
        if len(seen) >= max_inodes:
            break
        if pause_every and len(seen) % pause_every == 0:
            time.sleep(0)
        if not ino.is_reg() or ino.nid in seen:
            continue
        seen.add(ino.nid)
        mine: list[tuple[int, int, int, int]] = []
        cur = None
        f = len(paths)
        try:
            for _fo, length, device, phys in img.map_data(ino):
                if not device or device < 0:     # the image's own, or the metabox's
                    continue
                if cur and cur[0] == device - 1 and cur[2] == phys:
                    cur[2] = phys + length
                    continue
                if cur:
                    mine.append((f, cur[0], cur[1], cur[2]))
                cur = [device - 1, phys, phys + length]
        except ErofsToolsError:
            continue
        if cur:
            mine.append((f, cur[0], cur[1], cur[2]))
        if mine:
            paths.append(p)
            runs.extend(mine)
    return paths, runs
