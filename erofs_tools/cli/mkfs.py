"""`erofs-tools mkfs IMAGE SOURCE`: an EROFS image of a directory (uncompressed or -z)."""
import dataclasses
import json

import click

from erofs_tools.builder.mkfs import mkfs as build_image
from erofs_tools.builder.options import (
    INODE_DIGEST_DEFAULT,
    MkfsOptions,
    check_chunks,
    check_tuning,
    parse_block_size,
    parse_compress,
    parse_compress_hints,
    parse_exclude_path,
    parse_exclude_regex,
    parse_extended,
    parse_fsalignblks,
    parse_id_offset,
    parse_inode_digest,
    parse_label,
    parse_metabox,
    parse_metazone,
    parse_offset,
    parse_root_xattr_isize,
    parse_timestamp,
    parse_uuid,
    parse_xattr_prefixes,
    parse_xattr_tolerance,
    zfeature_extended,
)
from erofs_tools.builder.tar_map import check_map_options, parse_tar_arg
from erofs_tools.builder.vmdk import check_vmdk_path, write_vmdk_desc
from erofs_tools.cli.mkfs_tar import (
    MkfsCommand,
    check_tar_flags,
    parse_build_mode,
    refuse_with_incremental,
    run_incremental,
    run_tar,
    tar_options,
)
from erofs_tools.cli.progress import Progress
from erofs_tools.errors import InputError, terminate_as_interrupt


@click.command("mkfs", cls=MkfsCommand)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("source", type=click.Path(), required=False)
@tar_options
@click.option("-T", "--timestamp", metavar="SECONDS",
              help="Set every inode's mtime and the build time to this UNIX time "
                   "(default: SOURCE_DATE_EPOCH if set, which is the build time and "
                   "clamps the mtimes after it; else keep the tree's mtimes).")
@click.option("--mkfs-time", "all_time", flag_value=False,
              help="-T (or SOURCE_DATE_EPOCH) is the build time only; files keep their "
                   "mtimes.")
@click.option("--all-time", "all_time", flag_value=True, default=True,
              help="-T also sets every file's mtime (the default); SOURCE_DATE_EPOCH "
                   "clamps the mtimes after it.")
@click.option("--ignore-mtime", "ignore_mtime", flag_value=True, default=False,
              help="Files whose mtime is not the build time may still get compact inodes: "
                   "their mtime becomes the build time (as mkfs.erofs).")
@click.option("--preserve-mtime", "ignore_mtime", flag_value=False,
              help="Keep every file's mtime (the default): an mtime other than the build "
                   "time makes the inode extended.")
@click.option("--ovlfs-strip", "ovlfs_strip", type=click.Choice(["0", "1"]), default="0",
              metavar="0|1",
              help="1: leave overlayfs whiteouts (char 0:0) and opaque markers out of the "
                   "image; 0 (default): keep them, and mark a directory holding whiteouts "
                   "trusted.overlay.origin, as mkfs.erofs.")
@click.option("-b", "block_size", type=int, metavar="SIZE",
              help="Block size in bytes: 512, 1024, 2048 or 4096 (default); --tar=i "
                   "images have the tar's 512.")
@click.option("-U", "--uuid", "uuid_text", metavar="UUID",
              help="Volume UUID, 'random' (default) or 'clear'.")
@click.option("-L", "--label", default="", help="Volume label (at most 15 bytes).")
@click.option("--all-root", is_flag=True, help="Make all files owned by root (uid/gid 0).")
@click.option("--force-uid", type=click.IntRange(0, 2**32 - 1), help="Set every uid to this.")
@click.option("--force-gid", type=click.IntRange(0, 2**32 - 1), help="Set every gid to this.")
@click.option("--uid-offset", metavar="N",
              help="Add N to every uid (after --force-uid/--all-root), as mkfs.erofs.")
@click.option("--gid-offset", metavar="N",
              help="Add N to every gid (after --force-gid/--all-root).")
@click.option("--offset", metavar="BYTES",
              help="Write the image after the first BYTES bytes of IMAGE (a file or a block "
                   "device), which are kept, as mkfs.erofs --offset.")
@click.option("--fsalignblks", metavar="N",
              help="Round the image size (and the superblock's block count) up to a multiple "
                   "of N blocks, N rounded up to a power of two, as mkfs.erofs.")
@click.option("--dsunit", metavar="N",
              help="Start each file's data on a multiple of N blocks (a RAID stripe unit), "
                   "as mkfs.erofs (with -z: each file's first pcluster).")
@click.option("--max-extent-bytes", "max_extent", metavar="N",
              help="With -z: at most N bytes of input per compressed extent (at least the "
                   "block size; 0: no cap), as mkfs.erofs; without -z accepted, no effect, "
                   "as there.")
@click.option("--async-queue-limit", "async_limit", metavar="N",
              help="mkfs.erofs's job queue length (a power of two): accepted, no effect "
                   "(a tuning knob; the image is the same).")
@click.option("--hard-dereference", is_flag=True,
              help="Each link of a hardlinked file becomes an inode of its own, as "
                   "mkfs.erofs (--tar: no effect there, as in mkfs.erofs).")
@click.option("--mount-point", metavar="PATH",
              help="Where the image will be mounted (mkfs.erofs: the prefix of the paths "
                   "looked up in SELinux file contexts / Android fs-config, which this mkfs "
                   "does not read): accepted, no effect on the image.")
@click.option("--exclude-path", multiple=True, metavar="PATH",
              help="Skip this path (relative to SOURCE) and what is below it; repeatable.")
@click.option("--exclude-regex", multiple=True, metavar="REGEX",
              help="Skip paths (relative to SOURCE) matching this regex; repeatable.")
@click.option("--no-shared-xattrs", is_flag=True,
              help="Keep all xattrs inline (by default xattrs on >= 2 inodes are shared).")
@click.option("-x", "xattr_tolerance", metavar="N",
              help="As mkfs.erofs: an xattr on more than N inodes goes to the shared area "
                   "(default: on 2 or more); N < 0 leaves the source's xattrs out "
                   "(directories only, as mkfs.erofs: --tar keeps the archive's).")
@click.option("-d", "debug_level", type=click.IntRange(0, 9), metavar="0-9",
              help="mkfs.erofs's message level: accepted; the output stays as -q/--json say.")
@click.option("-z", "compress", metavar="ALG[,level=N][,dictsize=N]",
              help="Compress regular files: lz4, lz4hc, lzma, deflate or zstd "
                   "(as mkfs.erofs -z, with level=, dictsize= and lzma's lc=, lp=, pb=); data "
                   "that would not save a block is stored plain. --tar=i: the files stay in "
                   "the tar; --zD's directories and -m's metabox are compressed.")
@click.option("-m", "metabox", metavar="#[:X]",
              help="Metadata compression (Linux 6.17+): every inode in a metabox inode "
                   "compressed in pclusters of # bytes (at most -C's) with X, the first -z "
                   "algorithm (the default; without -z stored plain), as mkfs.erofs 1.9 -m.")
@click.option("--MZ", "metazone", metavar="0|i|id", multiple=True,
              help="id (or a bare --MZ): the inode records (i) and the directories' blocks "
                   "(d) in a metadata zone after the data, nids counted from the block "
                   "before it; i: the records only; 0: neither (default), as mkfs.erofs "
                   "1.9 --MZ (d needs i). With -m the records are in the metabox.")
@click.option("--zD", "zdirs", type=click.Choice(["0", "1"]), metavar="0|1",
              help="1 (or a bare --zD): every directory whole in the packed inode, compressed "
                   "with it (with -z; without, stored plain), as mkfs.erofs 1.9 --zD; 0 "
                   "(default): not.")
@click.option("-C", "pcluster", metavar="SIZE",
              help="Largest physical cluster in bytes (a multiple of 4096; default 4096; "
                   "--tar=i without -b, as mkfs.erofs 1.9.4: 4096 is one 512-byte block).")
@click.option("-E", "extended", multiple=True, metavar="OPT[,...]",
              help="Extended options (as mkfs.erofs): legacy-compress (full 8-byte lcluster "
                   "indexes), ztailpacking (last extents inline), fragments[=SIZE] (last "
                   "extents and small files in the packed inode, its pcluster SIZE), "
                   "all-fragments[=SIZE] (every compressed file whole in the packed inode), "
                   "fragdedupe=full|inode (fragments shared with earlier ones: any that ends "
                   "one, the default, or whole files only; ^fragdedupe: none), dedupe "
                   "(identical pclusters shared), 48bit (the 48-bit layout, Linux 6.15+: "
                   "compact inodes keep their mtimes; uncompressed images only), dot-omitted "
                   "(no '.' entries, implies 48bit), noinline_data (no file tail inline after "
                   "its inode: every uncompressed file's data in whole blocks), "
                   "force-inode-extended / force-inode-compact (every inode 64 / 32 "
                   "bytes), nosbcrc, plain-xattr-prefixes (the long xattr prefix table "
                   "after the superblock even with fragments), ^NAME (NAME off).")
@click.option("--zfeature-bits", "zfeature_bits", metavar="N",
              help="Bit i of N turns on (1) or off (0) the i-th of legacy-compress, "
                   "ztailpacking, fragments, all-fragments, dedupe, fragdedupe, 48bit, "
                   "dot-omitted, up to N's highest bit, as mkfs.erofs 1.9 (before the -E "
                   "options, which can override them).")
@click.option("--chunksize", metavar="BYTES",
              help="Every regular file chunk-based with chunks of BYTES (a power of two, at "
                   "least the block size): identical chunks stored once, chunks of zeros "
                   "holes (-E ^dedupe: neither), as mkfs.erofs.")
@click.option("--blobdev", metavar="FILE",
              help="With --chunksize: the chunks' data in FILE (a file or a block device), "
                   "the image's extra device 1 (mount -o device=FILE), as mkfs.erofs.")
@click.option("--vmdk-desc", "vmdk_desc", metavar="FILE",
              help="Also write a VMDK descriptor joining IMAGE and its extra device (the "
                   "--blobdev blob, the --tar=i tar) into one flat disk, as mkfs.erofs 1.9.")
@click.option("--compress-hints", "hints", metavar="FILE",
              help="Per-file pcluster size and algorithm: lines 'SIZE [ALGINDEX] REGEX' "
                   "(as mkfs.erofs; SIZE 0: not compressed).")
@click.option("--xattr-inode-digest", "digest_flag", is_flag=True,
              help="Record each regular file's sha256 in an xattr (for the kernel's "
                   f"page-cache sharing); --xattr-inode-digest=NAME names it (default "
                   f"{INODE_DIGEST_DEFAULT}).")
@click.option("--xattr-inode-digest-name", "digest_name", hidden=True)
@click.option("--root-xattr-isize", "root_xattr_isize", metavar="N",
              help="Keep at least N bytes for the root directory's xattrs (zero padded, "
                   "for adding xattrs to it in place later), as mkfs.erofs.")
@click.option("--xattr-prefix", "xattr_prefix", multiple=True, metavar="PREFIX",
              help="A long xattr name prefix (Linux 6.4+; repeatable): xattrs whose names "
                   "start with it store only the rest, as mkfs.erofs.")
@click.option("--workers", type=click.IntRange(0, 64), default=0,
              help="Compression threads (default: one per CPU; the image is the same).")
@click.option("--incremental", "incremental_help", metavar="[=data|rvsp|0]", expose_value=False,
              help="Incremental build, as mkfs.erofs 1.9.4: SOURCE (a directory or a "
                   "--tar=f layer) laid over the EROFS image IMAGE, whose blocks stay; the "
                   "new data and metadata appended (rvsp: a tar's file blocks reserved, "
                   "not written).")
@click.option("--clean", "clean_help", metavar="[=data|rvsp|0]", expose_value=False,
              help="A full clean build (the default).")
@click.option("--build-mode", "build_mode", hidden=True)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def mkfs(image, source, timestamp, all_time, ignore_mtime, ovlfs_strip, block_size,
         uuid_text, label, all_root, force_uid, force_gid, uid_offset, gid_offset, offset,
         fsalignblks, dsunit, max_extent, async_limit, hard_dereference, mount_point, exclude_path, exclude_regex, no_shared_xattrs,
         xattr_tolerance, debug_level, xattr_prefix, root_xattr_isize, compress,
         zdirs, pcluster, extended, zfeature_bits, chunksize, blobdev, vmdk_desc, hints, digest_flag, digest_name, workers, build_mode, quiet, as_json,
         tar_mode, aufs, ungzip, ungzip_dump, unxz, sort_order, max_size, metabox,
         metazone):
    """Build an EROFS image IMAGE of the directory SOURCE (4 KiB blocks), or with --tar
    of the tar file SOURCE (- or none: stdin). IMAGE may be a block device, written in
    place (refused when mounted or too small), as mkfs.erofs writes one."""
    tar_map = None
    if tar_mode is not None:
        tar_mode, tar_map = parse_tar_arg(tar_mode)
        check_map_options(tar_mode, tar_map, {
            "--chunksize": chunksize, "--blobdev": blobdev, "-z": compress, "-m": metabox,
            "--zD": zdirs == "1", "--MZ": parse_metazone(metazone),
            "--vmdk-desc": vmdk_desc})
    # (i,MAPFILE: no tar device, so --vmdk-desc names the image alone, as with f)
    check_tar_flags(tar_mode if tar_map is None else "f", aufs, ungzip, ungzip_dump,
                    max_size, unxz)
    incremental, data_mode = parse_build_mode(build_mode)
    if incremental:
        refuse_with_incremental(locals())
    elif data_mode == "rvsp" and tar_mode not in (None, "f"):
        raise InputError(f"--clean=rvsp: not with --tar={tar_mode}")
    if source is None and tar_mode is None:
        raise InputError("missing SOURCE (a directory, or a tar with --tar)")
    if pcluster is not None and compress is None:
        raise InputError("-C needs -z")
    if zfeature_bits is not None:      # (mkfs.erofs applies options in argv order)
        extended = (zfeature_extended(zfeature_bits), *extended)
    ext = parse_extended(extended)
    if hints is not None and compress is None:
        raise InputError("--compress-hints needs -z")
    z = parse_compress(compress, pcluster, ext) if compress is not None else None
    devices = vmdk_devices(vmdk_desc, tar_mode if tar_map is None else "f", source, blobdev,
                           ungzip, ungzip_dump, unxz, offset)      # (i,MAPFILE: as above)
    # (--tar=i,MAPFILE: the block size of -b, as a full image's)
    index512 = tar_mode == "i" and tar_map is None
    blkszbits = parse_block_size(block_size, "i" if index512 else None)
    # --tar=i without -b: mkfs.erofs 1.9.4 counts -C, -m and -E fragments= in blocks of
    # the page size (4 KiB) it starts with, then makes them blocks of 512 bytes
    scale = 3 if index512 and block_size is None else 0
    mbox, mbox_alg, z = parse_metabox(metabox, blkszbits + scale, z)
    mbox >>= scale
    if z is not None and scale:
        z = dataclasses.replace(z, pcluster_size=z.pcluster_size >> scale,
                                packed_pcluster_size=z.packed_pcluster_size >> scale)
    mzone = parse_metazone(metazone)
    chunk_bytes = check_chunks(chunksize, blobdev, ext, z is not None, tar_mode, blkszbits,
                               image, source)
    digest = None
    if digest_flag or digest_name is not None:
        digest = parse_inode_digest(INODE_DIGEST_DEFAULT if digest_name is None else digest_name)
    data_unit, extent_cap = check_tuning(dsunit, max_extent, async_limit, z is not None,
                                         1 << blkszbits)
    if z is not None and extent_cap:
        z = dataclasses.replace(z, max_extent=extent_cap)
    # --mount-point: mkfs.erofs prefixes it to the paths it looks up in SELinux file
    # contexts (--file-contexts) and Android's fs-config, neither of which this mkfs
    # reads (nor does a mkfs.erofs built without them): nothing else depends on it
    del mount_point
    del debug_level               # (our messages: one summary line, errors, -q, --json)
    xattrs, shared, shared_min = True, not no_shared_xattrs, 0
    if xattr_tolerance is not None:
        xattrs, share_x, shared_min = parse_xattr_tolerance(xattr_tolerance)
        shared = shared and share_x
        if tar_mode is not None:           # mkfs.erofs: directory sources only
            xattrs, shared, shared_min = True, not no_shared_xattrs, 0
    opts = MkfsOptions(
        timestamp=parse_timestamp(timestamp) if timestamp is not None else None,
        uuid=parse_uuid(uuid_text) if uuid_text else None,
        label=parse_label(label),
        all_root=all_root,
        force_uid=force_uid,
        force_gid=force_gid,
        uid_offset=parse_id_offset(uid_offset, "--uid-offset") if uid_offset else 0,
        gid_offset=parse_id_offset(gid_offset, "--gid-offset") if gid_offset else 0,
        hard_dereference=hard_dereference,
        offset=parse_offset(offset) if offset else 0,
        fsalignblks=parse_fsalignblks(fsalignblks) if fsalignblks else 1,
        dsunit=data_unit,
        exclude_paths=[parse_exclude_path(p) for p in exclude_path],
        exclude_regex=[parse_exclude_regex(r) for r in exclude_regex],
        shared_xattrs=shared,
        shared_xattr_min=shared_min,
        xattrs=xattrs,
        root_xattr_isize=parse_root_xattr_isize(root_xattr_isize) if root_xattr_isize else 0,
        inline_data="noinline_data" not in ext,
        xattr_filter="no-xattr-name-filter" not in ext,
        sb_checksum="nosbcrc" not in ext,
        force_extended="force-inode-extended" in ext,
        force_compact="force-inode-compact" in ext,
        plain_xattr_prefixes="plain-xattr-prefixes" in ext,
        sb_48bit="48bit" in ext,
        dot_omitted="dot-omitted" in ext,
        metabox=mbox,
        metabox_alg=mbox_alg,
        metazone=mzone,
        ignore_mtime=ignore_mtime,
        compress=z,
        compress_dirs=zdirs == "1",
        compress_hints=parse_compress_hints(hints, 1 + len(z.more)) if z and hints else [],
        workers=workers,
        inode_digest=digest,
        inode_digest_pos=click.get_current_context().meta.get("digest_pos"),
        xattr_prefixes=parse_xattr_prefixes(xattr_prefix, digest is not None),
        all_time=all_time,
        blkszbits=blkszbits,
        whiteouts="strip" if ovlfs_strip == "1" else "mark",
        chunksize=chunk_bytes,
        blobdev=blobdev,
        chunk_indexes="force-chunk-indexes" in ext,
        chunk_dedupe="nodedupe" not in ext,
    )
    progress = Progress.maybe(enabled=not quiet and not as_json)
    with terminate_as_interrupt():       # kill PID: temporary files removed
        if incremental or (data_mode == "rvsp" and tar_mode == "f"):
            summary = run_incremental(image, source or "-", opts, data_mode, tar_mode, aufs,
                                      ungzip, max_size, block_size, clean=not incremental,
                                      mapfile=tar_map)
        elif tar_mode is not None:
            summary = run_tar(image, source or "-", opts, tar_mode, aufs, ungzip,
                              ungzip_dump, max_size, progress, unxz, tar_map)
        else:
            summary = build_image(image, source, opts, progress=progress)
    if vmdk_desc is not None:
        write_vmdk_desc(vmdk_desc, image, devices)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    elif not quiet and incremental and summary.get("incremental"):
        click.echo(f"{summary['image']}: {summary['inodes']} inodes added, {summary['blocks']} "
                   f"blocks ({summary['blocks'] - summary['base_blocks']} new) in "
                   f"{summary['seconds']:.2f} s")
    elif not quiet:
        click.echo(f"{summary['image']}: {summary['inodes']} inodes, {summary['blocks']} blocks "
                   f"({summary['bytes']} bytes) in {summary['seconds']:.2f} s")


def vmdk_devices(vmdk_desc: str | None, tar_mode: str | None, source: str | None,
                 blobdev: str | None, ungzip: bool, ungzip_dump: str | None, unxz: bool,
                 offset: str | None) -> list[str]:
    """The extra devices --vmdk-desc names (checked before anything is written): the
    --blobdev blob, or the tar of --tar=i (its uncompressed dump with --ungzip=FILE)."""
    if vmdk_desc is None:
        return []
    check_vmdk_path(vmdk_desc)           # (before the image is written)
    if offset:
        raise InputError("--vmdk-desc: not with --offset (the disk starts at the image)")
    if tar_mode == "i":
        if ungzip_dump:
            return [ungzip_dump]
        if ungzip or unxz:
            raise InputError("--vmdk-desc with --tar=i --ungzip/--unxz: the tar's bytes are "
                             "only in the dump (--ungzip=FILE)")
        if source in (None, "-"):
            raise InputError("--vmdk-desc with --tar=i: the tar must be a file, not stdin")
        return [source]
    return [blobdev] if blobdev else []
