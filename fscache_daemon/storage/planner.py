"""Fetch planning: a requested byte range of a blob's uncompressed address space becomes
whole chunks, cached chunks are skipped, and neighbours whose compressed bytes are
adjacent in the blob are merged into one backend request of at most `batch_size` bytes
(a single chunk larger than that still makes one request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erofs_tools.fsutil import round_up

DEFAULT_BATCH_SIZE = 1 << 20
# a request grown by overlapping (zran) ranges stops here: a reader whose chunk is in a
# readahead request waits for all of it (ML start on the link: 8 MiB let 13 reads wait
# 1.24 s in all, against 0.20 s for the converted image's 1 MiB requests); the next
# request starts at its access point, inside this one, and fetches that overlap again
OVERLAP_MAX = 2 << 20
BLOCK = 4096


@dataclass
class Batch:
    """One backend request: `[offset, offset + length)` of the stored blob, holding
    `chunks` (sorted by compressed offset)."""
    chunks: list = field(default_factory=list)
    fetched: int | None = None  # bytes the backend delivered, if not all (storage/rawkeep.py)

    @property
    def offset(self) -> int:
        return self.chunks[0].compressed_offset

    @property
    def end(self) -> int:
        # chunks of a zran blob share their access point's compressed range
        return max(c.compressed_offset + c.compressed_size for c in self.chunks)

    @property
    def length(self) -> int:
        return self.end - self.offset

    def slice_of(self, raw: bytes, chunk) -> bytes | memoryview:
        start = chunk.compressed_offset - self.offset
        # a zran chunk gets the rest of the request from its access point on: the
        # decoder inflates the context once for every chunk those bytes complete
        size = len(raw) - start if getattr(chunk, "zran_index", -1) >= 0 \
            else chunk.compressed_size
        if start == 0 and size == len(raw):
            return raw
        # a view, not a copy: the decoder reads it in place
        return memoryview(raw)[start:start + size]


def clamp_range(offset: int, length: int, size: int) -> tuple[int, int]:
    """Align [offset, offset+length) outward to 4 KiB and clamp it to [0, size)."""
    if offset < 0 or length < 0:
        raise ValueError(f"bad range {offset}+{length}")
    start = offset - offset % BLOCK
    end = min(size, round_up(offset + length, BLOCK))
    if start >= end:
        return start, 0
    return start, end - start


def chunks_in_range(meta, offset: int, length: int) -> list:
    """Every chunk whose block-aligned extent overlaps the range (whole chunks)."""
    if length <= 0:
        return []
    return list(meta.chunks_for_range(offset, length))


def plan(chunks, batch_size: int = DEFAULT_BATCH_SIZE, max_gap: int = 0) -> list[Batch]:
    """Group `chunks` (any order; duplicates dropped) into backend requests.

    Two chunks share a request when the second starts at most `max_gap` bytes after the
    first ends in the stored blob and the request stays within `batch_size`.
    """
    seen = set()
    ordered = []
    for c in sorted(chunks, key=lambda c: (c.compressed_offset, c.index)):
        if c.index in seen:
            continue
        seen.add(c.index)
        ordered.append(c)
    batches: list[Batch] = []
    cur: Batch | None = None
    for c in ordered:
        if cur is not None:
            end = cur.end
            gap = c.compressed_offset - end
            c_end = c.compressed_offset + c.compressed_size
            # inside the request already (zran: same access point), or next to it
            # zran: a chunk's range starts at its access point, often inside the request
            # (the previous chunk's range): fetching the union costs fewer bytes than
            # fetching the overlap twice, up to OVERLAP_MAX per request
            if c_end <= end or c.compressed_offset == cur.offset or \
                    (gap <= max_gap and c_end - cur.offset <= batch_size) or \
                    (gap < 0 and c_end - cur.offset <= max(batch_size, OVERLAP_MAX)):
                cur.chunks.append(c)
                continue
        cur = Batch([c])
        batches.append(cur)
    return batches


def tasks_of(batches, task_bytes: int) -> list[list]:
    """A window's planned backend requests grouped into tasks of about `task_bytes`
    stored bytes each (lists of chunks): the daemon's readahead tasks."""
    tasks: list[list] = []
    size = task_bytes
    for b in batches:
        if size >= task_bytes:
            tasks.append([])
            size = 0
        tasks[-1] += b.chunks
        size += b.length
    return tasks
