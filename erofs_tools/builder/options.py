"""Options of `erofs-tools mkfs` (what mkfs.erofs offers, plus JSON/progress handling)."""
import dataclasses
import os
import re
import uuid as _uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from erofs_tools.errors import InputError


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of -z: ALG[,level=N][,dictsize=N][,lc=N][,lp=N][,pb=N] (the C core
    checks the ranges)."""
    name: str
    level: int | None = None
    dict_size: int = 0                # bytes; 0 = the algorithm's default
    lzma_props: tuple[int, int, int] = (-1, -1, -1)   # lzma's lc, lp, pb; -1 = preset's


@dataclass(frozen=True)
class Compression:
    """-z ALG[,level=N][:ALG2...] and -C SIZE (the C core checks the levels' range)."""
    algorithm: str
    level: int | None = None
    pcluster_size: int = 0            # bytes; 0 = one block
    full_index: bool = False          # -E legacy-compress: 8-byte lcluster indexes
    ztailpacking: bool = False        # -E ztailpacking: last extents inline
    fragments: bool = False           # -E fragments: last extents in the packed inode
    packed_pcluster_size: int = 0     # -E fragments=SIZE: its pcluster; 0 = as -C
    dedupe: bool = False              # -E dedupe: identical pclusters shared
    more: tuple[Algorithm, ...] = ()  # -z A:B:C: the algorithms after the first
    dict_size: int = 0                # the first algorithm's dictsize= (0 = default)
    lzma_props: tuple[int, int, int] = (-1, -1, -1)   # the first's lc, lp, pb (lzma)
    all_fragments: bool = False       # -E all-fragments: every file whole in the packed inode
    fragdedupe: str = "full"          # -E fragdedupe=full|inode, ^fragdedupe ("off")
    max_extent: int = 0               # --max-extent-bytes: input per extent at most (0: any)

    @property
    def algorithms(self) -> tuple[Algorithm, ...]:
        """Every algorithm of the -z list, the first one first."""
        return (Algorithm(self.algorithm, self.level, self.dict_size, self.lzma_props),
                *self.more)


@dataclass(frozen=True)
class MtimePolicy:
    """Inode mtimes set to `time` (nsec 0): all of them, or with `clamp` only those at
    or after it (SOURCE_DATE_EPOCH: an mtime from before the release stays as it is)."""
    time: int
    clamp: bool = False

    def apply(self, sec: int, nsec: int) -> tuple[int, int]:
        if self.clamp and sec < self.time:
            return sec, nsec
        return self.time, 0


@dataclass(frozen=True)
class CompressHint:
    """One line of --compress-hints: files whose path (relative to SOURCE) matches get
    this pcluster size (0: not compressed) and algorithm (index in the -z list)."""
    pcluster_size: int
    algorithm: int
    regex: re.Pattern[bytes]


@dataclass
class MkfsOptions:
    timestamp: int | None = None      # -T: every inode gets this mtime (nsec 0)
    uuid: bytes | None = None         # -U: 16 bytes; None = random (like mkfs.erofs)
    label: bytes = b""                # -L: <= 15 bytes
    all_root: bool = False            # uid = gid = 0 everywhere
    force_uid: int | None = None
    force_gid: int | None = None
    uid_offset: int = 0               # --uid-offset: added to every uid (after force_uid)
    gid_offset: int = 0               # --gid-offset
    hard_dereference: bool = False    # --hard-dereference: each link its own inode
    offset: int = 0                   # --offset: the image starts at this byte of IMAGE
    fsalignblks: int = 1              # --fsalignblks: image size (sb.blocks) a multiple
                                      # of this many blocks (a power of two)
    dsunit: int = 0                   # --dsunit: each file's data on a multiple of this
                                      # many blocks (uncompressed; 0, 1: none)
    exclude_paths: list[bytes] = field(default_factory=list)   # relative paths (bytes), exact
    exclude_regex: list[re.Pattern[bytes]] = field(default_factory=list)   # compiled bytes regexes, re.search
    shared_xattrs: bool = True        # xattrs carried by >= 2 inodes go to the shared area
    shared_xattr_min: int = 0         # -x N: ... by >= N + 1 inodes (0: the default, 2)
    xattrs: bool = True               # -x -1: the source tree's xattrs left out
    root_xattr_isize: int = 0         # --root-xattr-isize: bytes kept for the root's xattrs
    compress: Compression | None = None   # -z / -C
    compress_dirs: bool = False       # --zD: every directory whole in the packed inode
    compress_hints: list[CompressHint] = field(default_factory=list)   # --compress-hints
    workers: int = 0                  # --workers: compression threads, 0 = one per CPU
    inode_digest: bytes | None = None  # --xattr-inode-digest: the fingerprint xattr's name
    inode_digest_pos: int | None = None  # its place among the --xattr-prefix ones (the
                                      # command line's, as mkfs.erofs); None: last
    xattr_prefixes: list[bytes] = field(default_factory=list)  # --xattr-prefix: long xattr
                                      # name prefixes (Linux 6.4+)
    plain_xattr_prefixes: bool = False  # -E plain-xattr-prefixes: their table after the
                                      # superblock even with -E fragments
    inline_data: bool = True          # -E noinline_data: no FLAT_INLINE tails (containerd's
                                      # EROFS differ asks for it: data blocks stay aligned)
    all_time: bool = True             # --all-time (default) / --mkfs-time: -T also sets
                                      # every inode's mtime, or only the build time
    blkszbits: int = 12               # -b: log2 of the block size (512 .. 4096)
    xattr_filter: bool = True         # -E ^xattr-name-filter turns the name filters off
    sb_checksum: bool = True          # -E nosbcrc: no superblock checksum
    force_extended: bool = False      # -E force-inode-extended: every inode 64 bytes
    force_compact: bool = False       # -E force-inode-compact: every inode 32 bytes (mtimes
                                      # as --ignore-mtime; one that cannot be: an error)
    ignore_mtime: bool = False        # --ignore-mtime: an inode extended only for its
                                      # mtime is compact, its mtime the build time
    sb_48bit: bool = False            # -E 48bit: the 48-bit layout (Linux 6.15+)
    dot_omitted: bool = False         # -E dot-omitted: no "." entries (implies 48bit)
    metabox: int = 0                  # -m#: every inode in the metabox (its pcluster
                                      # size #; stored plain: no -z); 0: no
    metabox_alg: int = 0              # -m#:X: X's index in the -z list
    metazone: int = 0                 # --MZ: 1 the inode records, 3 the directories'
                                      # blocks too, in a zone after the data; 0: no
    chunksize: int = 0                # --chunksize: every file chunk-based (0: no)
    blobdev: str | None = None        # --blobdev: the chunks' data in this extra device
    chunk_indexes: bool = False       # -E force-chunk-indexes: 8-byte chunk indexes
    chunk_dedupe: bool = True         # -E ^dedupe: identical chunks each stored
    whiteouts: str = "mark"           # overlayfs whiteouts (char 0:0) in the source: a
                                      # directory holding one marked ("mark", as
                                      # mkfs.erofs 1.9), or left out with the opaque
                                      # markers ("strip", --ovlfs-strip=1); pack: "keep"

    def inode_mtimes(self, environ: Mapping[str, str] = os.environ) -> MtimePolicy | None:
        """What becomes of the inodes' mtimes: -T sets every one (unless --mkfs-time);
        SOURCE_DATE_EPOCH clamps those after it (the reproducible-builds rule, as
        mkfs.erofs 1.9); else None, each file keeps its own."""
        if self.timestamp is not None:
            return MtimePolicy(self.timestamp, clamp=False) if self.all_time else None
        sde = environ.get("SOURCE_DATE_EPOCH")
        if sde and self.all_time:
            return MtimePolicy(parse_timestamp(sde, "SOURCE_DATE_EPOCH"), clamp=True)
        return None

    def effective_timestamp(self, environ: Mapping[str, str] = os.environ) -> int | None:
        """The build time: -T wins; else SOURCE_DATE_EPOCH."""
        if self.timestamp is not None:
            return self.timestamp
        sde = environ.get("SOURCE_DATE_EPOCH")
        if sde:
            return parse_timestamp(sde, "SOURCE_DATE_EPOCH")
        return None


# --xattr-inode-digest without a value: the name mkfs.erofs 1.9 (and Linux's page-cache
# sharing) uses; no namespace prefix, so the kernel keeps it internal (no listxattr)
INODE_DIGEST_DEFAULT = "erofs.fingerprint.v1"


def parse_xattr_prefixes(texts: Sequence[str], digest: bool = False) -> list[bytes]:
    """--xattr-prefix X (repeatable): long xattr name prefixes, as mkfs.erofs takes them
    (at most 128 with --xattr-inode-digest's, each at most 255 bytes). One extending no
    namespace (user., trusted., security., ...) is taken but matches no name, as there."""
    out = []
    for text in texts:
        raw = os.fsencode(text)
        if not raw:
            raise InputError("--xattr-prefix: empty prefix")
        if len(raw) > 255:
            raise InputError(f"--xattr-prefix {text[:40]!r}...: longer than 255 bytes")
        out.append(raw)
    if len(out) + digest > 128:
        raise InputError(f"--xattr-prefix: {len(out) + digest} long prefixes (at most 128)")
    return out


def parse_inode_digest(name: str) -> bytes:
    """--xattr-inode-digest=NAME: the whole xattr name (it becomes a long name prefix)."""
    raw = os.fsencode(name)
    where = f"--xattr-inode-digest={name!r}"
    if not raw:
        raise InputError(f"{where}: empty name")
    if b"\0" in raw:
        raise InputError(f"{where}: name contains NUL")
    if len(raw) > 255:
        raise InputError(f"{where}: name longer than 255 bytes")
    if raw in (b"user.", b"trusted.", b"security.", b"lustre."):
        raise InputError(f"{where}: nothing after the namespace")
    if raw.startswith(b"system."):
        # the kernel reads system.* as POSIX ACLs: a digest there would be a bad ACL
        raise InputError(f"{where}: system.* names are reserved for ACLs")
    return raw


# the algorithms -z takes, as mkfs.erofs names them
COMPRESSOR_NAMES = ("lz4", "lz4hc", "lzma", "deflate", "zstd")
PCLUSTER_MAX = 1 << 20


# -E options this mkfs knows (mkfs.erofs names), and whether they take =VALUE
EXTENDED = {"legacy-compress": False, "ztailpacking": False, "fragments": True,
            "all-fragments": True, "fragdedupe": True, "48bit": False, "dot-omitted": False,
            "dedupe": False, "noinline_data": False, "force-inode-extended": False,
            "force-inode-compact": False, "plain-xattr-prefixes": False,
            "nosbcrc": False, "force-inode-blockmap": False, "force-chunk-indexes": False}
FRAGDEDUPE = ("full", "inode")
# -E options that are on by default, named as mkfs.erofs names them: "^NAME" turns one
# off, which the result says as the key here
DEFAULT_ON = {"inline_data": "noinline_data", "xattr-name-filter": "no-xattr-name-filter"}


# -E force-inode-extended and force-inode-compact set one thing, as in mkfs.erofs (so do
# force-inode-blockmap and force-chunk-indexes)
_INODE_VERSIONS = {"force-inode-extended": "force-inode-compact",
                   "force-inode-compact": "force-inode-extended",
                   "force-inode-blockmap": "force-chunk-indexes",
                   "force-chunk-indexes": "force-inode-blockmap"}


def parse_extended(texts: Sequence[str]) -> dict[str, str | None]:
    """-E options (comma separated, repeatable; "^NAME" turns NAME off, as mkfs.erofs)
    -> {name: value or None} of those on (a default one turned off as DEFAULT_ON's key)."""
    out: dict[str, str | None] = {}
    for text in texts:
        for opt in filter(None, (t.strip() for t in text.split(","))):
            name, sep, value = opt.partition("=")
            off = name.startswith("^")
            name = name[1:] if off else name
            if name in DEFAULT_ON:
                if sep:
                    raise InputError(f"-E {name} takes no value")
                if off:
                    out[DEFAULT_ON[name]] = None
                else:
                    out.pop(DEFAULT_ON[name], None)
                continue
            if name not in EXTENDED:
                raise InputError(f"-E: unsupported extended option {opt!r}")
            if sep and (off or not EXTENDED[name]):
                raise InputError(f"-E {'^' if off else ''}{name} takes no value")
            if sep and not value:
                raise InputError(f"-E {name}=: empty value")
            _set_extended(out, name, value if sep else None, off)
    return out


def _set_extended(out: dict[str, str | None], name: str, value: str | None,
                  off: bool) -> None:
    """One -E option into out, as mkfs.erofs 1.9 sets it: all-fragments[=SIZE] also
    sets fragments[=SIZE] (^all-fragments clears both; ^fragments alone stops both);
    a SIZE stays until another is given; fragdedupe is "full" unless =inode, and
    "off" with ^fragdedupe."""
    if name == "fragdedupe":
        if value is not None and value not in FRAGDEDUPE:
            # (mkfs.erofs 1.9.4 takes any value but inode as full, so =off there
            # would silently share fragments)
            raise InputError(f"-E fragdedupe={value}: not one of {', '.join(FRAGDEDUPE)} "
                             "(^fragdedupe turns it off)")
        out[name] = "off" if off else value or "full"
        return
    if off:
        out.pop(name, None)
        if name == "dedupe":            # (mkfs.erofs: chunks not shared, --chunksize)
            out["nodedupe"] = None
        if name == "all-fragments":
            out.pop("fragments", None)
        return
    if name in ("fragments", "all-fragments"):
        out["fragments"] = value if value is not None else out.get("fragments")
        if name == "fragments":
            return
        value = None
    out[name] = value
    if name == "dedupe":
        out.pop("nodedupe", None)
    if name in _INODE_VERSIONS:         # the last of the two wins
        out.pop(_INODE_VERSIONS[name], None)


# --zfeature-bits: bit i turns on (1) or off (0) the i-th of these -E options, as
# mkfs.erofs 1.9 numbers them; only the bits up to the highest one set are applied
ZFEATURE_BITS = ("legacy-compress", "ztailpacking", "fragments", "all-fragments", "dedupe",
                 "fragdedupe", "48bit", "dot-omitted")


def zfeature_extended(text: str) -> str:
    """--zfeature-bits=N -> the -E text that sets the same features (N as strtol base 0
    reads it). mkfs.erofs applies the bits in order, so a clear all-fragments bit above
    a set fragments bit clears fragments too, as it does there."""
    m = _NUMBER.fullmatch(text)
    if m is None or m.group(2):
        raise InputError(f"--zfeature-bits={text}: not a number")
    digits = m.group(1)
    bits = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    if bits >> len(ZFEATURE_BITS):
        raise InputError(f"--zfeature-bits={text}: unsupported zfeature bit "
                         f"{bits.bit_length() - 1} (bits 0-{len(ZFEATURE_BITS) - 1}: "
                         f"{', '.join(ZFEATURE_BITS)})")
    return ",".join(("" if bits >> i & 1 else "^") + name
                    for i, name in enumerate(ZFEATURE_BITS[:bits.bit_length()]))


def parse_compress(text: str, pcluster: str | None = None,
                   ext: Mapping[str, str | None] | None = None) -> Compression:
    """mkfs.erofs's -z syntax: ALG[,level=N][,dictsize=N][:ALG2[,...]...] (at most 4;
    lzma also takes lc=, lp=, pb=)."""
    algs = [_parse_alg(part, text) for part in text.split(":")]
    if len(algs) > 4:
        raise InputError(f"-z {text!r}: at most 4 algorithms")
    first, more = algs[0], tuple(algs[1:])
    size = _pcluster_bytes(pcluster, "-C ") if pcluster is not None else 0
    ext = ext or {}
    packed = ext.get("fragments")
    psize = _pcluster_bytes(packed, "-E fragments=") if packed is not None else 0
    if psize > (size or 4096):
        raise InputError(f"-E fragments={packed}: larger than the pcluster size")
    frags = "fragments" in ext
    return Compression(first.name, first.level, size, "legacy-compress" in ext,
                       "ztailpacking" in ext, frags, psize, "dedupe" in ext,
                       more, first.dict_size, first.lzma_props,
                       all_fragments=frags and "all-fragments" in ext,
                       fragdedupe=ext.get("fragdedupe") or "full")


# mkfs.erofs reads these numbers with strtoul(base 0): 0x hex, a leading 0 octal; its
# dictsize= also takes a k, m or g suffix
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([kKmMgG]?)")
_SUFFIX = {"": 0, "k": 10, "m": 20, "g": 30}


def _parse_number(text: str, value: str, what: str, suffix: bool) -> int:
    m = _NUMBER.fullmatch(value)
    if m is None or (m.group(2) and not suffix):
        raise InputError(f"-z {text!r}: {what} is not a number: {value!r}")
    digits = m.group(1)
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    n = int(digits, base) << _SUFFIX[m.group(2).lower()]
    if n >= 1 << 32:
        raise InputError(f"-z {text!r}: {what} {value} is too large")
    return n


def _parse_alg(part: str, text: str) -> Algorithm:
    name, *params = part.split(",")
    name = name.strip().lower()
    if name not in COMPRESSOR_NAMES:
        raise InputError(f"-z: unknown compressor {name!r} (one of {', '.join(COMPRESSOR_NAMES)})")
    level = None
    dict_size = 0
    props = [-1, -1, -1]
    if params and params[0][:1].isdigit():
        # mkfs.erofs's old form -z ALG,N: a level; the options after it are ignored there
        if not params[0].isdigit():
            raise InputError(f"-z {text!r}: level is not an integer: {params[0]!r}")
        return Algorithm(name, int(params[0], 10))
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or key not in ("level", "dictsize", "lc", "lp", "pb"):
            raise InputError(f"-z {text!r}: unknown option {p!r} "
                             "(level=N, dictsize=N; lzma: lc=N, lp=N, pb=N)")
        if key == "level":
            try:
                level = int(value, 10)
            except ValueError:
                raise InputError(f"-z {text!r}: level is not an integer: {value!r}") \
                    from None
            if level < 0:
                raise InputError(f"-z {text!r}: negative level")
        elif key == "dictsize":
            dict_size = _parse_number(text, value, "dictsize", suffix=True)
            if dict_size == 0:
                raise InputError(f"-z {text!r}: dictsize 0")
        else:
            if name != "lzma":
                raise InputError(f"-z {text!r}: {key}= is an lzma option, not {name}'s")
            v = _parse_number(text, value, key, suffix=False)
            props["lc lp pb".split().index(key)] = min(v, 127)
    return Algorithm(name, level, dict_size, (props[0], props[1], props[2]))


def parse_compress_hints(path: str, nalgs: int) -> list[CompressHint]:
    """mkfs.erofs's --compress-hints file: lines `PCLUSTERSIZE [ALGINDEX] REGEX` (POSIX
    extended regexes there, Python's here, searched in the path relative to SOURCE),
    `#` comments; the first matching line wins."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"--compress-hints {path}: {e.strerror}") from None
    hints = []
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(b"#"):
            continue
        where = f"--compress-hints {path}:{no}"
        fields = line.strip().split(None, 2)
        if len(fields) < 2:
            raise InputError(f"{where}: no pattern")
        # as mkfs.erofs: with three fields the second is the algorithm's index
        alg, pattern = 0, fields[-1]
        if len(fields) == 3:
            try:
                alg = int(fields[1], 10)
            except ValueError:
                raise InputError(f"{where}: not an algorithm index: {fields[1]!r}") from None
            if not 0 <= alg < nalgs:
                raise InputError(f"{where}: no algorithm #{alg} in -z")
        try:
            size = int(fields[0], 10)
        except ValueError:
            raise InputError(f"{where}: not a pcluster size: {fields[0]!r}") from None
        if size < 0 or size % 4096 or size > PCLUSTER_MAX:
            raise InputError(f"{where}: pcluster size {size} is not a multiple of 4096 up "
                             f"to {PCLUSTER_MAX}")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InputError(f"{where}: invalid regular expression: {e}") from None
        hints.append(CompressHint(size, alg, rx))
    return hints


def _pcluster_bytes(text: str, what: str) -> int:
    try:
        size = int(text, 10)
    except ValueError:
        raise InputError(f"{what}{text}: not a byte count") from None
    if size <= 0 or size % 4096 or size > PCLUSTER_MAX:
        raise InputError(f"{what}{text}: must be a multiple of 4096 up to {PCLUSTER_MAX}")
    return size


def parse_timestamp(text: object, what: str = "-T") -> int:
    try:
        v = int(str(text).strip(), 10)
    except ValueError:
        raise InputError(f"{what}: not an integer UNIX timestamp: {text!r}") from None
    if not 0 <= v < 1 << 63:
        raise InputError(f"{what}: timestamp out of range: {text!r}")
    return v


def parse_offset(text: str, what: str = "--offset", bits: int = 63) -> int:
    """--offset BYTES (and --fsalignblks, --async-queue-limit ...): as mkfs.erofs reads
    them (strtoul, base 0: 0x hex, a leading 0 octal), below 2^bits."""
    m = re.fullmatch(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", text.strip())
    if m is None:
        raise InputError(f"{what}: invalid value {text!r}")
    digits = m.group(0)
    v = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    if v >= 1 << bits:
        raise InputError(f"{what}: {text} is too large")
    return v


def parse_fsalignblks(text: str) -> int:
    """--fsalignblks N -> N rounded up to a power of two (0: 1), as mkfs.erofs."""
    n = parse_offset(text, "--fsalignblks", 32)
    return 1 << max(n - 1, 0).bit_length()


def check_tuning(dsunit: str | None, max_extent: str | None, async_limit: str | None,
                 compressed: bool, blksz: int = 4096) -> tuple[int, int]:
    """mkfs.erofs's --dsunit, --max-extent-bytes and --async-queue-limit: accepted where
    we write them (--dsunit, --max-extent-bytes with -z) or they change
    nothing (the queue length; no extent cap without -z), refused with one line where
    they would change the image; -> (the dsunit, the extent cap with -z, 0: none)."""
    unit = parse_offset(dsunit, "--dsunit", 32) if dsunit is not None else 0
    cap = 0
    if max_extent is not None:
        try:
            v = int(max_extent, 0)
        except ValueError:
            raise InputError(f"--max-extent-bytes: invalid value {max_extent!r}") from None
        if not -(1 << 31) <= v < 1 << 31:
            raise InputError(f"--max-extent-bytes: {max_extent} out of range")
        # with -z as mkfs.erofs 1.9: 0 is no cap; a negative one asks for unaligned
        # extents (the 48-bit layout's, which it refuses without -E48bit; this mkfs
        # writes block-aligned pclusters only, also with -E48bit)
        if compressed and v < 0:
            raise InputError(f"--max-extent-bytes={max_extent}: unaligned compressed "
                             "extents are not written (block-aligned pclusters only)")
        if compressed and 0 < v < blksz:
            raise InputError(f"--max-extent-bytes={max_extent}: at least the block size "
                             f"({blksz}) with -z")
        cap = v if compressed else 0
    if async_limit is not None:
        n = parse_offset(async_limit, "--async-queue-limit", 32)
        if n & (n - 1):
            raise InputError(f"--async-queue-limit: {async_limit} is not a power of two "
                             "(mkfs.erofs fails on it too)")
    return unit, cap


def parse_chunksize(text: str, blksz: int) -> int:
    """--chunksize=# (strtol, base 0, as mkfs.erofs reads it): a power of two, at least
    the block size, at most 2^31 blocks."""
    v = parse_offset(text, "--chunksize", 63)
    if v & (v - 1) or not v:
        raise InputError(f"--chunksize={text}: not a power of two")
    if v < blksz:
        raise InputError(f"--chunksize={text}: smaller than the block size ({blksz})")
    if v > blksz << 31:
        raise InputError(f"--chunksize={text}: larger than 2^31 blocks")
    return v


def check_chunks(chunksize: str | None, blobdev: str | None, ext: Mapping[str, str | None],
                 compressed: bool, tar_mode: str | None, blkszbits: int, image: str,
                 source: str | None) -> int:
    """--chunksize and --blobdev, refused where mkfs.erofs 1.9.4 refuses them (--blobdev
    without --chunksize or with -E force-inode-blockmap) or where mkfs.erofs 1.9.4
    writes a broken image (--tar=i) -> the chunk size in bytes (0: none)."""
    if blobdev is not None and chunksize is None:
        raise InputError("--blobdev needs --chunksize")
    if chunksize is None:
        # -E dedupe without -z: chunks of a block, as mkfs.erofs 1.9.4 turns it into
        # ("chunk-based data deduplication"; it leaves out the chunked-file feature bit)
        return 1 << blkszbits if "dedupe" in ext and not compressed and tar_mode != "i" else 0
    size = parse_chunksize(chunksize, 1 << blkszbits)
    if tar_mode == "i":
        # (mkfs.erofs 1.9.4 takes it, chunks nothing, and writes the tar's device
        # slot with 0 blocks)
        raise InputError("--chunksize: not with --tar=i (its files point into the tar)")
    if blobdev is not None:
        if "force-inode-blockmap" in ext:
            raise InputError("--blobdev: not with -E force-inode-blockmap (a block map "
                             "cannot name the device, as mkfs.erofs says)")
        if not blobdev:
            raise InputError("--blobdev: empty path")
        if os.path.realpath(blobdev) == os.path.realpath(image):
            raise InputError(f"--blobdev {blobdev}: the image itself")
        if source is not None and tar_mode is None:
            real, src = os.path.realpath(blobdev), os.path.realpath(source)
            if real == src or real.startswith(src.rstrip(os.sep) + os.sep):
                raise InputError(f"--blobdev {blobdev}: inside SOURCE {source}")
    return size


def parse_id_offset(text: str, what: str) -> int:
    """--uid-offset/--gid-offset N: as mkfs.erofs reads it (strtoul, base 0: 0x hex, a
    leading 0 octal), 0 .. 2^32-1."""
    m = re.fullmatch(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", text.strip())
    if m is None:
        raise InputError(f"{what}: invalid offset {text!r}")
    digits = m.group(0)
    v = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    if v >= 1 << 32:
        raise InputError(f"{what}: offset {text} is larger than 2^32-1")
    return v


def parse_xattr_tolerance(text: str) -> tuple[bool, bool, int]:
    """-x N as mkfs.erofs reads it (strtol, base 0): N < 0 leaves the source's xattrs out,
    N >= 2^31-1 shares none, else an xattr on more than N inodes is shared. -> (xattrs,
    shared_xattrs, shared_xattr_min)."""
    m = re.fullmatch(r"([-+]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text.strip())
    if m is None:
        raise InputError(f"-x: invalid xattr tolerance {text!r}")
    digits = m.group(2)
    v = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    v = -v if m.group(1) == "-" else v
    if v < 0:
        return False, False, 0
    if v >= (1 << 31) - 1:
        return True, False, 0
    return True, True, v + 1


def parse_root_xattr_isize(text: str) -> int:
    """--root-xattr-isize N (strtoull, base 0, as mkfs.erofs reads it) -> the root's xattr
    ibody size: N rounded up to 4 bytes, at least 16 (mkfs.erofs fails on 1..11 and
    writes a header-only ibody, which no reader takes, for 12); at most 65532."""
    m = re.fullmatch(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", text.strip())
    if m is None:
        raise InputError(f"--root-xattr-isize: invalid size {text!r}")
    digits = m.group(0)
    v = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    if v > 65532:
        raise InputError(f"--root-xattr-isize: {text} is too large (at most 65532)")
    return 0 if v == 0 else max(16, (v + 3) & ~3)


def parse_block_size(size: int | None, tar_mode: str | None = None) -> int:
    """-b SIZE -> log2 of it: a power of two from 512 to 4096 (the page size: the kernel
    mounts no larger block); --tar=i images have 512-byte blocks, the tar's own."""
    if size is None:
        return 9 if tar_mode == "i" else 12
    if size not in (512, 1024, 2048, 4096):
        raise InputError(f"-b {size}: the block size must be 512, 1024, 2048 or 4096")
    if tar_mode == "i" and size != 512:
        raise InputError(f"-b {size}: --tar=i images have 512-byte blocks (the tar's)")
    return size.bit_length() - 1


def parse_metazone(texts: Sequence[str]) -> int:
    """Each --MZ[=0|i|id] in command-line order (mkfs.erofs 1.9's metadata zone) -> 0, 1
    (i: the inode records) or 3 (d too: the directories' blocks), as the C core's ERN_MZ_*
    bits. As mkfs.erofs takes them: a bare --MZ ("id") sets both, "0" clears both, other
    values add their letters i and d (each any number of times; "" none) to those set
    before; d without i (so far) and any other letter refused."""
    flags = 0
    for text in texts:
        if text == "0":
            flags = 0
            continue
        if set(text) - {"i", "d"}:
            raise InputError(f"--MZ={text}: invalid metazone flags")
        flags |= (1 if "i" in text else 0) | (2 if "d" in text else 0)
        if flags == 2:
            raise InputError(f"--MZ={text}: inode metadata must be in the metadata zone if "
                             "directory data is stored there")
    return flags


def parse_metabox(text: str | None, blkszbits: int,
                  z: Compression | None) -> tuple[int, int, Compression | None]:
    """-m #[:X] (mkfs.erofs 1.9's metadata compression, Linux 6.17+) -> (#, the index of
    X in the -z list, the -z settings with X added to the list if it was not there), #
    0 without -m. # is the metabox's pcluster size (a multiple of the block size, at most
    -C's, as mkfs.erofs checks it); X its algorithm (ALG[,level=N]...; default: the first
    -z one, as mkfs.erofs's; one not in the -z list is added to it, as mkfs.erofs adds
    it). Without -z the metabox is stored plain (mkfs.erofs 1.9.4's -m# then), and an X
    is refused."""
    if text is None:
        return 0, 0, z
    size_text, colon, alg = text.partition(":")
    try:
        size = int(size_text, 0)
    except ValueError:
        raise InputError(f"-m {text}: invalid metabox option") from None
    blksz = 1 << blkszbits
    if size < blksz or size % blksz:
        raise InputError(f"-m {text}: invalid pcluster size {size} for the metabox inode")
    if z is not None and size > max(z.pcluster_size, blksz):
        raise InputError(f"-m {text}: the metabox's pcluster size exceeds -C's "
                         f"{max(z.pcluster_size, blksz)}")
    if not colon:
        return size, 0, z
    if z is None:
        raise InputError(f"-m {text}: a metabox algorithm without -z is not written by "
                         "this mkfs (without -z the metabox is stored plain)")
    want = parse_compress(alg).algorithms[0]
    for k, a in enumerate(z.algorithms):
        if a == want or (a.name == want.name and alg == want.name):
            return size, k, z
    if len(z.algorithms) >= 4:
        raise InputError(f"-m {text}: the -z list has 4 algorithms already")
    return size, len(z.algorithms), dataclasses.replace(z, more=(*z.more, want))


def parse_uuid(text: str) -> bytes | None:
    """UUID string, 'random' or 'clear' (all zero) -> 16 bytes or None (random)."""
    t = text.strip().lower()
    if t == "random":
        return None
    if t == "clear":
        return bytes(16)
    try:
        return _uuid.UUID(t).bytes
    except ValueError:
        raise InputError(f"-U: invalid UUID {text!r}") from None


def parse_label(text: str) -> bytes:
    b = os.fsencode(text)
    if len(b) > 15:
        raise InputError(f"-L: volume label {text!r} is longer than 15 bytes")
    if b"\0" in b:
        raise InputError("-L: volume label contains NUL")
    return b


def parse_exclude_path(text: str) -> bytes:
    b = os.fsencode(text).strip(b"/")
    while b.startswith(b"./"):
        b = b[2:]
    return b


def parse_exclude_regex(text: str) -> re.Pattern[bytes]:
    try:
        return re.compile(os.fsencode(text))
    except re.error as e:
        raise InputError(f"--exclude-regex: invalid regular expression {text!r}: {e}") from None


class Progress(Protocol):
    """What mkfs and pack report progress to (cli.progress.Progress)."""

    def scan(self, entries: int, nbytes: int, copied: int | None = None) -> object: ...

    def write(self, done: int, total: int) -> object: ...

    def done(self) -> object: ...
