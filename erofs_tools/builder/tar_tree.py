"""The in-memory tree of a tar layer: entries placed by the rules of docs/tar.md
(normalized paths, no traversal through symlinks or files, the later duplicate wins,
hardlinks to earlier entries, OCI whiteouts and opaque markers, implied parents), then
emitted into the C node-graph builder."""
from __future__ import annotations

import heapq
import stat

from erofs_tools._native import NativeBuilder
from erofs_tools.builder.tar_reader import Entry, _err, _show
from erofs_tools.builder.whiteout import (
    IMPLIED_VALUE,
    IMPLIED_XATTR,
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    ORIGIN_XATTR,
    WH_OPAQUE,
    WH_PREFIX,
    classify,
)
from erofs_tools.errors import ErofsToolsError, FormatLimitError, InputError

WHITEOUT_SPECS = ("oci", "overlayfs", "none")
# "aufs" is mkfs --tar --aufs (as mkfs.erofs 1.9): in archive order, `.wh.NAME` puts a
# whiteout (char 0:0, mode 0) at NAME like any entry (a later NAME replaces it, it
# replaces an earlier NAME) and marks its directory `trusted.overlay.origin=""` (so that
# overlayfs does not iterate it directly); `.wh..wh..opq` makes its directory opaque
TREE_SPECS = WHITEOUT_SPECS + ("aufs",)
# the xattrs of every node that has none: one shared dict, never mutated (nodes that get
# an xattr later are given a copy), 64 bytes less per entry
_NO_XATTRS: dict[bytes, bytes] = {}
MAX_SYMLINK = 4095
# Implied parent directories are the only nodes no header pays for: a 64 KiB path of
# `a/` components makes 32 K of them (~700 bytes of memory each), so a few KB of gzip
# asked for GBs. Their number is bounded by the (uncompressed) bytes read before the
# entry, one per IMPLIED_BYTES, plus IMPLIED_SLACK (one longest path's worth, so any
# single path is accepted): memory stays proportional to the input, as for entries.
IMPLIED_BYTES = 128
IMPLIED_SLACK = 1 << 16


class TNode:
    __slots__ = ("mode", "uid", "gid", "mtime", "nsec", "size", "rdev", "xattrs",
                 "target", "children", "key", "opaque", "implied", "origin")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0,
                 nsec: int = 0) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.nsec = nsec
        self.size = 0
        self.rdev = (0, 0)
        self.xattrs: dict[bytes, bytes] = _NO_XATTRS
        self.target: bytes | None = None
        self.children: dict[bytes, TNode] | None = {} if stat.S_ISDIR(mode) else None
        self.key: int | None = None
        self.opaque = False
        # a directory with no entry of its own (a parent of entries, or the root without
        # './'): merge keeps the metadata of the layers below for it (docs/tar.md)
        self.implied = False
        self.origin = False       # aufs: holds a whiteout (trusted.overlay.origin)

    def is_dir(self) -> bool:
        return self.children is not None


def _strip(d: TNode) -> None:
    """--ovlfs-strip (as mkfs.erofs): directory d without its whiteouts (char 0:0) and
    its opaque marker."""
    kids = _kids(d)
    for name in [k for k, c in kids.items() if stat.S_ISCHR(c.mode) and c.rdev == (0, 0)]:
        del kids[name]
    if OPAQUE_XATTR in d.xattrs:
        d.xattrs = {k: v for k, v in d.xattrs.items() if k != OPAQUE_XATTR}


# An inode's inline xattrs are at most 4 * 0xFFFE bytes of entries (its u16 count of
# 4-byte words), and at most 255 others can be shared (4 bytes each inline)
XATTR_INLINE_MAX = 4 * 0xFFFE
XATTR_SHARED_MAX = 255


def _check_xattr_room(name: bytes, xattrs: dict[bytes, bytes]) -> None:
    """Refuse, as it is read, an entry whose xattrs no inode can hold (the builder
    would refuse it only when the whole archive is in memory): each entry takes at
    least 4 bytes of header plus its value rounded to 4 (its name after a prefix may
    be empty with --xattr-prefix), the largest 255 may be shared."""
    sizes = [(len(v) + 7) & ~3 for v in xattrs.values()]
    total = sum(sizes)
    if total <= XATTR_INLINE_MAX:
        return
    total -= sum(n - 4 for n in heapq.nlargest(XATTR_SHARED_MAX, sizes))
    if total > XATTR_INLINE_MAX:
        raise FormatLimitError(f"{_show(name)}: xattrs of one inode exceed the inline "
                               f"limit ({len(xattrs)} xattrs)")


def _kids(d: TNode) -> dict[bytes, TNode]:
    """The children of `d`, a node the caller knows to be a directory."""
    assert d.children is not None, "not a directory"
    return d.children


def _split(path: bytes, what: bytes, clamp: bool = False) -> list[bytes]:
    """The components of an entry's path. A `..` component is an error, or with `clamp`
    (an OCI layer) it goes up one component and stays at the root there, as containerd's
    applier places an entry: Go's filepath.Clean of the name, then its leading `..`
    kept at the root by continuity's fs.RootPath (`a/../../etc/x` is `etc/x`)."""
    parts: list[bytes] = []
    for c in path.split(b"/"):
        if c in (b"", b"."):
            continue
        if c == b"..":
            if not clamp:
                raise _err(f"{_show(what)}: path contains '..'")
            if parts:
                parts.pop()
            continue
        parts.append(c)
    return parts


class TarTree:
    """Build the image tree from tar entries (see the module docstring for the rules)."""

    def __init__(self, whiteout_spec: str = "oci", timestamp: int | None = None,
                 mark_implied: bool = False, clamp: bool = False,
                 strip: bool = False, negative_mtimes: bool = False) -> None:
        """timestamp: every entry's mtime becomes it (nsec 0), or with `clamp` those at
        or after it (SOURCE_DATE_EPOCH); implied directories get it either way.
        negative_mtimes: mtimes before 1970 kept (mkfs --tar, as mkfs.erofs and the
        directory walk keep them), else clamped to 0 (RAFS layers, docs/tar.md)."""
        if whiteout_spec not in TREE_SPECS:
            raise InputError(f"unknown whiteout spec {whiteout_spec!r} "
                             "(choose oci, overlayfs or none)")
        self.spec = whiteout_spec
        self.timestamp = timestamp
        self.clamp = clamp
        self.strip = strip      # --ovlfs-strip: whiteouts and opaque markers left out
        self.min_mtime = -(1 << 63) if negative_mtimes else 0
        t = timestamp or 0
        self.root = TNode(stat.S_IFDIR | 0o755, 0, 0, t, 0)
        self.root.implied = True
        self.mark_implied = mark_implied
        self.whiteouts: list[tuple[TNode, bytes, Entry]] = []   # (parent, name, entry)
        self.next_key = 0
        self.regular: list[TNode] = []          # TNodes with data keys
        self.entries = 0
        self.implied = 0                        # implied directories made so far
        self.implied_limit = IMPLIED_SLACK      # raised as the stream is read (add)

    def _parent(self, parts: list[bytes], what: bytes) -> TNode:
        cur = self.root
        for i, c in enumerate(parts):
            kids = _kids(cur)     # the root, or a node checked below
            nxt = kids.get(c)
            if nxt is None:
                self.implied += 1
                if self.implied > self.implied_limit:
                    raise _err(f"{_show(what)}: more than {self.implied_limit} implied "
                               "directories (parents without an entry) for the size of "
                               "the archive read so far")
                nxt = TNode(stat.S_IFDIR | 0o755, 0, 0, self.timestamp or 0, 0)
                nxt.implied = True
                kids[c] = nxt
            elif not nxt.is_dir():
                kind = "a symlink" if stat.S_ISLNK(nxt.mode) else "not a directory"
                raise _err(f"{_show(what)}: parent {_show(b'/'.join(parts[:i + 1]))} is "
                           f"{kind}")
            cur = nxt
        return cur

    def _link_parts(self, e: Entry) -> list[bytes]:
        """The components of hardlink `e`'s target. In an OCI layer a `..` is taken as
        containerd's applier takes it (hardlinkRootPath: the target's directory through
        fs.RootPath, whose `..` stops at the root): it goes up one component, after a
        directory, a file or a name not (yet) in the layer alike; after a symlink of
        the layer, containerd goes up from where the symlink leads, which the layer
        alone may not tell: an error."""
        if self.spec != "oci":
            return _split(e.link, e.name)
        parts: list[bytes] = []
        nodes: list[TNode | None] = []
        for c in e.link.split(b"/"):
            if c in (b"", b"."):
                continue
            if c == b"..":
                if nodes and nodes[-1] is not None and stat.S_ISLNK(nodes[-1].mode):
                    raise _err(f"{_show(e.name)}: hardlink target {_show(e.link)} goes "
                               f"up ('..') from symlink {_show(b'/'.join(parts))}")
                if parts:
                    parts.pop()
                    nodes.pop()
                continue
            up = nodes[-1] if nodes else self.root
            nodes.append(up.children.get(c) if up is not None and up.children is not None
                         else None)
            parts.append(c)
        return parts

    def _lookup(self, parts: list[bytes]) -> TNode | None:
        cur: TNode | None = self.root
        for c in parts:
            kids = cur.children if cur is not None else None
            if kids is None:
                return None
            cur = kids.get(c)
        return cur

    def _meta(self, node: TNode, e: Entry) -> None:
        node.uid, node.gid = e.uid, e.gid
        if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32):
            raise FormatLimitError(f"{_show(e.name)}: uid/gid {e.uid}/{e.gid} out of range")
        if self.timestamp is not None and (not self.clamp or e.mtime >= self.timestamp):
            node.mtime, node.nsec = self.timestamp, 0
        elif e.mtime < self.min_mtime:
            node.mtime, node.nsec = self.min_mtime, 0     # documented: clamped
        else:
            node.mtime, node.nsec = min(e.mtime, (1 << 63) - 1), e.mtime_nsec
        if e.xattrs and self.spec == "oci":
            # containerd's applier sets no trusted.* xattr from a layer ("admin attributes
            # from archive not supported"): a layer's trusted.overlay.opaque would have
            # made its directory opaque here (merge reads the same xattr), hiding the
            # lower layers' files that containerd shows, and trusted.overlay.* reach an
            # overlay mount of the image
            node.xattrs = {k: v for k, v in e.xattrs.items()
                           if not k.startswith(b"trusted.")} or _NO_XATTRS
        else:
            node.xattrs = dict(e.xattrs) if e.xattrs else _NO_XATTRS
        if len(node.xattrs) > 16:
            _check_xattr_room(e.name, node.xattrs)

    def add(self, e: Entry) -> TNode | None:
        """Place entry e; -> TNode whose data the caller must stream (regular files),
        else None."""
        t = e.type
        if t in (b"0", b"\0", b"7") and e.name.endswith(b"/"):
            t = b"5"              # v7 / old GNU: a "file" whose name ends in '/' is a dir
        parts = _split(e.name, e.name, self.spec == "oci")
        self.entries += 1
        self.implied_limit = IMPLIED_SLACK + e.offset // IMPLIED_BYTES
        if t in (b"V",):
            return None
        if t == b"M":
            raise _err(f"{_show(e.name)}: multi-volume archives are not supported")
        if not parts:
            if self.spec == "oci":
                # containerd's applier ignores an entry that is the root ("resolved to
                # root"): a layer's ./ of mode 0700 or another owner, as tarring a
                # mktemp directory gives, left / of the image unreadable to a non-root
                # user, where containerd's stays 0755 root:root
                return None
            if t not in (b"5", b"D"):
                raise _err(f"{_show(e.name)}: entry would replace the root directory")
            self._meta(self.root, e)
            self.root.mode = stat.S_IFDIR | e.mode
            self.root.implied = False
            return None
        name = parts[-1]
        if len(name) > 255:
            raise FormatLimitError(f"{_show(e.name)}: name longer than 255 bytes")
        if self.spec == "aufs" and name.startswith(WH_PREFIX) and name != WH_PREFIX:
            self._aufs(parts, name, e)
            return None
        kind, target = classify(name) if self.spec == "oci" else (None, None)
        if self.spec == "oci" and any(classify(c)[0] == "meta" for c in parts[:-1]):
            return None           # inside aufs metadata (.wh..wh.plnk/...): dropped
        if kind is not None:
            parent = self._parent(parts[:-1], e.name)
            if kind == "opaque":
                parent.opaque = True
            elif kind == "whiteout" and target is not None:     # always set for "whiteout"
                self.whiteouts.append((parent, target, e))
            return None
        parent = self._parent(parts[:-1], e.name)
        siblings = _kids(parent)
        old = siblings.get(name)
        if t in (b"5", b"D"):
            if old is not None and old.is_dir():
                node = old
            else:
                node = TNode(stat.S_IFDIR | e.mode)
                siblings[name] = node
            self._meta(node, e)
            node.mode = stat.S_IFDIR | e.mode
            node.implied = False
            return None
        if t == b"1":
            linked = self._lookup(self._link_parts(e))
            if linked is None:
                raise _err(f"{_show(e.name)}: hardlink target {_show(e.link)} is not in the "
                           "archive before it")
            if linked.is_dir():
                raise _err(f"{_show(e.name)}: hardlink to directory {_show(e.link)}")
            siblings[name] = linked
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
        siblings[name] = node
        return node if node.key is not None else None

    def _aufs(self, parts: list[bytes], name: bytes, e: Entry) -> None:
        parent = self._parent(parts[:-1], e.name)
        if name == WH_OPAQUE:
            parent.opaque = True
            return
        target = name[len(WH_PREFIX):]
        wh = TNode(stat.S_IFCHR)
        self._meta(wh, e)
        wh.xattrs = _NO_XATTRS
        _kids(parent)[target] = wh
        parent.origin = True

    def finish(self) -> None:
        """Apply OCI whiteouts and opaque markers (spec "oci")."""
        done = set()
        for parent, name, e in self.whiteouts:
            same = _kids(parent).get(name)
            if same is not None or (id(parent), name) in done:
                # the same layer has NAME: it wins over the whiteout, which still removes
                # NAME of the layers below (whatever the order of the two in the layer,
                # as umoci and containerd apply it). A directory NAME must then hide the
                # lower directory's entries, or they would show through it: opaque
                if same is not None and same.is_dir():
                    same.opaque = True
                continue
            done.add((id(parent), name))
            wh = TNode(stat.S_IFCHR)
            self._meta(wh, e)
            wh.xattrs = _NO_XATTRS
            _kids(parent)[name] = wh
        # opaque: set on nodes still in the tree
        stack = [self.root]
        while stack:
            n = stack.pop()
            if self.strip:
                _strip(n)
            else:
                if n.opaque:
                    n.xattrs = {**n.xattrs, OPAQUE_XATTR: OPAQUE_VALUE}
                if n.origin:
                    n.xattrs = {**n.xattrs, ORIGIN_XATTR: b""}
            stack.extend(c for c in _kids(n).values() if c.is_dir())

    def emit(self, nb: NativeBuilder) -> tuple[dict[int, int], dict[int, int], bool]:
        """Add the tree to NativeBuilder nb; -> {TNode key: node id}, has_xattrs."""
        ids: dict[int, int] = {}        # id(TNode) -> node id
        keys: dict[int, int] = {}
        has_x = False

        def add(n: TNode, path: bytes) -> tuple[int, bool]:
            nonlocal has_x
            nid = ids.get(id(n))
            if nid is not None:
                return nid, False
            try:
                nid = nb.add_node(n.mode, n.uid, n.gid, n.mtime, n.nsec, n.size,
                                  n.rdev[0], n.rdev[1])
                if n.target is not None:
                    nb.set_bytes(nid, n.target)
                xattrs = n.xattrs
                if n.implied and self.mark_implied:
                    xattrs = {**xattrs, IMPLIED_XATTR: IMPLIED_VALUE}
                for k in sorted(xattrs):
                    nb.add_xattr(nid, k, xattrs[k])
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
            kids = _kids(d)
            for name in sorted(kids):
                c = kids[name]
                path = dpath + b"/" + name
                cid, new = add(c, path)
                try:
                    nb.add_child(did, name, cid)
                except ErofsToolsError as ex:
                    raise type(ex)(f"{_show(path)}: {ex}") from None
                if new and c.is_dir():
                    stack.append((c, cid, path))
        return ids, keys, has_x
