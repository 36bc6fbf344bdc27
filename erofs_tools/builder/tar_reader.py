"""The tar parser: entries of a tar stream, read once front to back, with every size
bounded before anything is allocated.

Formats: v7, ustar (prefix), GNU (long names 'L'/'K', base-256 numbers, old sparse 'S'
with extension headers, dumpdir 'D'), POSIX PAX ('x' and global 'g' records: path,
linkpath, size, uid, gid, mtime with fraction, SCHILY.xattr.*, LIBARCHIVE.xattr.*,
SCHILY.devmajor/devminor, GNU sparse 0.0, 0.1 and 1.0). PAX records in force are capped
(`PaxRecords`); truncated streams and bad checksums are errors; the bytes read from the
(decompressed) stream are bounded by `max_size` (docs/tar.md).
"""
from __future__ import annotations

import base64
import itertools
import re
import urllib.parse
from collections.abc import Callable, ItemsView, Iterator
from typing import Protocol, overload

from erofs_tools.errors import InputError

BLOCK = 512
MAX_META = 16 << 20            # extended headers (PAX, long names, sparse map) per entry
MAX_GLOBAL = 256 << 10         # PAX global records kept (honoured keys, latest value)
MAX_NAME = 64 << 10            # path and link target length
MAX_SPARSE_REGIONS = 1 << 20
DEFAULT_MAX_SIZE = 1 << 40     # bytes read from the (decompressed) stream, 1 TiB


class ReadStream(Protocol):
    """What the parser reads from: read(n) -> up to n bytes, b"" at the end."""

    def read(self, n: int, /) -> bytes: ...


def _err(msg: str) -> InputError:
    return InputError(msg)


class _Name:
    """An entry name shown in a message only when one is raised (escaping costs)."""
    __slots__ = ("b",)

    def __init__(self, b: bytes) -> None:
        self.b = b

    def __str__(self) -> str:
        return _show(self.b)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _show(path: str | bytes, limit: int = 300) -> str:
    """A name for a one-line message: undecodable bytes and control characters
    escaped, long names cut."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
    return out if len(out) <= limit else out[:limit] + "..."


class _Reader:
    """Exact reads over a stream, counting and bounding the bytes taken."""

    def __init__(self, stream: ReadStream, limit: int) -> None:
        self._read = stream.read
        # a seekable plain file (mkfs --tar) skips file data by seeking: n -> False at EOF
        self._seek: Callable[[int], bool] | None = getattr(stream, "seek_forward", None)
        self._buf = b""
        self._pos = 0
        self.offset = 0
        self.limit = limit

    def read(self, n: int) -> bytes:
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
            try:
                piece = self._read(max(need, 1 << 16))
            except OSError as e:       # EIO of a disk, a file of /proc: one line
                raise _err(f"cannot read the tar stream: {e.strerror or e}") from None
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

    def skip(self, n: int, what: str | _Name) -> None:
        avail = len(self._buf) - self._pos
        if self._seek is not None and n > avail:
            if self.offset + n > self.limit:
                raise _err(f"tar stream is larger than the limit of {self.limit} bytes "
                           "(--max-size)")
            self._buf, self._pos = b"", 0
            if not self._seek(n - avail):
                raise _err(f"truncated tar stream in {what}")
            self.offset += n
            return
        while n > 0:
            k = min(n, 1 << 20)
            if len(self.read(k)) != k:
                raise _err(f"truncated tar stream in {what}")
            n -= k


# Numbers as tar readers take them: ASCII digits only. Python's int() also takes '_'
# between digits, surrounding whitespace and a '0o' prefix (base 8), which GNU tar and
# Go refuse: a header read as another number here than by the tar that extracts it.
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_DIGITS = re.compile(rb"[0-9]+")
_TIME = re.compile(rb"-?[0-9]*(?:\.[0-9]*)?")
_MAP = re.compile(rb"[0-9,]*")                # GNU.sparse.map (0.1)


def _dec(b: bytes, pattern: re.Pattern[bytes] = _DECIMAL) -> int:
    """A decimal number of a PAX record or a sparse map (ValueError if not one)."""
    if not pattern.fullmatch(b):
        raise ValueError(b)
    return int(b)


def _num(field: bytes, what: str) -> int:
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
    if not _OCTAL.fullmatch(s):
        raise _err(f"tar header: bad number in {what}")
    return int(s, 8)


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
# regular files, whose data a headerball leaves out (mkfs.erofs 1.9: '0', '7', and
# the NUL type of old tars; GNU 'S' sparse files too)
_HEADERBALL_FILES = (b"0", b"\0", b"7", b"S")


class Entry:
    __slots__ = ("name", "link", "type", "mode", "uid", "gid", "mtime", "mtime_nsec",
                 "size", "devmajor", "devminor", "xattrs", "sparse", "realsize", "offset")

    name: bytes
    link: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes]
    sparse: list[tuple[int, int]] | None   # (offset, length) data regions of a sparse file
    realsize: int
    offset: int

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.type!r}, size={self.size})"


def _pax_records(data: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of PAX records, in order."""
    pos, n = 0, len(data)
    while pos < n:
        if data[pos] == 0:          # padding
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise _err(f"{what}: bad PAX record")
        try:
            length = _dec(data[pos:sp], _DIGITS)
        except ValueError:
            raise _err(f"{what}: bad PAX record length") from None
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1] != 0x0A:
            raise _err(f"{what}: bad PAX record")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq:
            raise _err(f"{what}: bad PAX record")
        yield key, value
        pos = end


_PAX_KEYS = frozenset((b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime",
                       b"SCHILY.devmajor", b"SCHILY.devminor"))
_PAX_XATTR = (b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")
_SPARSE_00 = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")


class PaxRecords:
    """The PAX records in force: the keys we honour, a later record replacing an
    earlier one with the same key (so a header of 10^6 records of one key keeps one),
    others (comment, atime, ...) dropped as they are read. The bytes kept are capped at
    `limit`, so records that pile up (global headers, stacked 'x' headers) cost bounded
    memory and bounded work per entry. GNU sparse 0.0 offset/numbytes pairs are a
    sequence, kept in order as ints (`sparse`), counted against the same cap."""

    __slots__ = ("records", "sparse", "kept", "limit", "is_global")

    def __init__(self, limit: int, is_global: bool = False) -> None:
        self.records: dict[bytes, bytes] = {}
        self.sparse: list[list[int | None]] = []    # [offset, numbytes] (None until read)
        self.kept = 0
        self.limit = limit
        self.is_global = is_global

    def __bool__(self) -> bool:
        return bool(self.records or self.sparse)

    def add(self, data: bytes, what: str) -> None:
        records = self.records
        for key, value in _pax_records(data, what):
            if key in _SPARSE_00:
                if self.is_global:
                    continue
                v = _pax_int(value, what, key.decode())
                if key == b"GNU.sparse.offset":
                    if len(self.sparse) >= MAX_SPARSE_REGIONS:
                        raise _err(f"{what}: too many sparse regions")
                    self.sparse.append([v, None])
                elif not self.sparse or self.sparse[-1][1] is not None:
                    raise _err(f"{what}: bad GNU sparse 0.0 map")
                else:
                    self.sparse[-1][1] = v
                self.kept += 16
            elif key in _PAX_KEYS or key.startswith(_PAX_XATTR) or (
                    not self.is_global and key.startswith(b"GNU.sparse.")):
                old = records.pop(key, None)        # re-inserted: order of last setting
                if old is not None:
                    self.kept -= len(key) + len(old)
                records[key] = value
                self.kept += len(key) + len(value)
            else:
                continue
            if self.kept > self.limit:
                raise _err(f"{what}: extended metadata in force is over the limit of "
                           f"{self.limit} bytes")

    def items(self) -> ItemsView[bytes, bytes]:
        return self.records.items()


def _pax_time(value: bytes, what: str | _Name) -> tuple[int, int]:
    try:
        if not _TIME.fullmatch(value) or not any(c in b"0123456789" for c in value):
            raise ValueError(value)
        s = value.decode("ascii")
        neg = s.startswith("-")
        whole, _, frac = s.lstrip("-").partition(".")
        sec = int(whole or "0")
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except (UnicodeDecodeError, ValueError):
        raise _err(f"{what}: bad PAX mtime {_show(value, 40)}") from None
    if neg:
        return -sec - (1 if nsec else 0), (1_000_000_000 - nsec) % 1_000_000_000
    return sec, nsec


def _pax_int(value: bytes, what: str | _Name, key: str) -> int:
    try:
        return _dec(value)
    except ValueError:
        raise _err(f"{what}: bad PAX {key} {_show(value, 40)}") from None


class TarReader:
    """Iterate entries of a tar stream; the caller consumes each entry's data
    (`read_data` / `skip_data`) before asking for the next one."""

    def __init__(self, stream: ReadStream, max_size: int = DEFAULT_MAX_SIZE,
                 oci: bool = False, headerball: bool = False) -> None:
        self.r = _Reader(stream, max_size)
        # mkfs --tar=headerball (mkfs.erofs 1.9): a stream of headers whose regular
        # files' data is left out; each such file is read as a whole hole of its size
        self.headerball = headerball
        # An OCI layer read as the runtimes read it (Go's archive/tar, containerd's and
        # docker's appliers), not as POSIX and GNU tar do, so that a converted image is
        # the one containerd would run: a global PAX header is an entry of its own they
        # ignore (not records for every later entry: a global uid, mtime or xattr applied
        # to every file), xattrs come from SCHILY.xattr. records only (LIBARCHIVE.xattr.
        # ones never reach the rootfs), and a GNU long name or link wins over a PAX path
        # or linkpath. mkfs --tar (erofs-utils' reading) keeps the POSIX rules.
        self.oci = oci
        self.globals = PaxRecords(MAX_GLOBAL, is_global=True)
        self._left = 0            # data bytes of the current entry not consumed yet
        self._pad = 0
        self._cur: Entry | None = None
        self.count = 0

    @overload
    def _block(self, what: str) -> bytes: ...
    @overload
    def _block(self, what: None) -> bytes | None: ...

    def _block(self, what: str | None) -> bytes | None:
        """One header block; None at a clean end of stream only when `what` is None."""
        b = self.r.read(BLOCK)
        if len(b) != BLOCK:
            if not b and what is None:
                return None
            raise _err(f"truncated tar stream at byte {self.r.offset - len(b)}"
                       + (f" ({what})" if what else ""))
        return b

    def _meta(self, size: int, what: str) -> bytes:
        if size < 0 or size > MAX_META:
            raise _err(f"{what}: {size} bytes of metadata is over the limit")
        data = self.r.read(size)
        if len(data) != size:
            raise _err(f"truncated tar stream in {what}")
        pad = -size % BLOCK
        if pad and len(self.r.read(pad)) != pad:
            raise _err(f"truncated tar stream in {what}")
        return data

    def _finish_current(self) -> None:
        if self._cur is not None:
            what = _Name(self._cur.name)
            if self._left:
                self.r.skip(self._left, what)
            if self._pad:
                self.r.skip(self._pad, what)
            self._left = self._pad = 0
            self._cur = None

    def read_data(self, n: int) -> bytes:
        """Next n bytes of the current entry's data (exactly n, or an error)."""
        # no current entry: _left is 0, so any n > 0 is past its data
        name = _show(self._cur.name) if self._cur is not None else "(no entry)"
        if n > self._left:
            raise _err(f"{name}: sparse map points past the entry's data")
        data = self.r.read(n)
        if len(data) != n:
            raise _err(f"truncated tar stream in {name}")
        self._left -= n
        return data

    def __iter__(self) -> TarReader:
        return self

    def __next__(self) -> Entry:
        self._finish_current()
        pax = PaxRecords(MAX_META)
        longname = longlink = None
        start = None
        ext_bytes = 0             # extended headers before this entry, stacked ones too
        while True:
            hdr = self._block(None if start is None and not pax and longname is None
                              and longlink is None and not ext_bytes else "header")
            if start is None:
                start = self.r.offset - BLOCK if hdr is not None else self.r.offset
            if hdr is None:
                raise StopIteration
            if hdr == bytes(BLOCK):
                if pax or longname is not None or longlink is not None or ext_bytes:
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
            if t in (b"x", b"L", b"K"):
                ext_bytes += size
                if ext_bytes > MAX_META:
                    raise _err(f"tar header at byte {self.r.offset - BLOCK}: extended "
                               f"metadata of one entry is over the limit of {MAX_META} "
                               "bytes")
            if t == b"x":
                pax.add(self._meta(size, "PAX header"), "PAX header")
                continue
            if t == b"g":
                records = self._meta(size, "PAX global header")
                if not self.oci:
                    self.globals.add(records, "PAX global header")
                continue
            if t == b"L":
                longname = _cstr(self._meta(size, "GNU long name"))
                continue
            if t == b"K":
                longlink = _cstr(self._meta(size, "GNU long link"))
                continue
            return self._entry(hdr, t, size, pax, longname, longlink, start)

    def _entry(self, hdr: bytes, t: bytes, size: int, pax: PaxRecords, longname: bytes | None,
               longlink: bytes | None, start: int) -> Entry:
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
        sp_name: bytes | None = None
        sp_off = pax.sparse
        for key, value in itertools.chain(self.globals.items(), pax.items()):
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
            elif key.startswith(b"LIBARCHIVE.xattr.") and not self.oci:
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
                    sp_name = value
                elif k in (b"size", b"realsize"):
                    sp_realsize = _pax_int(value, what, key.decode())
                    if e.sparse is None:
                        e.sparse = []
                elif k == b"map":
                    try:
                        if not _MAP.fullmatch(value):
                            raise ValueError(value)
                        # (int(b"") of an empty item fails too)
                        nums = list(map(int, value.split(b","))) if value else []
                    except ValueError:
                        raise _err(f"{what}: bad GNU.sparse.map") from None
                    if len(nums) % 2 or len(nums) > 2 * MAX_SPARSE_REGIONS:
                        raise _err(f"{what}: bad GNU.sparse.map")
                    it = iter(nums)
                    e.sparse = list(zip(it, it))
        if self.oci:
            # Go applies the GNU long name and link after the PAX records (and
            # GNU.sparse.name after both)
            e.name = longname if longname is not None else e.name
            e.link = longlink if longlink is not None else e.link
        if sp_name is not None:
            # the real name of a sparse member whatever the record order: GNU tar writes
            # a long ./GNUSparseFile.PID/NAME header name as a `path` record after
            # GNU.sparse.name (0.1), and GNU tar, Go and libarchive all take this one
            e.name = sp_name
        what = _Name(e.name)
        if sp_off:
            regions = []
            for off, num in sp_off:
                if off is None or num is None:
                    raise _err(f"{what}: bad GNU sparse 0.0 map")
                regions.append((off, num))
            e.sparse = regions
        if e.size < 0:
            raise _err(f"{what}: negative size")
        if sp_realsize is not None:
            e.realsize = sp_realsize
        self._cur = e
        # links, devices, fifos and directories carry no data (their size field is
        # ignored, as tar -x does); every other type, known or not, has e.size bytes
        self._left = 0 if t in _NO_DATA else e.size
        if self.headerball and t in _HEADERBALL_FILES:
            # no data follows; a sparse file's map (in its data for 1.0) is left out too
            self._left = 0
            e.sparse, sp_major = [(e.realsize, 0)], None
        self._pad = -self._left % BLOCK if self._left else 0
        if sp_major == 1:
            self._sparse_1_0(e, what)
        if e.sparse is not None:
            self._check_sparse(e, what)
        if len(e.name) > MAX_NAME or len(e.link) > MAX_NAME:
            raise _err(f"{what}: name longer than {MAX_NAME} bytes")
        self.count += 1
        return e

    def _gnu_sparse(self, raw: bytes, n: int) -> list[tuple[int, int]]:
        out = []
        for i in range(n):
            off = _num(raw[24 * i:24 * i + 12], "sparse offset")
            num = _num(raw[24 * i + 12:24 * i + 24], "sparse numbytes")
            if off == 0 and num == 0 and not raw[24 * i:24 * i + 24].strip(b"\0"):
                continue
            out.append((off, num))
        return out

    def _sparse_1_0(self, e: Entry, what: _Name) -> None:
        """PAX sparse 1.0: the map is at the start of the data, in decimal lines."""
        buf = bytearray()
        used = 0

        def line() -> int:
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
                return _dec(ln, _DIGITS)
            except ValueError:
                raise _err(f"{what}: bad sparse 1.0 map") from None

        n = line()
        if n < 0 or n > MAX_SPARSE_REGIONS:
            raise _err(f"{what}: bad sparse 1.0 map")
        e.sparse = [(line(), line()) for _ in range(n)]
        # the map was read in whole blocks; what is left is the data proper
        e.size = self._left

    def _check_sparse(self, e: Entry, what: _Name) -> None:
        if e.realsize < 0:
            raise _err(f"{what}: negative sparse file size")
        pos = 0
        total = 0
        # regions kept normalized: none empty (GNU's closing (size, 0) only marks the
        # size, which realsize has), adjacent ones merged (their data is contiguous in
        # the tar too). A map of 10^6 empty regions, 4 bytes each, was 10^6 tuples.
        out: list[tuple[int, int]] = []
        for off, num in e.sparse or ():     # the caller checked it is set
            if off < pos or num < 0 or off + num > e.realsize:
                raise _err(f"{what}: sparse map is not ordered or exceeds the file size")
            if num:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + num)
                else:
                    out.append((off, num))
            pos = off + num
            total += num
        e.sparse = out
        if total != self._left:
            raise _err(f"{what}: sparse map covers {total} bytes but the entry holds "
                       f"{self._left}")
