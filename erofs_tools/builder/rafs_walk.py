"""The directory source of `erofs-tools pack`: the mkfs walker feeding the C node-graph
builder, with each regular file recorded or handed to the chunker instead of being given
file data (WalkFeed: the walk on its own thread, overlapping chunking); the prefetch
list's paths and the order of its files."""
from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from erofs_tools._native import BuildOptions, BytesLike, NativeBuilder
from erofs_tools._native_walk import FileWalk
from erofs_tools.builder import tree
from erofs_tools.builder.chunker import FileItem
from erofs_tools.builder.options import MkfsOptions
from erofs_tools.builder.tree import TreeWalker
from erofs_tools.errors import InputError

if TYPE_CHECKING:
    from _typeshed import StrPath


class _FileRec:
    """A regular file to chunk: its (smallest, for hardlinks) path, size, holes."""
    __slots__ = ("path", "size", "sparse")

    def __init__(self, path: bytes, size: int, sparse: bool) -> None:
        self.path = path
        self.size = size
        self.sparse = sparse


class NodeSet:
    """A set of node ids (small dense ints) as one byte per node: for /usr/share's 48k
    regular files 56 KB instead of a set's ~3.5 MiB (its table and an int per node)."""
    __slots__ = ("_bits", "_n")

    def __init__(self, nodes: Iterable[int] = ()) -> None:
        self._bits = bytearray()
        self._n = 0
        for n in nodes:
            self.add(n)

    def add(self, node: int) -> None:
        bits = self._bits
        if node >= len(bits):
            bits.extend(bytes(node + 1 - len(bits) + (len(bits) >> 1)))
        if not bits[node]:
            bits[node] = 1
            self._n += 1

    def add_many(self, nodes: list[int]) -> None:
        """add() each of `nodes` (not in the set yet or not, any order): the table grown
        once, then one byte set per node."""
        bits = self._bits
        lo, top = min(nodes), max(nodes)
        if top >= len(bits):
            bits.extend(bytes(top + 1 - len(bits) + (len(bits) >> 1)))
        before = bits.count(1, lo, top + 1)
        for node in nodes:
            bits[node] = 1
        self._n += bits.count(1, lo, top + 1) - before

    def __contains__(self, node: object) -> bool:
        return isinstance(node, int) and 0 <= node < len(self._bits) \
            and self._bits[node] == 1

    def __iter__(self) -> Iterator[int]:
        bits = self._bits
        i = bits.find(1)
        while i >= 0:
            yield i
            i = bits.find(1, i + 1)

    def __len__(self) -> int:
        return self._n

    def without(self, others: bytes | bytearray) -> Iterator[int]:
        """The nodes of the set whose byte in `others` (one per node) is 0 or past its
        end, ascending: masked as big ints, 8 KiB of nodes at a time (a bound on the
        copies: the whole set at once was ~0.4 MiB more of pack none's peak), then
        found a byte search at a time, instead of a generator step and a lookup per node
        (the regular files without chunks, in the bootstrap's single-threaded tail:
        ~7 ms of a /usr/share pack for 48k files, a few hundred of them empty)."""
        bits = self._bits
        step = 8192
        for start in range(0, len(bits), step):
            part = bits[start:start + step]
            n = len(part)
            mask = bytes(others[start:start + n]).ljust(n, b"\0")
            left = (int.from_bytes(part, "little") & ~int.from_bytes(mask, "little")
                    ).to_bytes(n, "little")
            i = left.find(1)
            while i >= 0:
                yield start + i
                i = left.find(1, i + 1)


def normalize_prefetch(paths: Iterable[str | bytes] | None) -> list[bytes]:
    """Image paths -> unique relative byte paths in first-seen order (b"" = root)."""
    out: list[bytes] = []
    seen: set[bytes] = set()
    for p in paths or ():
        rel = os.fsencode(p).strip()
        if not rel:
            continue
        if not rel.startswith(b"/"):
            raise InputError(f"prefetch path {os.fsdecode(rel)} is not absolute")
        parts = [x for x in rel.split(b"/") if x and x != b"."]
        if b".." in parts:
            raise InputError(f"prefetch path {os.fsdecode(rel)} contains '..'")
        rel = b"/".join(parts)
        if rel not in seen:
            seen.add(rel)
            out.append(rel)
    return out


def prefetch_order(walker: RafsWalker, prefetch: list[bytes]) -> tuple[list[int], list[int]]:
    """-> (nodes for the prefetch table, regular nodes in prefetch order)."""
    table: list[int] = []
    files: list[int] = []
    seen_t: set[int] = set()
    seen_f: set[int] = set()
    if not prefetch:
        return table, files
    rel_items = None
    for rel in prefetch:
        node = walker.nodes_by_rel.get(rel)
        if node is None:
            raise InputError(f"prefetch path /{os.fsdecode(rel)} is not in the source tree")
        if node not in seen_t:
            seen_t.add(node)
            table.append(node)
        if node in walker.regular:
            if node not in seen_f:
                seen_f.add(node)
                files.append(node)
            continue
        if rel_items is None:
            rel_items = sorted(walker.nodes_by_rel.items())
        prefix = rel + b"/" if rel else b""
        for r, n in rel_items:
            if r.startswith(prefix) and n in walker.regular and n not in seen_f:
                seen_f.add(n)
                files.append(n)
    return table, files


class _RafsBuilder(NativeBuilder):
    """NativeBuilder whose regular files are recorded for chunking, not copied."""

    def __init__(self, options: BuildOptions | None) -> None:
        super().__init__(options)
        self.files: dict[int, _FileRec] = {}          # node -> regular file
        self.keep_files = True          # False: the walker streams files, none kept
        self._xattr_count = 0

    def set_file(self, node: int, path: BytesLike, offset: int = 0,
                 sparse: bool = False) -> None:
        if self.keep_files:
            p = os.fsencode(path) if isinstance(path, str) else bytes(path)
            self.files[node] = _FileRec(p, 0, bool(sparse))     # size: set by the walker


class RafsWalker(TreeWalker):
    """The mkfs walker, remembering regular files, every path's node and hardlinks."""

    def __init__(self, builder: _RafsBuilder, options: MkfsOptions, source: StrPath,
                 track_paths: bool = False,
                 on_entry: Callable[[int, int], object] | None = None) -> None:
        super().__init__(builder, options, on_entry=on_entry)
        self.src = os.fsencode(source).rstrip(b"/") or b"/"
        self.track_paths = track_paths   # only the prefetch list needs path -> node
        self.b: _RafsBuilder = builder
        self.nodes_by_rel: dict[bytes, int] = {}       # b"a/b" -> node
        self.regular = NodeSet()
        # set: each regular file with data goes here as (node, path, size, sparse)
        # when the walk meets it (first path of a hardlinked file), instead of b.files
        self.emit: Callable[[FileItem], None] | None = None
        # set too: the C walk hands each step's files with data in one call
        self.emit_many: Callable[[list[FileItem]], None] | None = None

    # entries per step of the C walk: its files come back per step, so this bounds what
    # the walk holds beyond the feed's queue
    STEP = 256

    @property
    def has_xattrs(self) -> bool:
        return getattr(self.b, "_xattr_count", 0) > 0

    def walk(self, source: str | bytes) -> int:
        """Walk `source`; when streaming files without per-path records (no prefetch
        list) and without per-entry choices, in the C core (csrc/walk.c: the same nodes
        in the same order, without Python per entry, the GIL released meanwhile)."""
        emit = self.emit
        if (emit is None or self.track_paths or not tree.NATIVE_WALK or self.skip
                or self.hints or self.digest or self.excl_paths or self.excl_regex):
            return super().walk(source)
        fw = FileWalk(self.b, source, fixed_mtime=self.fixed_mtime,
                      force_uid=self.force_uid, force_gid=self.force_gid,
                      clamp_mtime=self.clamp_mtime)
        regular = self.regular
        emit_many = self.emit_many
        try:
            while True:
                items = fw.step(self.STEP)
                if items:
                    regular.add_many([item[0] for item in items])
                if emit_many is not None:
                    # the feed's: the step's files with data in one call, not one each
                    emit_many([item for item in items if item[2]])
                else:
                    for item in items:
                        if item[2]:
                            emit(item)
                self.entries, self.bytes = fw.entries, fw.bytes
                if self.on_entry is not None:
                    self.on_entry(self.entries, self.bytes)
                if fw.done:
                    break
            self.b._xattr_count = fw.xattrs
            return fw.root
        finally:
            fw.close()

    def _rel(self, path: str | bytes) -> bytes:
        p = os.fsencode(path)
        if p == self.src:
            return b""
        return p[len(self.src) + 1:] if self.src != b"/" else p[1:]

    def _add(self, path: bytes, st: os.stat_result, rel: bytes = b"") -> int:
        node = super()._add(path, st, rel)
        if self.track_paths:
            self.nodes_by_rel[self._rel(path)] = node
        if st.st_mode & 0o170000 == stat.S_IFREG:
            self.regular.add(node)
            if self.emit is not None:
                size = st.st_size
                if size:
                    self.emit((node, path, size, st.st_blocks * 512 < size))
                return node
            rec = self.b.files.get(node)
            if rec is None:
                self.b.files[node] = _FileRec(os.fsencode(path), st.st_size, False)
            else:
                rec.size = st.st_size
        return node

    def _link(self, dnode: int, name: bytes, node: int, path: bytes) -> None:
        super()._link(dnode, name, node, path)
        if self.track_paths:
            self.nodes_by_rel[self._rel(path)] = node
        if self.emit is not None:
            return              # streamed already, under the path met first
        p = os.fsencode(path)
        rec = self.b.files.get(node)
        if rec is not None and p < rec.path:
            rec.path = p         # order hardlinked files by their smallest path


class BootstrapNodes(_RafsBuilder):
    """The node graph of a RAFS v6 bootstrap (the C builder), counting xattrs so that
    write_bootstrap can set the HAS_XATTR flag."""

    def add_xattr(self, node: int, name: BytesLike, value: BytesLike) -> None:
        super().add_xattr(node, name, value)
        self._xattr_count = getattr(self, "_xattr_count", 0) + 1


class _Stopped(Exception):
    """The consumer of a WalkFeed gave up: the walk thread ends here."""


class WalkFeed:
    """The directory walk on its own thread, handing regular files to the chunker as it
    meets them, so chunking (and writing the blob) overlaps the walk.

    The walk visits the tree depth first, each directory in name order (TreeWalker), so
    the file order, hence the blob, is the same whatever the filesystem's readdir order.
    The walker only calls the node-graph builder; the consumer does not touch it until
    `close()` has joined the thread.
    """
    GROUP = 64          # files handed over at a time (fewer queue operations)
    AHEAD = 16          # groups the walk may be ahead of the chunker: the walk is faster,
                        # unbounded it queued every file of the tree (~8 MiB for 48k)

    def __init__(self, walker: RafsWalker, source: str) -> None:
        self.walker = walker
        self.source = source
        self._q: queue.Queue[list[FileItem] | BaseException | None] = \
            queue.Queue(self.AHEAD)
        self._group: list[FileItem] = []
        self._stop = False
        walker.b.keep_files = False
        walker.emit = self._emit
        walker.emit_many = self._emit_many
        walker.on_entry = self._check
        self._thread = threading.Thread(target=self._walk, name="erofs-pack-walk",
                                        daemon=True)
        self._thread.start()

    def _check(self, entries: int, nbytes: int) -> None:
        if self._stop:
            raise _Stopped

    def _emit(self, item: FileItem) -> None:
        g = self._group
        g.append(item)
        if len(g) >= self.GROUP:
            self._group = []
            if not self._put(g):
                raise _Stopped

    def _emit_many(self, items: list[FileItem]) -> None:
        g = self._group
        g += items
        while len(g) >= self.GROUP:
            self._group = g[self.GROUP:]
            del g[self.GROUP:]
            if not self._put(g):
                raise _Stopped
            g = self._group

    def _put(self, item: list[FileItem] | BaseException | None) -> bool:
        """Queue `item`, waiting for room; False if the consumer stopped meanwhile."""
        while not self._stop:
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _walk(self) -> None:
        try:
            self.walker.walk(self.source)
            if self._group:
                self._put(self._group)
            self._put(None)
        except _Stopped:
            pass
        except BaseException as e:      # raised again in the consumer's thread
            self._put(e)

    def files(self) -> Iterator[FileItem]:
        """Regular files in walk order; raises what the walk raised."""
        while True:
            g = self._q.get()
            if g is None:
                return
            if isinstance(g, BaseException):
                raise g
            yield from g

    def close(self) -> None:
        """Stop the walk (if still going) and wait for its thread."""
        self._stop = True
        self._thread.join()
