"""Full-metadata snapshots of directory trees and images, for comparisons (tests, verify)."""
from __future__ import annotations

import hashlib
import os
import stat as _stat


def snapshot_dir(root, xattrs=True, content=True, mtime=True):
    """{relpath: attrs} for every entry under `root` (root itself as "")."""
    out = {}
    inode_first = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        names = [(dirpath, n) for n in dirnames + filenames]
        if dirpath == root:
            names.insert(0, (root, None))
        for d, n in names:
            p = d if n is None else os.path.join(d, n)
            rel = os.path.relpath(p, root) if n is not None else ""
            st = os.lstat(p)
            a = {"type": _stat.S_IFMT(st.st_mode), "mode": _stat.S_IMODE(st.st_mode),
                 "uid": st.st_uid, "gid": st.st_gid}
            if mtime and not _stat.S_ISLNK(st.st_mode):
                a["mtime_ns"] = st.st_mtime_ns
            if _stat.S_ISREG(st.st_mode):
                a["size"] = st.st_size
                if content:
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        for b in iter(lambda: f.read(1 << 20), b""):
                            h.update(b)
                    a["sha256"] = h.hexdigest()
                inode_first.setdefault((st.st_dev, st.st_ino), []).append(rel)
                a["_key"] = (st.st_dev, st.st_ino)
                a["nlink"] = st.st_nlink
            elif _stat.S_ISLNK(st.st_mode):
                a["target"] = os.readlink(p)
            elif _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode):
                a["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if xattrs:
                try:
                    names_ = os.listxattr(p, follow_symlinks=False)
                except OSError:
                    names_ = []
                xs = {}
                for xn in sorted(names_):
                    try:
                        xs[xn] = os.getxattr(p, xn, follow_symlinks=False)
                    except OSError:
                        pass
                a["xattrs"] = xs
            out[rel] = a
    for a in out.values():
        key = a.pop("_key", None)
        if key is not None:
            a["links"] = sorted(inode_first[key])
    return out


def diff(a, b, limit=20):
    """Human-readable differences between two snapshots (empty list = equal)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in second: {k!r}")
        elif k not in b:
            out.append(f"only in first: {k!r}")
        elif a[k] != b[k]:
            keys = sorted(set(a[k]) | set(b[k]))
            d = {x: (a[k].get(x), b[k].get(x)) for x in keys if a[k].get(x) != b[k].get(x)}
            out.append(f"{k!r}: {d}")
        if len(out) >= limit:
            break
    return out
