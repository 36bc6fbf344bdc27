"""The tar options of `erofs-tools mkfs` (`--tar=f|i`, `--aufs`, `--ungzip[=FILE]`,
`--gzinfo[=FILE]`), kept
apart from the directory options: a decorator adding them, the command class that
lets `--ungzip` take an optional `=FILE` as mkfs.erofs does, and the tar branch."""
from collections.abc import Callable
from typing import Any

import click

from erofs_tools.errors import InputError


class MkfsCommand(click.Command):
    """Optional values as getopt has them (only when glued with '='): `--ungzip=FILE`
    becomes the hidden `--ungzip-dump FILE` (`--xattr-inode-digest=NAME` the hidden
    `--xattr-inode-digest-name NAME`) and a bare `--ungzip` stays a flag, so
    `--ungzip IMAGE TAR` does not swallow IMAGE; a bare `--tar` is `--tar=f`, a bare
    `--ovlfs-strip` `--ovlfs-strip=1`, a bare `--zD` `--zD=1`, a bare `--MZ` `--MZ=id`;
    `--incremental[=X]` and `--clean[=X]` become the hidden `--build-mode incremental:X` /
    `clean:X`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out = []
        # the long xattr prefixes are in command-line order in mkfs.erofs, the
        # fingerprints' among those of --xattr-prefix: how many come before it
        prefixes_before = 0
        for i, a in enumerate(args):
            if a == "--xattr-prefix" or a.startswith("--xattr-prefix="):
                prefixes_before += 1
            elif (a == "--xattr-inode-digest" or a.startswith("--xattr-inode-digest=")) \
                    and "digest_pos" not in ctx.meta:
                ctx.meta["digest_pos"] = prefixes_before
            if a == "--":
                out.extend(args[i:])
                break
            if a.startswith("--gzinfo="):
                out.extend(["--gzinfo", "--gzinfo-file", a[len("--gzinfo="):]])
            elif a.startswith("--ungzip="):
                out.extend(["--ungzip-dump", a[len("--ungzip="):]])
            elif a.startswith("--unxz="):
                out.extend(["--unxz", "--ungzip-dump", a[len("--unxz="):]])
            elif a.startswith("--xattr-inode-digest="):
                out.extend(["--xattr-inode-digest-name", a[len("--xattr-inode-digest="):]])
            elif a == "--tar":              # mkfs.erofs: a bare --tar is full mode
                out.append("--tar=f")
            elif a == "--ovlfs-strip":      # and a bare --ovlfs-strip strips
                out.append("--ovlfs-strip=1")
            elif a == "--zD":               # a bare --zD compresses directories
                out.append("--zD=1")
            elif a == "--MZ":               # and a bare --MZ is both zones
                out.append("--MZ=id")
            elif a in ("--incremental", "--clean") or a.startswith(("--incremental=",
                                                                    "--clean=")):
                # (the last of the two wins, as in mkfs.erofs)
                flag, _, value = a[2:].partition("=")
                out.extend(["--build-mode", f"{flag}:{value}"])
            else:
                out.append(a)
        return super().parse_args(ctx, out)


def _meta(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if param.name is not None:
        ctx.meta[f"mkfs_{param.name}"] = value


def tar_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed((
        click.option("--tar", "tar_mode", metavar="f|i|headerball[,MAPFILE]",
                     help="SOURCE is a tar file (or - for stdin): f = full image, "
                          "i (or 0) = index image whose file data stays in the tar, "
                          "headerball = a stream of headers without file data (each file a "
                          "hole); ,MAPFILE: with i, an index of -b blocks whose data "
                          "region MAPFILE maps to tar offsets (empty with f, headerball)."),
        click.option("--aufs", is_flag=True,
                     help="With --tar: convert aufs .wh. files to overlayfs whiteouts."),
        click.option("--ungzip", is_flag=True,
                     help="With --tar: the tar may be gzip-compressed; --ungzip=FILE also "
                          "keeps the uncompressed tar in FILE."),
        click.option("--ungzip-dump", hidden=True),
        # (--gzinfo reaches run_tar through ctx.meta, not mkfs()'s arguments)
        click.option("--gzinfo", is_flag=True, expose_value=False, callback=_meta,
                     help="With --tar: gzip input (as --ungzip); --gzinfo=FILE also writes "
                          "an AWS SOCI-compatible zinfo of the gzip stream to FILE."),
        click.option("--gzinfo-file", hidden=True, expose_value=False, callback=_meta),
        click.option("--unxz", is_flag=True,
                     help="With --tar: the tar may be xz- or lzma-compressed (as mkfs.erofs; "
                          "not lzip); --unxz=FILE also keeps the uncompressed tar in FILE."),
        click.option("--sort", "sort_order", type=click.Choice(["path", "none"]),
                     default="path", metavar="path|none",
                     help="Order of the file data (as mkfs.erofs): path; none (tar order, "
                          "what containerd's EROFS differ asks) is accepted and gives the "
                          "same image, as mkfs.erofs does with -z or inline data."),
        click.option("--max-size", metavar="BYTES",
                     help="With --tar: most (decompressed) bytes to read, e.g. 1G (default "
                          "1 TiB; K, M, G, T suffixes), against gzip bombs."),
    )):
        f = opt(f)
    return f


def check_tar_flags(tar_mode: str | None, aufs: bool, ungzip: bool,
                    ungzip_dump: str | None, max_size: str | None, unxz: bool = False) -> None:
    gzinfo = click.get_current_context().meta.get("mkfs_gzinfo", False)
    if tar_mode is None and (aufs or ungzip or ungzip_dump is not None or max_size or unxz
                             or gzinfo):
        raise InputError("--aufs, --ungzip, --gzinfo, --unxz and --max-size need --tar")
    if gzinfo and unxz:
        raise InputError("--gzinfo reads gzip: not with --unxz")
    if gzinfo and tar_mode == "i" and not ungzip_dump \
            and click.get_current_context().params.get("vmdk_desc") is not None:
        raise InputError("--vmdk-desc with --tar=i --gzinfo: the tar's bytes are only in "
                         "the dump (--ungzip=FILE)")
    if click.get_current_context().meta.get("mkfs_gzinfo_file") == "":
        raise InputError("--gzinfo=: empty file name")


def run_tar(image: str, source: str, opts: Any, tar_mode: str, aufs: bool, ungzip: bool,
            ungzip_dump: str | None, max_size: str | None, progress: Any,
            unxz: bool = False, mapfile: str | None = None) -> dict[str, Any]:
    from erofs_tools.builder.mkfs_tar import TarOptions, mkfs_tar
    # (--unxz=FILE arrives as --unxz --ungzip-dump FILE: the dump is the same either way)
    # (a headerball is built as a full image whose regular files are holes, as
    # mkfs.erofs 1.9 builds it: no tar device, the block size of -b)
    topts = TarOptions(mode="f" if tar_mode == "headerball" else tar_mode,
                       headerball=tar_mode == "headerball", aufs=aufs,
                       ungzip=ungzip or (ungzip_dump is not None and not unxz),
                       unxz=unxz, dump=ungzip_dump or None, mapfile=mapfile)
    meta = click.get_current_context().meta
    if meta.get("mkfs_gzinfo"):
        topts.ungzip = topts.gzinfo = True
        topts.zinfo = meta.get("mkfs_gzinfo_file")
    if max_size:
        from erofs_tools.cli.pack import _parse_size
        topts.max_size = _parse_size(max_size, "--max-size")
    return mkfs_tar(image, source, opts, topts, progress=progress)


# what --incremental does not build (CLI name -> the parameter holding it)
_NOT_INCREMENTAL = {
    "-m": "metabox", "--chunksize": "chunksize",
    "--blobdev": "blobdev", "--vmdk-desc": "vmdk_desc",
    "--xattr-inode-digest": "digest_flag", "--xattr-prefix": "xattr_prefix",
    "--root-xattr-isize": "root_xattr_isize", "--offset": "offset",
    "--fsalignblks": "fsalignblks", "--dsunit": "dsunit", "--max-extent-bytes": "max_extent",
    "--zfeature-bits": "zfeature_bits", "--ungzip=FILE": "ungzip_dump",
}
_INCREMENTAL_EXTENDED = {"noinline_data", "force-inode-extended", "ztailpacking",
                         "legacy-compress", "dedupe", "fragments", "all-fragments"}


def parse_build_mode(value: str | None) -> tuple[bool, str]:
    """The hidden --build-mode (MkfsCommand): -> (incremental, data mode)."""
    if value is None:           # (nothing imported: a plain mkfs imports what it did)
        return False, "data"
    from erofs_tools.builder.incremental import parse_data_mode
    flag, _, text = value.partition(":")
    return flag == "incremental", parse_data_mode(text, flag)


def refuse_with_incremental(args: dict[str, Any]) -> None:
    """One line for an option --incremental does not build with."""
    for name, param in _NOT_INCREMENTAL.items():
        if args.get(param) not in (None, (), [], False, ""):
            raise InputError(f"--incremental: {name} is not supported")
    if args.get("zdirs") == "1":
        raise InputError("--incremental: --zD is not supported")
    from erofs_tools.builder.options import parse_extended, parse_metazone
    if parse_metazone(args.get("metazone") or ()):
        # the base's inode records stay where they are: no zone to put new ones in
        # (mkfs.erofs 1.9.4 fails midway and leaves a corrupt image)
        raise InputError("--incremental: --MZ is not supported")
    if args.get("tar_mode") not in (None, "f", "i"):
        raise InputError(f"--incremental: --tar={args['tar_mode']} is not supported "
                         "(a layer is a directory, --tar=f or --tar=i)")
    for name in parse_extended(args.get("extended") or ()):
        if name not in _INCREMENTAL_EXTENDED:
            raise InputError(f"--incremental: -E {name} is not supported")


def run_incremental(image: str, source: str, opts: Any, data_mode: str,
                    tar_mode: str | None, aufs: bool, ungzip: bool, max_size: str | None,
                    block_size: int | None, clean: bool = False,
                    mapfile: str | None = None) -> dict[str, Any]:
    from erofs_tools.builder.incremental import mkfs_clean_rvsp, mkfs_incremental
    from erofs_tools.builder.mkfs_tar import TarOptions
    topts = None
    if tar_mode is not None:
        if tar_mode == "i" and mapfile:
            # the layer's data stays in its tar as a device of the image: no data
            # region of the image's own for a block map to describe
            raise InputError("--incremental: --tar=i,MAPFILE is not supported")
        topts = TarOptions(mode=tar_mode, aufs=aufs, ungzip=ungzip, mapfile=mapfile)
        if max_size:
            from erofs_tools.cli.pack import _parse_size
            topts.max_size = _parse_size(max_size, "--max-size")
    elif source == "-":
        raise InputError("missing SOURCE (a directory, or a tar with --tar)")
    if clean:
        assert topts is not None
        return mkfs_clean_rvsp(image, source, opts, topts)
    return mkfs_incremental(image, source, opts, data_mode, topts, block_size)
