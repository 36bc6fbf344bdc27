"""Tar layers as a tree source: `erofs-tools pack --type tar|targz SOURCE`.

The tar stream (a file or stdin, plain or gzip) is read once, front to back, by a small
parser of our own (so every size is bounded before anything is allocated) and never
extracted: entries build an in-memory tree (`TarTree`), regular file data is cut into
chunks as it streams past and handed to the chunk pipeline (hash + compress in worker
threads, then the blob writer), and when the stream ends the tree is emitted into the C
node-graph builder exactly like the directory walk does for `pack`, with chunk indexes
from the chunks stored. Nothing of the layer is written to disk except the blob.

Formats: v7, ustar (prefix), GNU (long names 'L'/'K', base-256 numbers, old sparse 'S'
with extension headers, dumpdir 'D'), POSIX PAX ('x' and global 'g' records: path,
linkpath, size, uid, gid, mtime with fraction, SCHILY.xattr.*, LIBARCHIVE.xattr.*,
SCHILY.devmajor/devminor, GNU sparse 0.0, 0.1 and 1.0). Sparse holes are never
materialized: a chunk lying entirely in a hole is a zero chunk whose digest is computed
once (and deduplicated like every chunk).

Hostile input (see docs/tar.md): leading '/' and '.' components are dropped, '..' is an
error, paths never traverse symlinks or files (error), duplicate entries: the later one
wins (a directory over a directory updates its metadata and keeps the children),
hardlinks must name an earlier non-directory entry, truncated streams and bad
checksums are errors, and the bytes read from the (decompressed) stream are bounded by
`max_size`, so a gzip bomb ends with an error instead of filling memory or disk.

Whiteouts (`whiteout_spec`): "oci" turns `.wh.NAME` into an overlayfs whiteout (char
device 0:0 NAME, unless NAME itself is in the same layer, which the OCI spec says wins)
and `.wh..wh..opq` into `trusted.overlay.opaque=y` on its directory; other `.wh..wh.*`
entries (aufs metadata) are dropped. "overlayfs" and "none" keep every entry as it is.
"""
import os
import stat
import sys
import time
import zlib
import base64
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from erofs_tools._native import BuildOptions
from erofs_tools.builder.blob import BLKSZ, BlobWriter
from erofs_tools.builder.chunk_dict import ChunkDict
from erofs_tools.builder.chunker import (BATCH_BYTES, BATCH_CHUNKS, Compressor,
                                         check_chunk_size, digest_function)
from erofs_tools.builder.whiteout import OPAQUE_VALUE, OPAQUE_XATTR, classify
from erofs_tools.errors import ErofsToolsError, FormatLimitError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R

WHITEOUT_SPECS = ("oci", "overlayfs", "none")
SOURCE_TYPES = ("tar", "targz", "tarzst", "auto")
BLOCK = 512
MAX_META = 16 << 20            # PAX header / GNU long name / sparse map bytes per entry
MAX_NAME = 64 << 10            # path and link target length
MAX_SPARSE_REGIONS = 1 << 20
DEFAULT_MAX_SIZE = 1 << 40     # bytes read from the (decompressed) stream, 1 TiB
MAX_SYMLINK = 4095


def _err(msg):
    return InputError(msg)


class _Name:
    """An entry name shown in a message only when one is raised (escaping costs)."""
    __slots__ = ("b",)

    def __init__(self, b):
        self.b = b

    def __str__(self):
        return _show(self.b)

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def _show(path, limit=300):
    """A name for a one-line message: undecodable bytes and control characters
    escaped, long names cut."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
    return out if len(out) <= limit else out[:limit] + "..."


# --- input streams -------------------------------------------------------------------

class _Gunzip:
    """read(n) -> up to n decompressed bytes of a (multi-member) gzip stream."""

    def __init__(self, f):
        self.f = f
        self.d = zlib.decompressobj(31)
        self.tail = b""
        self.fed = False
        self.done = False

    def read(self, n):
        n = max(n, 1)
        while not self.done:
            inp = self.tail
            if not inp:
                inp = self.f.read(256 << 10)
                if not inp:
                    if self.fed:
                        raise _err("truncated gzip stream")
                    self.done = True
                    break
            if not self.fed:
                if self.d_is_padding(inp):
                    self.tail = b""
                    continue
                self.fed = True
            try:
                out = self.d.decompress(inp, n)
            except zlib.error as e:
                raise _err(f"bad gzip data: {e}") from None
            self.tail = self.d.unconsumed_tail
            if self.d.eof:           # next member (or padding / end)
                rest = self.d.unused_data
                self.d = zlib.decompressobj(31)
                self.fed = False
                self.tail = rest
            if out:
                return out
        return b""

    @staticmethod
    def d_is_padding(inp):
        return not inp.strip(b"\0")


class _Unzstd:
    def __init__(self, f):
        import zstandard
        self.r = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)

    def read(self, n):
        try:
            return self.r.read(max(n, 1))
        except Exception as e:        # zstandard.ZstdError
            raise _err(f"bad zstd data: {e}") from None


class _Prefetch:
    """Run a decompressing stream on its own thread (zlib and zstd release the GIL), a
    few 1 MiB pieces ahead of the parser; read(n) -> up to n bytes."""

    PIECE = 1 << 20

    def __init__(self, inner, depth=8):
        import queue
        import threading
        self.q = queue.Queue(maxsize=depth)
        self.buf = b""
        self.pos = 0
        self.done = False
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(inner,), daemon=True,
                                  name="erofs-untar-inflate")
        self.t.start()

    def _run(self, inner):
        import queue
        try:
            while not self.stop.is_set():
                piece = inner.read(self.PIECE)
                item = piece
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if not piece:
                    return
        except BaseException as e:
            try:
                self.q.put(e, timeout=5)
            except Exception:
                pass

    def read(self, n):
        if self.pos >= len(self.buf):
            if self.done:
                return b""
            item = self.q.get()
            if isinstance(item, BaseException):
                self.done = True
                if isinstance(item, ErofsToolsError):
                    raise item
                raise InputError(f"cannot read the tar stream: {item}") from None
            if not item:
                self.done = True
                return b""
            self.buf, self.pos = item, 0
        out = self.buf[self.pos:self.pos + n] if (self.pos or n < len(self.buf)) else self.buf
        self.pos += len(out)
        return out

    def close(self):
        self.stop.set()
        import queue
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        # wait for the thread: after close() the caller may read the underlying stream
        # itself (convert reads the rest of a layer to check its digest)
        self.t.join()


def detect_type(head):
    if head[:2] == b"\x1f\x8b":
        return "targz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "tarzst"
    return "tar"


class _Peek:
    """A raw binary stream with its first bytes peeked (for type detection)."""

    def __init__(self, f, n=4):
        self.f = f
        self.head = f.read(n)

    def read(self, n=-1):
        if self.head:
            h, self.head = self.head, b""
            if n is None or n < 0:
                return h + self.f.read()
            if n <= len(h):
                self.head = h[n:]
                return h[:n]
            return h + self.f.read(n - len(h))
        return self.f.read(n)


def open_stream(f, source_type="auto"):
    """Wrap a raw binary stream by type -> object with read(n)."""
    if source_type not in SOURCE_TYPES:
        raise InputError(f"unknown source type {source_type!r}")
    if source_type == "auto":
        f = _Peek(f)
        source_type = detect_type(f.head)
    elif source_type == "tar":
        f = _Peek(f)
        kind = detect_type(f.head)
        if kind != "tar":
            raise InputError(f"input is {'gzip' if kind == 'targz' else 'zstd'}-compressed: "
                             f"use --type {kind}")
    if source_type == "targz":
        return _Prefetch(_Gunzip(f))
    if source_type == "tarzst":
        return _Prefetch(_Unzstd(f))
    return f


class _Reader:
    """Exact reads over a stream, counting and bounding the bytes taken."""

    def __init__(self, stream, limit):
        self._read = stream.read
        self._buf = b""
        self._pos = 0
        self.offset = 0
        self.limit = limit

    def read(self, n):
        """n bytes, fewer only at the end of the stream."""
        if self.offset + n > self.limit:
            raise _err(f"tar stream is larger than the limit of {self.limit} bytes "
                       "(--max-size)")
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail >= n:
            self._pos = pos + n
            self.offset += n
            return buf[pos:pos + n] if (pos or n != len(buf)) else buf
        parts = [buf[pos:]] if avail else []
        need = n - avail
        self._buf, self._pos = b"", 0
        while need > 0:
            piece = self._read(max(need, 1 << 16))
            if not piece:
                break
            if len(piece) > need:
                parts.append(piece[:need])
                self._buf, self._pos = piece, need
                need = 0
            else:
                parts.append(piece)
                need -= len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data

    def skip(self, n, what):
        while n > 0:
            k = min(n, 1 << 20)
            if len(self.read(k)) != k:
                raise _err(f"truncated tar stream in {what}")
            n -= k


# --- tar headers ---------------------------------------------------------------------

def _num(field, what):
    if field and field[0] & 0x80:                 # GNU base-256
        v = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            v -= 1 << (8 * (len(field) - 1))
        elif field[0] != 0x80:
            v |= (field[0] & 0x7F) << (8 * (len(field) - 1))
        return v
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise _err(f"tar header: bad number in {what}") from None


def _cstr(b):
    return b.split(b"\0", 1)[0]


_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


class Entry:
    __slots__ = ("name", "link", "type", "mode", "uid", "gid", "mtime", "mtime_nsec",
                 "size", "devmajor", "devminor", "xattrs", "sparse", "realsize", "offset")

    def __repr__(self):
        return f"Entry({self.name!r}, {self.type!r}, size={self.size})"


def _pax_records(data, what):
    out = []
    pos, n = 0, len(data)
    while pos < n:
        if data[pos] == 0:          # padding
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise _err(f"{what}: bad PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise _err(f"{what}: bad PAX record length") from None
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1] != 0x0A:
            raise _err(f"{what}: bad PAX record")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq:
            raise _err(f"{what}: bad PAX record")
        out.append((key, value))
        pos = end
    return out


def _pax_time(value, what):
    try:
        s = value.decode("ascii")
        neg = s.startswith("-")
        whole, _, frac = s.lstrip("-").partition(".")
        sec = int(whole or "0")
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except (UnicodeDecodeError, ValueError):
        raise _err(f"{what}: bad PAX mtime {value!r}") from None
    if neg:
        return -sec - (1 if nsec else 0), (1_000_000_000 - nsec) % 1_000_000_000
    return sec, nsec


def _pax_int(value, what, key):
    try:
        return int(value)
    except ValueError:
        raise _err(f"{what}: bad PAX {key} {value!r}") from None


class TarReader:
    """Iterate entries of a tar stream; the caller consumes each entry's data
    (`read_data` / `skip_data`) before asking for the next one."""

    def __init__(self, stream, max_size=DEFAULT_MAX_SIZE):
        self.r = _Reader(stream, max_size)
        self.globals = []
        self._left = 0            # data bytes of the current entry not consumed yet
        self._pad = 0
        self._cur = None
        self.count = 0

    def _block(self, what):
        b = self.r.read(BLOCK)
        if len(b) != BLOCK:
            if not b and what is None:
                return None
            raise _err(f"truncated tar stream at byte {self.r.offset - len(b)}"
                       + (f" ({what})" if what else ""))
        return b

    def _meta(self, size, what):
        if size < 0 or size > MAX_META:
            raise _err(f"{what}: {size} bytes of metadata is over the limit")
        data = self.r.read(size)
        if len(data) != size:
            raise _err(f"truncated tar stream in {what}")
        pad = -size % BLOCK
        if pad and len(self.r.read(pad)) != pad:
            raise _err(f"truncated tar stream in {what}")
        return data

    def _finish_current(self):
        if self._cur is not None:
            what = _Name(self._cur.name)
            if self._left:
                self.r.skip(self._left, what)
            if self._pad:
                self.r.skip(self._pad, what)
            self._left = self._pad = 0
            self._cur = None

    def read_data(self, n):
        """Next n bytes of the current entry's data (exactly n, or an error)."""
        if n > self._left:
            raise _err(f"{_show(self._cur.name)}: sparse map points past the entry's data")
        data = self.r.read(n)
        if len(data) != n:
            raise _err(f"truncated tar stream in {_show(self._cur.name)}")
        self._left -= n
        return data

    def __iter__(self):
        return self

    def __next__(self):
        self._finish_current()
        pax = []
        longname = longlink = None
        start = None
        while True:
            hdr = self._block(None if start is None and not pax and longname is None
                              and longlink is None else "header")
            if start is None:
                start = self.r.offset - BLOCK if hdr is not None else self.r.offset
            if hdr is None:
                raise StopIteration
            if hdr == bytes(BLOCK):
                if pax or longname is not None or longlink is not None:
                    raise _err("tar stream ends after an extended header")
                raise StopIteration          # end-of-archive (second zero block unread)
            chk = _num(hdr[148:156], "checksum")
            s = sum(hdr[:148]) + 256 + sum(hdr[156:])
            if chk != s and chk != s - 256 * sum(1 for b in hdr[:148] + hdr[156:] if b > 127):
                raise _err(f"tar header at byte {self.r.offset - BLOCK}: bad checksum "
                           "(not a tar stream, or corrupt)")
            t = hdr[156:157]
            size = _num(hdr[124:136], "size")
            if size < 0:
                raise _err(f"tar header at byte {self.r.offset - BLOCK}: negative size")
            if t == b"x":
                pax.extend(_pax_records(self._meta(size, "PAX header"), "PAX header"))
                continue
            if t == b"g":
                self.globals.extend(_pax_records(self._meta(size, "PAX global header"),
                                                 "PAX global header"))
                continue
            if t == b"L":
                longname = _cstr(self._meta(size, "GNU long name"))
                continue
            if t == b"K":
                longlink = _cstr(self._meta(size, "GNU long link"))
                continue
            return self._entry(hdr, t, size, pax, longname, longlink, start)

    def _entry(self, hdr, t, size, pax, longname, longlink, start):
        e = Entry()
        e.offset = start
        magic = hdr[257:265]
        name = _cstr(hdr[0:100])
        if magic == b"ustar\x0000" or (magic[:6] == b"ustar\0"):
            prefix = _cstr(hdr[345:500])
            if prefix:
                name = prefix + b"/" + name
        gnu = magic == b"ustar  \0"
        e.name = longname if longname is not None else name
        e.link = longlink if longlink is not None else _cstr(hdr[157:257])
        e.type = t
        e.mode = _num(hdr[100:108], "mode") & 0o7777
        e.uid = _num(hdr[108:116], "uid")
        e.gid = _num(hdr[116:124], "gid")
        e.mtime = _num(hdr[136:148], "mtime")
        e.mtime_nsec = 0
        e.size = size
        e.devmajor = _num(hdr[329:337], "devmajor") if t in (b"3", b"4") else 0
        e.devminor = _num(hdr[337:345], "devminor") if t in (b"3", b"4") else 0
        e.xattrs = {}
        e.sparse = None
        e.realsize = size
        what = _Name(e.name)
        if gnu and t == b"S":
            e.realsize = _num(hdr[483:495], "realsize")
            regions = self._gnu_sparse(hdr[386:386 + 96], 4)
            ext = hdr[482]
            while ext:
                b = self._block(f"sparse header of {what}")
                regions += self._gnu_sparse(b[:504], 21)
                if len(regions) > MAX_SPARSE_REGIONS:
                    raise _err(f"{what}: too many sparse regions")
                ext = b[504]
            e.sparse = regions
        sp_major = sp_realsize = None
        sp_off = []
        for key, value in self.globals + pax:
            if key == b"path":
                e.name = value
            elif key == b"linkpath":
                e.link = value
            elif key == b"size":
                e.size = _pax_int(value, what, "size")
                e.realsize = e.size
            elif key == b"uid":
                e.uid = _pax_int(value, what, "uid")
            elif key == b"gid":
                e.gid = _pax_int(value, what, "gid")
            elif key == b"mtime":
                e.mtime, e.mtime_nsec = _pax_time(value, what)
            elif key.startswith(b"SCHILY.xattr."):
                e.xattrs[key[13:]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                try:
                    n = urllib.parse.unquote_to_bytes(key[17:])
                    e.xattrs[n] = base64.b64decode(value + b"=" * (-len(value) % 4))
                except ValueError:
                    raise _err(f"{what}: bad LIBARCHIVE.xattr record") from None
            elif key == b"SCHILY.devmajor":
                e.devmajor = _pax_int(value, what, "devmajor")
            elif key == b"SCHILY.devminor":
                e.devminor = _pax_int(value, what, "devminor")
            elif key.startswith(b"GNU.sparse."):
                k = key[11:]
                if k == b"major":
                    sp_major = _pax_int(value, what, key.decode())
                elif k == b"name":
                    e.name = value
                elif k in (b"size", b"realsize"):
                    sp_realsize = _pax_int(value, what, key.decode())
                    if e.sparse is None:
                        e.sparse = []
                elif k == b"offset":
                    sp_off.append([_pax_int(value, what, "sparse offset"), None])
                elif k == b"numbytes":
                    if not sp_off or sp_off[-1][1] is not None:
                        raise _err(f"{what}: bad GNU sparse 0.0 map")
                    sp_off[-1][1] = _pax_int(value, what, "sparse numbytes")
                elif k == b"map":
                    try:
                        nums = [int(x) for x in value.split(b",")] if value else []
                    except ValueError:
                        raise _err(f"{what}: bad GNU.sparse.map") from None
                    if len(nums) % 2 or len(nums) > 2 * MAX_SPARSE_REGIONS:
                        raise _err(f"{what}: bad GNU.sparse.map")
                    e.sparse = [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]
        what = _Name(e.name)
        if sp_off:
            if any(n is None for _, n in sp_off):
                raise _err(f"{what}: bad GNU sparse 0.0 map")
            e.sparse = [tuple(x) for x in sp_off]
        if e.size < 0:
            raise _err(f"{what}: negative size")
        if sp_realsize is not None:
            e.realsize = sp_realsize
        self._cur = e
        # links, devices, fifos and directories carry no data (their size field is
        # ignored, as tar -x does); every other type, known or not, has e.size bytes
        self._left = 0 if t in _NO_DATA else e.size
        self._pad = -self._left % BLOCK if self._left else 0
        if sp_major == 1:
            self._sparse_1_0(e, what)
        if e.sparse is not None:
            self._check_sparse(e, what)
        if len(e.name) > MAX_NAME or len(e.link) > MAX_NAME:
            raise _err(f"{what}: name longer than {MAX_NAME} bytes")
        self.count += 1
        return e

    def _gnu_sparse(self, raw, n):
        out = []
        for i in range(n):
            off = _num(raw[24 * i:24 * i + 12], "sparse offset")
            num = _num(raw[24 * i + 12:24 * i + 24], "sparse numbytes")
            if off == 0 and num == 0 and not raw[24 * i:24 * i + 24].strip(b"\0"):
                continue
            out.append((off, num))
        return out

    def _sparse_1_0(self, e, what):
        """PAX sparse 1.0: the map is at the start of the data, in decimal lines."""
        buf = bytearray()
        used = 0

        def line():
            # linear in the map's size: search only the new block, append in place
            nonlocal used
            scanned = 0
            while (nl := buf.find(b"\n", scanned)) < 0:
                if used >= MAX_META:
                    raise _err(f"{what}: sparse map too large")
                scanned = len(buf)
                buf.extend(self.read_data(BLOCK))
                used += BLOCK
            ln = bytes(buf[:nl])
            del buf[:nl + 1]
            try:
                return int(ln)
            except ValueError:
                raise _err(f"{what}: bad sparse 1.0 map") from None

        n = line()
        if n < 0 or n > MAX_SPARSE_REGIONS:
            raise _err(f"{what}: bad sparse 1.0 map")
        e.sparse = [(line(), line()) for _ in range(n)]
        # the map was read in whole blocks; what is left is the data proper
        e.size = self._left

    def _check_sparse(self, e, what):
        if e.realsize < 0:
            raise _err(f"{what}: negative sparse file size")
        pos = 0
        total = 0
        for off, num in e.sparse:
            if off < pos or num < 0 or off + num > e.realsize:
                raise _err(f"{what}: sparse map is not ordered or exceeds the file size")
            pos = off + num
            total += num
        if total != self._left:
            raise _err(f"{what}: sparse map covers {total} bytes but the entry holds "
                       f"{self._left}")


# --- the in-memory tree ----------------------------------------------------------------

class TNode:
    __slots__ = ("mode", "uid", "gid", "mtime", "nsec", "size", "rdev", "xattrs",
                 "target", "children", "key", "opaque")

    def __init__(self, mode, uid=0, gid=0, mtime=0, nsec=0):
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.nsec = nsec
        self.size = 0
        self.rdev = (0, 0)
        self.xattrs = {}
        self.target = None
        self.children = {} if stat.S_ISDIR(mode) else None
        self.key = None
        self.opaque = False

    def is_dir(self):
        return self.children is not None


def _split(path, what):
    parts = []
    for c in path.split(b"/"):
        if c in (b"", b"."):
            continue
        if c == b"..":
            raise _err(f"{_show(what)}: path contains '..'")
        parts.append(c)
    return parts


class TarTree:
    """Build the image tree from tar entries (see the module docstring for the rules)."""

    def __init__(self, whiteout_spec="oci", timestamp=None):
        if whiteout_spec not in WHITEOUT_SPECS:
            raise InputError(f"unknown whiteout spec {whiteout_spec!r} "
                             "(choose oci, overlayfs or none)")
        self.spec = whiteout_spec
        self.timestamp = timestamp
        t = timestamp or 0
        self.root = TNode(stat.S_IFDIR | 0o755, 0, 0, t, 0)
        self.whiteouts = []        # (parent TNode, name, Entry)
        self.next_key = 0
        self.regular = []          # TNodes with data keys
        self.entries = 0

    def _parent(self, parts, what):
        cur = self.root
        for i, c in enumerate(parts):
            nxt = cur.children.get(c)
            if nxt is None:
                nxt = TNode(stat.S_IFDIR | 0o755, 0, 0, self.timestamp or 0, 0)
                cur.children[c] = nxt
            elif not nxt.is_dir():
                kind = "a symlink" if stat.S_ISLNK(nxt.mode) else "not a directory"
                raise _err(f"{_show(what)}: parent {_show(b'/'.join(parts[:i + 1]))} is "
                           f"{kind}")
            cur = nxt
        return cur

    def _lookup(self, parts):
        cur = self.root
        for c in parts:
            if not cur.is_dir():
                return None
            cur = cur.children.get(c)
            if cur is None:
                return None
        return cur

    def _meta(self, node, e):
        node.uid, node.gid = e.uid, e.gid
        if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32):
            raise FormatLimitError(f"{_show(e.name)}: uid/gid {e.uid}/{e.gid} out of range")
        if self.timestamp is not None:
            node.mtime, node.nsec = self.timestamp, 0
        elif e.mtime < 0:
            node.mtime, node.nsec = 0, 0              # documented: clamped
        else:
            node.mtime, node.nsec = min(e.mtime, (1 << 63) - 1), e.mtime_nsec
        node.xattrs = dict(e.xattrs)

    def add(self, e):
        """Place entry e; -> TNode whose data the caller must stream (regular files),
        else None."""
        t = e.type
        if t in (b"0", b"\0", b"7") and e.name.endswith(b"/"):
            t = b"5"              # v7 / old GNU: a "file" whose name ends in '/' is a dir
        parts = _split(e.name, e.name)
        self.entries += 1
        if t in (b"V",):
            return None
        if t == b"M":
            raise _err(f"{_show(e.name)}: multi-volume archives are not supported")
        if not parts:
            if t not in (b"5", b"D"):
                raise _err(f"{_show(e.name)}: entry would replace the root directory")
            self._meta(self.root, e)
            self.root.mode = stat.S_IFDIR | e.mode
            return None
        name = parts[-1]
        if len(name) > 255:
            raise FormatLimitError(f"{_show(e.name)}: name longer than 255 bytes")
        kind, target = classify(name) if self.spec == "oci" else (None, None)
        if self.spec == "oci" and any(classify(c)[0] == "meta" for c in parts[:-1]):
            return None           # inside aufs metadata (.wh..wh.plnk/...): dropped
        if kind is not None:
            parent = self._parent(parts[:-1], e.name)
            if kind == "opaque":
                parent.opaque = True
            elif kind == "whiteout":
                self.whiteouts.append((parent, target, e))
            return None
        parent = self._parent(parts[:-1], e.name)
        old = parent.children.get(name)
        if t in (b"5", b"D"):
            if old is not None and old.is_dir():
                node = old
            else:
                node = TNode(stat.S_IFDIR | e.mode)
                parent.children[name] = node
            self._meta(node, e)
            node.mode = stat.S_IFDIR | e.mode
            return None
        if t == b"1":
            tparts = _split(e.link, e.name)
            target = self._lookup(tparts)
            if target is None:
                raise _err(f"{_show(e.name)}: hardlink target {_show(e.link)} is not in the "
                           "archive before it")
            if target.is_dir():
                raise _err(f"{_show(e.name)}: hardlink to directory {_show(e.link)}")
            parent.children[name] = target
            return None
        if t == b"2":
            if not e.link or len(e.link) > MAX_SYMLINK:
                raise _err(f"{_show(e.name)}: symlink target length {len(e.link)} "
                           f"not in 1..{MAX_SYMLINK}")
            node = TNode(stat.S_IFLNK | 0o777)
            self._meta(node, e)
            node.target = e.link
            node.size = len(e.link)
        elif t in (b"3", b"4"):
            node = TNode((stat.S_IFCHR if t == b"3" else stat.S_IFBLK) | e.mode)
            self._meta(node, e)
            if not (0 <= e.devmajor <= 0xFFF and 0 <= e.devminor <= 0xFFFFF):
                raise FormatLimitError(f"{_show(e.name)}: device number "
                                       f"{e.devmajor}:{e.devminor} out of range")
            node.rdev = (e.devmajor, e.devminor)
        elif t == b"6":
            node = TNode(stat.S_IFIFO | e.mode)
            self._meta(node, e)
        else:                         # '0', '\0', '7', 'S', and unknown (POSIX: regular)
            node = TNode(stat.S_IFREG | e.mode)
            self._meta(node, e)
            node.size = e.realsize
            node.key = self.next_key
            self.next_key += 1
            self.regular.append(node)
        parent.children[name] = node
        return node if node.key is not None else None

    def finish(self):
        """Apply OCI whiteouts and opaque markers (spec "oci")."""
        done = set()
        for parent, name, e in self.whiteouts:
            if name in parent.children or (id(parent), name) in done:
                continue          # the same layer has NAME: it wins over the whiteout
            done.add((id(parent), name))
            wh = TNode(stat.S_IFCHR)
            self._meta(wh, e)
            wh.xattrs = {}
            parent.children[name] = wh
        # opaque: set on nodes still in the tree
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n.opaque:
                n.xattrs[OPAQUE_XATTR] = OPAQUE_VALUE
            stack.extend(c for c in n.children.values() if c.is_dir())

    def emit(self, nb):
        """Add the tree to NativeBuilder nb; -> {TNode key: node id}, has_xattrs."""
        ids = {}
        keys = {}
        has_x = False

        def add(n, path):
            nonlocal has_x
            nid = ids.get(id(n))
            if nid is not None:
                return nid, False
            try:
                nid = nb.add_node(n.mode, n.uid, n.gid, n.mtime, n.nsec, n.size,
                                  n.rdev[0], n.rdev[1])
                if n.target is not None:
                    nb.set_bytes(nid, n.target)
                for k in sorted(n.xattrs):
                    nb.add_xattr(nid, k, n.xattrs[k])
                    has_x = True
            except ErofsToolsError as ex:
                raise type(ex)(f"{_show(path) or '/'}: {ex}") from None
            ids[id(n)] = nid
            if n.key is not None:
                keys[n.key] = nid
            return nid, True

        root, _ = add(self.root, b"/")
        nb.set_root(root)
        stack = [(self.root, root, b"")]
        while stack:
            d, did, dpath = stack.pop()
            for name in sorted(d.children):
                c = d.children[name]
                path = dpath + b"/" + name
                cid, new = add(c, path)
                try:
                    nb.add_child(did, name, cid)
                except ErofsToolsError as ex:
                    raise type(ex)(f"{_show(path)}: {ex}") from None
                if new and c.is_dir():
                    stack.append((c, cid, path))
        return ids, keys, has_x


# --- streaming chunk pipeline ------------------------------------------------------------

class StreamChunk:
    """One chunk of one file, in file order (the pack loop's view of a chunk)."""
    __slots__ = ("file_key", "file_offset", "size", "digest", "_stored")

    def __init__(self, file_key, file_offset, size, digest, stored):
        self.file_key = file_key
        self.file_offset = file_offset
        self.size = size
        self.digest = digest
        self._stored = stored

    @property
    def key(self):
        return (self.digest, self.size)

    def stored_bytes(self):
        data, self._stored = self._stored, None
        if data is None:
            raise RuntimeError("chunk bytes not available")
        return data


class StreamPipeline:
    """Hash and compress chunks already in memory on a thread pool; results come back
    in submission order. Items: (file_key, offset, data, length); data None = a chunk
    inside a sparse hole (zeros, never read). A chunk whose key `known()` reports is not
    compressed; two in-flight copies of a new key may both be compressed (the consumer
    keeps the first), which costs time, never correctness, since `known` only grows."""

    def __init__(self, chunk_size, digester="blake3", compressor="zstd", workers=None,
                 window=None, known=None):
        check_chunk_size(chunk_size)
        self.digest = digest_function(digester)
        self.compressor = Compressor(compressor)
        self.workers = workers or os.cpu_count() or 1
        self.window = window or self.workers * 3
        self._known = known or (lambda key: False)
        self._zero = {}
        self.bytes_read = 0
        self.bytes_hole = 0

    def _zero_digest(self, n):
        d = self._zero.get(n)
        if d is None:
            d = self._zero[n] = self.digest(bytes(n))
        return d

    def _run_batch(self, batch):
        out = []
        for key, off, data, length in batch:
            if data is None:
                digest = self._zero_digest(length)
            else:
                digest = self.digest(data)
            stored = None
            if not self._known((digest, length)):
                stored = self.compressor.compress(data if data is not None
                                                  else bytes(length))
            out.append(StreamChunk(key, off, length, digest, stored))
        return out

    @staticmethod
    def _batches(items):
        batch, nbytes = [], 0
        for it in items:
            batch.append(it)
            nbytes += it[3]
            if nbytes >= BATCH_BYTES or len(batch) >= BATCH_CHUNKS:
                yield batch
                batch, nbytes = [], 0
        if batch:
            yield batch

    def run(self, items):
        pending = deque()
        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="erofs-tarchunk") as pool:
            try:
                for batch in self._batches(items):
                    for _, _, data, length in batch:
                        if data is None:
                            self.bytes_hole += length
                        else:
                            self.bytes_read += length
                    pending.append(pool.submit(self._run_batch, batch))
                    while len(pending) >= self.window:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def stream_chunks(reader, tree, chunk_size, on_entry=None):
    """Generator: read every entry, build `tree`, yield chunk items of regular files."""
    cs = chunk_size
    apparent = 0
    for e in reader:
        node = tree.add(e)
        if on_entry is not None:
            on_entry(e)
        if node is None:
            continue
        size = node.size
        apparent += size          # sparse holes count too: they cost chunk indexes
        if apparent > reader.r.limit:
            raise _err(f"{_show(e.name)}: file sizes add up to more than the limit of "
                       f"{reader.r.limit} bytes (--max-size)")
        key = node.key
        if e.sparse is None:
            off = 0
            while off < size:
                n = min(cs, size - off)
                yield key, off, reader.read_data(n), n
                off += n
            continue
        regions = e.sparse
        ri = 0
        off = 0
        while off < size:
            n = min(cs, size - off)
            end = off + n
            while ri < len(regions) and regions[ri][0] + regions[ri][1] <= off:
                ri += 1
            if ri >= len(regions) or regions[ri][0] >= end:
                yield key, off, None, n
            else:
                buf = bytearray(n)
                j = ri
                while j < len(regions) and regions[j][0] < end:
                    a, ln = regions[j]
                    lo, hi = max(a, off), min(a + ln, end)
                    if hi > lo:
                        buf[lo - off:hi - off] = reader.read_data(hi - lo)
                    if a + ln > end:
                        break
                    j += 1
                yield key, off, bytes(buf), n
            off = end
    tree.finish()


# --- pack driver ---------------------------------------------------------------------------

def open_source(source):
    """SOURCE path or '-' -> (raw binary stream, closer)."""
    if source == "-" or source == b"-":
        return sys.stdin.buffer, (lambda: None)
    try:
        f = open(source, "rb")
    except OSError as e:
        raise InputError(f"{os.fsdecode(source)}: {e.strerror}") from None
    return f, f.close


def pack_tar(source, bootstrap, blob_dir, opts=None, source_type="auto",
             whiteout_spec="oci", max_size=DEFAULT_MAX_SIZE, progress=None):
    """Build BOOTSTRAP and one blob in BLOB_DIR from a tar stream; -> summary dict.

    `source`: a path, '-' (stdin) or a binary file object; `source_type`: tar, targz,
    tarzst or auto (by magic)."""
    from erofs_tools.builder import rafs as RP
    opts = opts or RP.PackOptions()
    opts.check()
    t0 = time.monotonic()
    bootstrap, blob_dir = os.fspath(bootstrap), os.fspath(blob_dir)
    try:                      # like pack (and nydus-image): create a missing blob dir
        os.makedirs(blob_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"blob directory {blob_dir}: {e.strerror}") from None
    if whiteout_spec not in WHITEOUT_SPECS:
        raise InputError(f"unknown whiteout spec {whiteout_spec!r} "
                         "(choose oci, overlayfs or none)")
    cdict = ChunkDict(opts.chunk_dicts, opts.digester, opts.chunk_size)
    prefetch = RP._normalize_prefetch(opts.prefetch)
    ts = opts.timestamp
    if ts is None and os.environ.get("SOURCE_DATE_EPOCH"):
        from erofs_tools.builder.options import parse_timestamp
        ts = parse_timestamp(os.environ["SOURCE_DATE_EPOCH"], "SOURCE_DATE_EPOCH")

    if isinstance(source, (str, bytes, os.PathLike)):
        raw, close = open_source(source)
        name = os.fsdecode(source)
    else:
        raw, close, name = source, (lambda: None), getattr(source, "name", "<stream>")
    tree = TarTree(whiteout_spec, timestamp=ts)
    stream = None
    writer = BlobWriter(blob_dir, opts.chunk_size, opts.compressor, opts.digester,
                        blob_index=-1)
    stored, per_key, file_off = {}, {}, {}
    stats = {"chunks_total": 0, "chunks_new": 0, "chunks_dedup": 0, "chunks_dict": 0,
             "bytes_total": 0, "bytes_new": 0, "bytes_dict": 0, "bytes_dedup": 0}

    def known(key):
        return key in stored or key in cdict.chunks

    pipe = StreamPipeline(opts.chunk_size, opts.digester, opts.compressor,
                          workers=opts.workers, known=known)
    try:
        try:
            stream = open_stream(raw, source_type)
            reader = TarReader(stream, max_size)
            for r in pipe.run(stream_chunks(reader, tree, opts.chunk_size)):
                sc = RP.place_chunk(r, stored, cdict, writer, stats, file_off)
                per_key.setdefault(r.file_key, []).append(sc)
        finally:
            if hasattr(stream, "close") and isinstance(stream, _Prefetch):
                stream.close()
            close()
        new_info = writer.finish(commit=False)
    except BaseException:
        writer.abort()
        raise

    try:
        _, _, meta_addr = RP._layout_constants(len(cdict.blobs) + 1, len(prefetch))
        bopts = BuildOptions(
            meta_blkaddr=meta_addr // BLKSZ, first_nid=RP.ROOT_NID,
            feature_compat=E.FEATURE_COMPAT_RAFS_V6,
            feature_incompat=E.FEATURE_INCOMPAT_CHUNKED_FILE | E.FEATURE_INCOMPAT_DEVICE_TABLE,
            sb_checksum=False, shared_xattrs=False, inline_data=True, force_extended=True,
            build_time=ts, build_time_nsec=0, uuid=bytes(16),
            devt_slotoff=R.DEVT_SLOTOFF)
        nb = RP._CountingBuilder(bopts)
        ids, keys, has_x = tree.emit(nb)
        per_node = {keys[k]: v for k, v in per_key.items() if k in keys}
        walker = _Emitted(set(keys.values()), has_x)
        prefetch_nodes = []
        for rel in prefetch:
            n = tree._lookup(rel.split(b"/")) if rel else tree.root
            if n is None:
                raise InputError(f"prefetch path /{os.fsdecode(rel)} is not in the archive")
            if ids[id(n)] not in prefetch_nodes:
                prefetch_nodes.append(ids[id(n)])
        result = RP.write_bootstrap(nb, walker, bootstrap, opts, cdict, new_info, per_node,
                                    file_off, prefetch_nodes, ts)
        if new_info is not None:
            writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.update(stats)
    result["entries"] = tree.entries
    result["tar_bytes"] = reader.r.offset
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["source"] = name
    result["whiteout_spec"] = whiteout_spec
    return result


class _Emitted:
    """What rafs.write_bootstrap needs to know of the tree source."""

    def __init__(self, regular, has_xattrs):
        self.regular = regular
        self.has_xattrs = has_xattrs
