"""Helpers for the tar-layer, merge and convert tests: building layer tars, packing them,
mounting RAFS images eagerly, and an independent reference extraction (GNU tar -x per
layer, with OCI whiteouts applied by hand before each layer is extracted).

    data = make_tar(entries, fmt=tarfile.PAX_FORMAT)     # entries: list of E(...)
    ref = reference_rootfs([layer1, layer2], dest)      # OCI semantics, full metadata
    with mounted_rafs(boot, blob_dir) as mnt: ...        # erofs-tools mount (eager)
"""
import contextlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

from helpers import require_root_kernel

MTIME = 1_600_000_000


class E:
    """One tar entry: kind in file/dir/symlink/hardlink/chr/blk/fifo."""

    def __init__(self, name, kind="file", data=b"", mode=None, uid=0, gid=0,
                 mtime=MTIME, link="", rdev=(0, 0), xattrs=None):
        self.name, self.kind, self.data = name, kind, data
        self.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
        self.uid, self.gid, self.mtime = uid, gid, mtime
        self.link, self.rdev, self.xattrs = link, rdev, xattrs or {}


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def make_tar(entries, fmt=tarfile.PAX_FORMAT, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime
            ti.uname = ti.gname = ""
            if e.kind in ("symlink", "hardlink"):
                ti.linkname = e.link
            if e.kind in ("chr", "blk"):
                ti.devmajor, ti.devminor = e.rdev
            if e.xattrs:
                ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def run_cli(*args, input=None, check=True, env=None):
    p = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                       input=input, capture_output=True,
                       env=None if env is None else {**os.environ, **env})
    if check:
        assert p.returncode == 0, f"{args[0]} failed: {p.stdout!r} {p.stderr!r}"
    return p


def index_layer(idx, tar, dest):
    """containerd's layout of a tar index: the tar appended to the index, one
    self-contained image at `dest` (-> dest)."""
    with open(dest, "wb") as out:
        for part in (idx, tar):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return dest


def check_and_unpack(idx, device, out):
    """Our reader on a tar index with its tar as device 1: `check` finds nothing and
    `unpack` writes its tree to `out` (-> out)."""
    p = run_cli("check", "--device", device, idx, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("unpack", "--device", device, "-o", out, idx, check=False)
    assert p.returncode == 0, p.stderr
    return out


def pack_tar(tar_path, boot, blob_dir, *args, check=True):
    os.makedirs(blob_dir, exist_ok=True)
    return run_cli("pack", "--type", "tar", tar_path, "-B", boot, "-D", blob_dir, *args,
                   check=check)


@contextlib.contextmanager
def mounted_rafs(boot, blob_dir, cache_dir=None):
    """Eager `erofs-tools mount` of a bootstrap; yield the mount point."""
    require_root_kernel()
    from erofs_tools.mount import mount_rafs, umount
    mnt = tempfile.mkdtemp(prefix="erofs-rafs-mnt-")
    cache = cache_dir or tempfile.mkdtemp(prefix="erofs-rafs-cache-", dir="/var/tmp")
    try:
        mount_rafs(boot, mnt, blob_dir, cache)
        try:
            yield mnt
        finally:
            try:
                umount(mnt)
            except Exception:
                umount(mnt, lazy=True)
    finally:
        os.rmdir(mnt)
        if cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)


def tar_x(tar_path, dest, *extra):
    """GNU tar -x as root with owners, modes, xattrs."""
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "--same-owner", "-xpf", tar_path, "-C", dest, *extra],
                   check=True, capture_output=True)


def tar_x_reference(tar_path, dest):
    """The tar extracted into a new directory `dest` as the image should read: GNU tar
    makes its symlinks last, after it set their directory's mtime, so every directory's
    mtime is set again from the tar."""
    os.makedirs(dest)
    tar_x(tar_path, str(dest))
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.isdir():
                os.utime(os.path.join(dest, m.name), (m.mtime, m.mtime))
    return dest


def fix_root(dest, mode=0o755, mtime=0):
    """The image root of a tar without a './' entry: 0755 root:root, mtime 0."""
    os.chmod(dest, mode)
    os.chown(dest, 0, 0)
    os.utime(dest, ns=(mtime, mtime))


def _rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def reference_rootfs(layer_tars, dest, keep_trusted=False):
    """Extract layer tars in order into DEST with OCI whiteout semantics, independently
    of erofs-tools: whiteouts and opaque markers of a layer remove entries of the layers
    below before the layer is extracted with GNU tar (without its .wh. entries); an
    entry whose type differs from what is below replaces it."""
    os.makedirs(dest, exist_ok=True)
    for path in layer_tars:
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        for m in members:
            name = os.path.normpath(m.name.lstrip("/"))
            d, base = os.path.split(name)
            if base == ".wh..wh..opq":
                full = os.path.join(dest, d)
                if os.path.isdir(full) and not os.path.islink(full):
                    for c in os.listdir(full):
                        _rm(os.path.join(full, c))
            elif base.startswith(".wh.") and not base.startswith(".wh..wh."):
                _rm(os.path.join(dest, d, base[4:]))
        for m in members:
            name = os.path.normpath(m.name.lstrip("/"))
            if os.path.basename(name).startswith(".wh.") or name == ".":
                continue
            full = os.path.join(dest, name)
            if os.path.lexists(full):
                below_dir = os.path.isdir(full) and not os.path.islink(full)
                if below_dir != m.isdir():
                    _rm(full)
        tar_x(path, dest, "--exclude=.wh.*")
    fix_root(dest)
    if not keep_trusted:        # layers packed as OCI layers (--whiteout-spec oci)
        _drop_trusted(dest)
    return dest


def _drop_trusted(dest):
    """containerd sets no trusted.* xattr from a layer (GNU tar does)."""
    for dirpath, dirs, files in os.walk(dest):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in dirs + files]:
            for x in os.listxattr(n, follow_symlinks=False):
                if x.startswith("trusted."):
                    os.removexattr(n, x, follow_symlinks=False)


def layer_paths(tmp_path, layers):
    out = []
    for i, entries in enumerate(layers):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(make_tar(entries))
        out.append(str(p))
    return out


# Three layers exercising whiteouts, opaque directories and type changes.
def sample_layers():
    big = bytes(range(256)) * 9000          # > 2 chunks of 1 MiB
    l1 = [
        E("etc", "dir"), E("etc/passwd", data=b"root:x:0:0\n"),
        E("etc/gone.conf", data=b"bye\n"), E("etc/keep.conf", data=b"keep\n", mode=0o600,
                                                 uid=1000, gid=100),
        E("opt", "dir"), E("opt/app", "dir"), E("opt/app/old1", data=b"1"),
        E("opt/app/old2", data=b"2"), E("opt/app/sub", "dir"), E("opt/app/sub/x", data=b"x"),
        E("var", "dir"), E("var/lib", "dir"), E("var/lib/data.bin", data=big),
        E("var/lib/link", "hardlink", link="var/lib/data.bin"),
        E("usr", "dir"), E("usr/bin", "dir"), E("usr/bin/tool", data=b"#!/bin/sh\n",
                                                mode=0o755),
        E("usr/bin/alias", "symlink", link="tool"),
        E("dev", "dir"), E("dev/null", "chr", mode=0o666, rdev=(1, 3)),
        E("dev/fifo", "fifo"), E("tmp", "dir", mode=0o1777),
        E("tmp/dir-to-file", "dir"), E("tmp/dir-to-file/inner", data=b"inner"),
        E("tmp/file-to-dir", data=b"file"),
        E("xa", data=b"xattrs", xattrs={"user.one": "1", "trusted.t": "tv"}),
    ]
    l2 = [
        E("etc", "dir", mtime=MTIME + 10), E("etc/.wh.gone.conf", data=b""),
        E("etc/passwd", data=b"root:x:0:0\nuser:x:1000:100\n", mtime=MTIME + 10),
        E("opt", "dir"), E("opt/app", "dir", mode=0o750, mtime=MTIME + 20),
        E("opt/app/.wh..wh..opq"), E("opt/app/new", data=b"new"),
        E("tmp", "dir", mode=0o1777), E("tmp/dir-to-file", data=b"now a file"),
        E("tmp/file-to-dir", "dir"), E("tmp/file-to-dir/f", data=b"f"),
        E("var", "dir"), E("var/lib", "dir"), E("var/lib/.wh.link"),
        E("usr", "dir"), E("usr/bin", "dir"), E("usr/bin/.wh.alias"),
        E("usr/bin/alias", "symlink", link="other"),      # same layer: entry wins
    ]
    l3 = [
        E("usr", "dir"), E("usr/.wh.bin"), E("usr/lib", "dir"), E("usr/lib/x.so", data=b"so"),
        E("etc", "dir", mtime=MTIME + 10), E("etc/passwd2", data=b"p2"),
        E("etc/new", "hardlink", link="etc/passwd2"),
        E("dev", "dir"), E("dev/.wh.fifo"),
    ]
    return [l1, l2, l3]


def is_whiteout_dev(path):
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_oci_layout(path, layer_tars, gz=True, tag="v1", index=False):
    """An OCI image layout at PATH holding one image made of LAYER_TARS (paths);
    -> (layout, manifest). index=True wraps the manifest in a platform index."""
    import gzip as _gzip
    import hashlib
    import json

    from erofs_tools.registry import Descriptor, OciLayout, build_index, build_manifest
    from erofs_tools.registry import mediatypes as mt
    lay = OciLayout(path, create=True)
    descs, diff_ids = [], []
    for t in layer_tars:
        raw = open(t, "rb").read()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        data = _gzip.compress(raw, mtime=0) if gz else raw
        d = lay.write_blob(data)
        descs.append(Descriptor(mt.OCI_LAYER_TAR_GZIP if gz else mt.OCI_LAYER_TAR,
                                d.digest, d.size))
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "config": {"Env": ["PATH=/usr/bin"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "history": [{"created_by": f"layer {i}"} for i in range(len(descs))]
                      }).encode()
    c = lay.write_blob(cfg)
    m = build_manifest(Descriptor(mt.OCI_CONFIG, c.digest, c.size), descs)
    if index:
        lay.put_manifest(m)
        idx = build_index([Descriptor(mt.OCI_MANIFEST, m.digest, len(m.data),
                                      platform={"os": "linux", "architecture": "amd64"})])
        lay.put_manifest(idx, tag)
    else:
        lay.put_manifest(m, tag)
    return lay, m
