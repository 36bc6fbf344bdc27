"""`erofs-tools mkfs` driver: walk SOURCE, lay out and write IMAGE atomically.

The image is written to a temporary file beside IMAGE and renamed over it at the end;
any error removes the temporary file, so no partial image is ever left behind. A block
device is written in place instead, as mkfs.erofs does (builder/output.py).

Reproducibility: children are sorted bytewise and nids follow a fixed breadth-first
order, so the same tree with the same -T and -U gives a byte-identical image. Without
-U the UUID is random (as mkfs.erofs). Without -T/SOURCE_DATE_EPOCH the superblock
build time is the most common (mtime, nsec) of the tree, so that most inodes can be
compact (32 bytes); every other inode is extended and carries its own mtime.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid as _uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from erofs_tools._native import COMPRESSORS, BuildOptions, LayoutInfo, NativeBuilder
from erofs_tools._native_put import blob_blocks, set_blob, set_metazone
from erofs_tools.builder.options import MkfsOptions, Progress
from erofs_tools.builder.output import partly_written, prepare, tree_data_bound
from erofs_tools.builder.tree import TreeWalker
from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.fsutil import ImageTarget, image_output, is_block_device, refuse_special

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath


def _inside(path: str, directory: str) -> bool:
    path = os.path.realpath(path)
    directory = os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_paths(image: str, source: str) -> None:
    try:
        st = os.stat(source)
    except OSError as e:
        raise InputError(f"{source}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{source}: not a directory")
    parent = os.path.dirname(os.path.abspath(image)) or "."
    if not os.path.isdir(parent):
        raise InputError(f"{image}: directory {parent} does not exist")
    if os.path.isdir(image):
        raise InputError(f"{image}: is a directory")
    refuse_special(image, block_ok=True)
    if is_block_device(image):
        return                      # (written in place: no new file in SOURCE)
    real_img = os.path.join(os.path.realpath(parent), os.path.basename(image))
    if _inside(real_img, source):
        raise InputError(f"{image}: the image would be inside SOURCE {source}")


# -E fragdedupe as the C core's erofs_opts.fragdedupe takes it
FRAGDEDUPE_MODES = {"full": 0, "inode": 1, "off": 2}


@contextlib.contextmanager
def chunk_blob(opts: MkfsOptions, umask: int) -> Iterator[ImageTarget | None]:
    """--blobdev: the blob (a file written beside its name and renamed at the end, or a
    block device written in place, as an image), or None."""
    if opts.blobdev is None:
        yield None
        return
    with image_output(opts.blobdev, mode=0o666 & ~umask) as blob:
        yield blob


def start_blob(nb: NativeBuilder, blob: ImageTarget | None) -> None:
    """Before the first file: the device slot (its size set by finish_blob) and the
    chunks' data into the blob."""
    if blob is not None:
        nb.add_device(b"", 0, 0)
        set_blob(nb, blob.file.fileno())


def finish_blob(nb: NativeBuilder, blob: ImageTarget | None, info: LayoutInfo,
                blkszbits: int) -> None:
    """After the layout: the blob's blocks in its slot, mapped after the image's own
    blocks, as mkfs.erofs fills it."""
    if blob is not None:
        nb.set_device(1, blob_blocks(nb), info.image_size >> blkszbits)


def build_options(opts: MkfsOptions) -> BuildOptions:
    ts = opts.effective_timestamp()
    z = opts.compress
    return BuildOptions(
        compress_alg=COMPRESSORS[z.algorithm] if z else 0,
        compress_level=z.level if z and z.level is not None else -1,
        pcluster_size=z.pcluster_size if z else 0,
        compress_full_index=z.full_index if z else False,
        ztailpacking=z.ztailpacking if z else False,
        fragments=z.fragments if z else False,
        packed_pcluster_size=z.packed_pcluster_size if z else 0,
        dedupe=z.dedupe if z else False,
        all_fragments=z.all_fragments if z else False,
        fragdedupe=FRAGDEDUPE_MODES[z.fragdedupe] if z else 0,
        max_extent=z.max_extent if z else 0,
        compress_dirs=opts.compress_dirs,
        compress_alt=tuple((COMPRESSORS[a.name], -1 if a.level is None else a.level)
                           for a in z.more) if z else (),
        compress_dict_size=tuple(a.dict_size for a in z.algorithms) if z else (),
        compress_lzma_props=tuple(a.lzma_props for a in z.algorithms) if z else (),
        pcluster_max=max((h.pcluster_size for h in opts.compress_hints), default=0),
        compress_threads=opts.workers,
        uuid=opts.uuid if opts.uuid is not None else _uuid.uuid4().bytes,
        volume_name=opts.label,
        build_time=ts,
        build_time_nsec=0,
        shared_xattrs=opts.shared_xattrs,
        shared_xattr_min=opts.shared_xattr_min,
        root_xattr_isize=opts.root_xattr_isize,
        inline_data=opts.inline_data,
        stream_data=True,
        blkszbits=opts.blkszbits,
        xattr_filter=opts.xattr_filter,
        sb_checksum=opts.sb_checksum,
        force_extended=opts.force_extended,
        ignore_mtime=opts.ignore_mtime,
        force_compact=opts.force_compact,
        plain_xattr_pfx=opts.plain_xattr_prefixes or bool(opts.metabox),  # (-m: as the kernel reads it)
        sb_48bit=opts.sb_48bit or opts.dot_omitted or bool(opts.metabox),
        metabox=(opts.metabox, opts.metabox_alg),
        dot_omitted=opts.dot_omitted,
        feature_incompat=E.FEATURE_INCOMPAT_CHUNKED_FILE if opts.chunksize else 0,
        devt_slotoff=-(-(E.SUPER_OFFSET + 128 + (16 if opts.metabox else 0)) // E.DEVICE_SLOT_SIZE)
        if opts.blobdev else 0,
        chunkbits=opts.chunksize.bit_length() - 1 if opts.chunksize else 0,
        chunk_indexes=opts.chunk_indexes,
        chunk_dedupe=opts.chunk_dedupe,
    )


def fsalign(nb: NativeBuilder, info: LayoutInfo, blocks: int, blkszbits: int) -> LayoutInfo:
    """--fsalignblks: the image (and sb.blocks) grown to a multiple of `blocks` blocks,
    zeros after the end, as mkfs.erofs rounds its primary device's block count."""
    unit = blocks << blkszbits
    end = -(-info.image_size // unit) * unit
    if end == info.image_size:
        return info
    nb.put_bytes(end - 1, b"\0")
    return nb.refresh_info()


def mkfs(image: StrOrBytesPath, source: StrOrBytesPath, opts: MkfsOptions | None = None,
         progress: Progress | None = None) -> dict[str, Any]:
    """Build IMAGE from directory SOURCE. progress: object with .scan(entries, bytes, copied),
    .write(inodes_done, inodes_total) and .done() (or None). -> summary dict."""
    opts = opts or MkfsOptions()
    t0 = time.monotonic()
    image = os.fsdecode(os.fspath(image))
    source = os.fsdecode(os.fspath(source))
    check_paths(image, source)
    umask = os.umask(0)
    os.umask(umask)
    nb = None
    # like mkfs.erofs, no fsync of the image: the rename still never exposes a partial one
    # (a block device: written in place, see builder/output.py)
    with image_output(image, mode=0o666 & ~umask, offset=opts.offset) as target, \
            partly_written(target, image), chunk_blob(opts, umask) as blob:
        fd = target.file.fileno()
        try:
            nb = NativeBuilder(build_options(opts))
            if opts.metazone:
                set_metazone(nb, opts.metazone)
            need = 1 << opts.blkszbits
            if (target.device and opts.compress is None and not opts.exclude_paths
                    and not opts.exclude_regex and not opts.chunksize):
                need += tree_data_bound(source, need, target.limit)
            prepare(nb, target, need, image, opts.dsunit)
            # file data is copied by a C thread while Python walks the tree
            nb.set_output(fd)
            start_blob(nb, blob)
            on_entry = None
            if progress:
                on_entry = lambda n, nbytes: progress.scan(n, nbytes, nb.stream_progress())  # noqa: E731
            TreeWalker(nb, opts, on_entry=on_entry).walk(source)
            info = fsalign(nb, nb.layout(), opts.fsalignblks, opts.blkszbits)
            finish_blob(nb, blob, info, opts.blkszbits)
            wp = None
            if progress:
                wp = lambda done, left: progress.write(info.inodes - left, info.inodes)  # noqa: E731
            nb.write(fd, progress=wp)
            if opts.metabox:
                info = nb.refresh_info()    # (-m -z: the compressed metabox ends it)
            filled = nb.target_filled()
        finally:
            if nb is not None:
                nb.close()          # stops the copy thread before fd is closed
    if progress:
        progress.done()
    extra = {"zero_filled": filled} if target.device else {}
    return {
        **extra,
        "image": image,
        "source": source,
        "inodes": info.inodes,
        "blocks": info.image_size >> opts.blkszbits,
        "bytes": info.image_size,
        "data_bytes": info.data_bytes,
        "root_nid": info.root_nid,
        "build_time": info.build_time,
        "uuid": str(_uuid.UUID(bytes=nb.options.uuid)),
        "seconds": round(time.monotonic() - t0, 3),
    }
