"""Read-side commands: inspect, check, unpack, stat (thin wrappers over erofs_tools.reader)."""
import contextlib
import json
import os
import stat as _stat
import sys

import click

from erofs_tools.errors import CorruptImageError, ErofsToolsError, InputError, shown_path
from erofs_tools.fsutil import atomic_output
from erofs_tools.reader.data import BlobSource
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import Image
from erofs_tools.reader.stats import multi_stats, super_summary
from erofs_tools.reader.unpack import unpack_to_dir, unpack_to_tar
from erofs_tools.reader.zdata import is_compressed
from erofs_tools.reader.zdata import state as zstate
from erofs_tools.reader.zmap import ALG_NAMES, FRAGMENT

_ZKIND = {0: "pcluster", 1: "inline", 2: "fragment", 3: "hole"}

_TYPE = {_stat.S_IFREG: "file", _stat.S_IFDIR: "dir", _stat.S_IFLNK: "symlink",
         _stat.S_IFCHR: "chr", _stat.S_IFBLK: "blk", _stat.S_IFIFO: "fifo",
         _stat.S_IFSOCK: "sock"}

blob_dir_opt = click.option("--blob-dir", type=click.Path(file_okay=False, exists=True),
                            help="Directory holding the image's blobs, named by blob id.")
device_opt = click.option("--device", "devices", multiple=True,
                          type=click.Path(dir_okay=False, exists=True),
                          help="Raw (uncompressed) file for extra device 1, 2, ... in order; "
                               "repeatable (e.g. a blob cache file or mkfs --blobdev output).")


def _inline_bootstrap(path):
    """(bootstrap bytes, toc) of a Nydus blob carrying its bootstrap, else (None, toc)."""
    from erofs_tools.format import rafs
    from erofs_tools.reader.blob import file_reader, read_toc, read_toc_section
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        ra = file_reader(f)
        toc = read_toc(ra, size)
        if toc is None or rafs.TOC_NAME_BOOTSTRAP not in toc.entries:
            return None, toc
        return read_toc_section(ra, size, toc, rafs.TOC_NAME_BOOTSTRAP), toc


def _open(image, blob_dir=None, devices=()):
    """An image, or the bootstrap inside a Nydus blob (then the blob serves its data)."""
    try:
        img = Image(image)
        blob_files = None
    except CorruptImageError as first:
        try:
            boot, _toc = _inline_bootstrap(image)
        except ErofsToolsError:
            boot = None
        if boot is None:
            raise first from None
        img = Image(boot, name=f"{image}:image.boot")
        blob_files = {1: image} if len(img.devices) == 1 else None
    if blob_dir or devices or blob_files:
        img.blobs = BlobSource(img, blob_dir=blob_dir, devices=list(devices),
                               blob_files=blob_files)
    return img


@contextlib.contextmanager
def _reading(*imgs):
    """An error while reading IMGS, when one of their files changed meanwhile (truncated,
    rewritten: reader/mapped.py), is that change: its bytes are not what was opened."""
    try:
        yield
    except (ErofsToolsError, OSError):
        for img in imgs:
            img.check_unchanged()
        raise


def _blob_summary(path):
    """inspect of a Nydus data blob without a bootstrap: TOC and chunk table."""
    from erofs_tools.reader.blob import file_reader, open_blob
    from erofs_tools.reader.blobid import compute_blob_id
    meta = open_blob(path)
    _boot, toc = _inline_bootstrap(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        bid = compute_blob_id(file_reader(f), size, meta.digest_region)
    return {
        "blob": path, "blob_id": bid, "size": size, "compressor": meta.compressor,
        "digester": meta.digester, "chunk_size": meta.chunk_size,
        "uncompressed_size": meta.uncompressed_size, "features": f"{meta.features:#x}",
        "toc": {k.decode(): {"offset": e.compressed_offset, "size": e.compressed_size,
                             "uncompressed_size": e.uncompressed_size, "flags": e.flags}
                for k, e in (toc.entries.items() if toc else ())},
        "chunks": [{"index": c.index, "uncompressed": [c.uncompressed_offset, c.uncompressed_size],
                    "compressed": [c.compressed_offset, c.compressed_size],
                    "digest": c.digest.hex() if c.digest else None} for c in meta.chunks],
    }


def _s(b):
    return os.fsdecode(b)


def _esc(v):
    """A name or target for a text line: control characters as \\xNN (an image's name
    may hold a newline, a fake tree line, or a terminal's escape sequences)."""
    return shown_path(v, 1 << 62) if isinstance(v, (str, bytes)) else v


def _inode_detail(img, path, ino):
    d = {"path": _s(path), "type": _TYPE.get(ino.ftype, "?"), **ino.as_dict()}
    d["xattrs"] = {_s(n): v.decode("utf-8", "backslashreplace") for n, v in img.xattrs(ino)}
    if ino.is_lnk():
        d["target"] = _s(img.readlink(ino))
    if ino.is_dir():
        d["entries"] = [{"name": _s(e.name), "nid": e.nid, "file_type": e.file_type}
                        for e in img.dirents(ino)]
    if is_compressed(ino):
        d["compressed_blocks"] = ino.i_u
        d["extents"] = [{"offset": x.la, "length": x.llen, "kind": _ZKIND[x.kind],
                         "algorithm": "-" if x.kind == FRAGMENT else ALG_NAMES[x.alg],
                         "at": x.pa, "stored": x.plen, "partial": x.partial}
                        for x in zstate(img).zmap(ino).extents]
    if ino.layout == 4:
        fmt, bits = img.chunk_format(ino)
        d["chunk_format"] = f"{fmt:#x}"
        d["chunk_size"] = 1 << bits
        chunks = []
        by_place = None
        for c in img.chunks(ino):
            cd = {"index": c.index, "file_offset": c.file_offset, "length": c.length,
                  "device": c.device, "blkaddr": None if c.hole else c.blkaddr}
            if img.is_rafs and not c.hole and c.device:
                cd["ci_index"] = c.ci_index
                meta = img.blob_meta(c.device)
                if meta is not None:
                    for bc in meta.chunks_for_range(c.blkaddr * 4096, c.length):
                        cd.setdefault("blob_chunks", []).append({
                            "index": bc.index,
                            "uncompressed": [bc.uncompressed_offset, bc.uncompressed_size],
                            "compressed": [bc.compressed_offset, bc.compressed_size],
                            "digest": bc.digest.hex() if bc.digest else None})
                else:
                    if by_place is None:
                        by_place = _chunk_infos_by_place(img)
                    ci = by_place.get((c.device - 1, c.blkaddr * 4096))
                    if ci is not None:
                        cd["compressed"] = [ci.compressed_offset, ci.compressed_size]
                        cd["digest"] = ci.digest.hex()
                cd["blob_id"] = img.blob_id(c.device)
            chunks.append(cd)
        d["chunks"] = chunks
    elif ino.layout in (0, 2):
        d["startblk"] = ino.startblk
    return d


def _chunk_infos_by_place(img):
    """{(blob index, uncompressed offset): the first chunk info there}: one pass over the
    table (a scan per chunk was quadratic: a file of 20,480 chunks and a table of 20,000
    entries took 38 s)."""
    out = {}
    for ci in img.chunk_infos:
        out.setdefault((ci.blob_index, ci.uncompressed_offset), ci)
    return out


@click.command("inspect")
@click.argument("image", type=click.Path(dir_okay=False, exists=True))
@click.argument("path", required=False)
@blob_dir_opt
@device_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(image, path, blob_dir, devices, as_json):
    """Show the superblock, features and blobs of IMAGE, then the tree (or PATH in detail).
    IMAGE may also be a Nydus data blob (its TOC and chunk table are shown)."""
    try:
        img = _open(image, blob_dir, devices)
    except CorruptImageError as e:
        try:
            d = _blob_summary(image)
        except ErofsToolsError:
            raise e from None
        if as_json:
            click.echo(json.dumps(d, indent=1))
        else:
            for k, v in d.items():
                if k == "chunks":
                    click.echo("chunks:")
                    for c in v:
                        click.echo("  " + " ".join(f"{a}={b}" for a, b in c.items()))
                else:
                    click.echo(f"{k}: {v}")
        return
    with _reading(img):
        _inspect(img, path, as_json)


def _inspect(img, path, as_json):
    if path is not None:
        ino = img.lookup(path)
        d = _inode_detail(img, os.fsencode(path), ino)
        img.check_unchanged()
        if as_json:
            click.echo(json.dumps(d, indent=1))
            return
        for k, v in d.items():
            if k in ("chunks", "entries", "extents"):
                click.echo(f"{k}:")
                for x in v:
                    click.echo("  " + " ".join(f"{a}={_esc(b)}" for a, b in x.items()))
            else:
                click.echo(f"{k}: {_esc(v)}")
        return
    sd = super_summary(img)
    img.check_unchanged()
    # the tree is printed as it is walked, never held: a deep tree's paths add up to
    # far more than the tree (30,000 levels: ~1 GB of paths)
    if as_json:
        head = json.dumps({**sd, "tree": []}, indent=1)
        if not head.endswith('"tree": []\n}'):
            raise AssertionError("inspect: unexpected JSON layout")
        click.echo(head[:-len("]\n}")], nl=False)
        sep = "\n"
        for ent in _tree_entries(img):
            click.echo(sep + "  " + json.dumps(ent), nl=False)
            sep = ",\n"
        click.echo("\n ]\n}")
        return
    for k, v in sd.items():
        if k in ("devices", "blobs"):
            click.echo(f"{k}:")
            for x in v:
                click.echo("  " + " ".join(f"{a}={b}" for a, b in x.items()))
        elif k in ("rafs", "compression"):
            click.echo(f"{k}: " + " ".join(f"{a}={b}" for a, b in v.items()))
        else:
            click.echo(f"{k}: {v}")
    click.echo("tree:")
    for ent in _tree_entries(img):
        extra = f" -> {_esc(ent['target'])}" if "target" in ent else ""
        extra += f" rdev={ent['rdev'][0]}:{ent['rdev'][1]}" if "rdev" in ent else ""
        click.echo(f"  {ent['type']:7} {ent['mode']} {ent['uid']}:{ent['gid']} "
                   f"{ent['size']:>10} nid={ent['nid']} {ent['layout']} {_esc(ent['path'])}{extra}")


def _tree_entries(img):
    """The tree's lines, each batch (512 lines, or 1 MiB of paths: a deep tree's are
    1 MB each) given out once the image file was checked unchanged since it was read (a
    page's zeroed tail after a shrink faults nothing): a check per line cost 14% of a
    /usr/share image's `inspect`."""
    batch, held = [], 0
    for e in _tree_walk(img):
        batch.append(e)
        held += len(e["path"]) + len(e.get("target", ""))
        if len(batch) == 512 or held >= 1 << 20:
            img.check_unchanged()
            yield from batch
            batch.clear()
            held = 0
    img.check_unchanged()
    yield from batch


def _tree_walk(img):
    for p, _de, ino in img.walk():
        e = {"path": _s(p), "type": _TYPE.get(ino.ftype, "?"), "nid": ino.nid,
             "mode": f"{_stat.S_IMODE(ino.mode):04o}", "uid": ino.uid, "gid": ino.gid,
             "size": ino.size, "layout": ino.layout_name}
        if ino.is_lnk():
            e["target"] = _s(img.readlink(ino))
        if ino.is_dev():
            e["rdev"] = list(ino.rdev)
        yield e


@click.command("check")
@click.argument("image", type=click.Path(dir_okay=False, exists=True))
@blob_dir_opt
@device_opt
@click.option("-q", "--quiet", is_flag=True, help="Print problems only.")
def check_cmd(image, blob_dir, devices, quiet):
    """Check IMAGE (and with --blob-dir, every chunk digest and blob id). Exit 1 if corrupt."""
    img = _open(image, blob_dir, devices)
    with _reading(img):
        problems = check_image(img, img.blobs)
        img.check_unchanged()       # problems (or "clean") of the file that was opened
    for p in problems:
        click.echo(f"{image}: {p}")
    if problems:
        raise click.exceptions.Exit(1)
    if not quiet:
        what = " and its blobs" if img.blobs is not None else ""
        click.echo(f"{image}: clean{what}")


@click.command("unpack")
@click.argument("image", type=click.Path(dir_okay=False, exists=True))
@blob_dir_opt
@device_opt
@click.option("-o", "--output", type=click.Path(), help="Extract into this new directory.")
@click.option("--tar", "tar_out", type=click.Path(allow_dash=True),
              help="Write a PAX tar stream to this file ('-' for stdout).")
@click.option("--max-size", default=None, metavar="BYTES",
              help="Most file data to write, holes not counted, e.g. 10G (default 1 TiB; "
                   "K, M, G, T suffixes): a small image can map one block many times.")
def unpack_cmd(image, blob_dir, devices, output, tar_out, max_size):
    """Extract IMAGE with full metadata into a directory (-o) or a tar stream (--tar)."""
    from erofs_tools.builder.tar_reader import DEFAULT_MAX_SIZE
    from erofs_tools.cli.pack import _parse_size
    if (output is None) == (tar_out is None):
        raise InputError("give exactly one of -o DIR and --tar FILE")
    limit = _parse_size(max_size, "--max-size") if max_size else DEFAULT_MAX_SIZE
    img = _open(image, blob_dir, devices)
    warnings = []
    with _reading(img):         # (each output checks the file before it commits)
        _unpack(img, output, tar_out, warnings, limit)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _unpack(img, output, tar_out, warnings, limit):
    if output is not None:
        unpack_to_dir(img, output, warnings, limit=limit)
    elif tar_out == "-":
        unpack_to_tar(img, sys.stdout.buffer, warnings, limit=limit)
        sys.stdout.buffer.flush()
    else:
        # a fresh O_EXCL temporary beside OUT, renamed over it when complete: a symlink
        # planted at OUT.tmp (or anywhere) is never written through
        try:
            with atomic_output(tar_out, mode=0o644, stream=True) as f:
                unpack_to_tar(img, f, warnings, limit=limit)
        except OSError as e:
            raise InputError(f"{tar_out}: {e.strerror or e}") from None


@click.command("stat")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@blob_dir_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stat_cmd(images, blob_dir, as_json):
    """Files, chunks, dedup and compression figures per image and across IMAGES."""
    imgs = [_open(p, blob_dir) for p in images]
    with _reading(*imgs):
        res = multi_stats(imgs)
        for img in imgs:
            img.check_unchanged()
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    for d in res["images"]:
        click.echo(f"{d['image']} ({d['kind']}):")
        for k, v in d.items():
            if k in ("image", "kind"):
                continue
            if k == "blobs":
                for b in v:
                    click.echo("  blob " + " ".join(f"{a}={x}" for a, x in b.items()))
            elif k == "compression":
                for alg, a in v.items():
                    click.echo(f"  compression {alg}: " + " ".join(f"{n}={x}" for n, x in a.items()))
            else:
                click.echo(f"  {k}: {v}")
    click.echo("total:")
    for k, v in res["total"].items():
        if k == "shared_chunk_owners":
            continue
        click.echo(f"  {k}: {v}")


COMMANDS = (inspect_cmd, check_cmd, unpack_cmd, stat_cmd)
