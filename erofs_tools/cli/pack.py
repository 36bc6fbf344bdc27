"""`erofs-tools pack SOURCE --bootstrap BOOT --blob-dir DIR`: a Nydus RAFS v6 image."""
import json
import re
import sys

import click

from erofs_tools.builder.heap import bound_heap_arenas
from erofs_tools.builder.options import parse_timestamp
from erofs_tools.builder.rafs import PackOptions
from erofs_tools.builder.rafs import pack as build_rafs
from erofs_tools.cli.progress import Progress
from erofs_tools.errors import InputError, terminate_as_interrupt

_SUFFIXES = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


_SIZE = re.compile(r"(0x[0-9a-f]+|[0-9]+)\s*([kmgt]?|[kmgt]ib)")


def _parse_size(text: str, option: str = "--chunk-size") -> int:
    """'4096', '0x100000', '1M', '1G', '2TiB' -> bytes; an error names OPTION."""
    m = _SIZE.fullmatch(str(text).strip().lower())
    if not m:
        raise InputError(f"{option}: not a size: {text!r} (e.g. 4096, 0x100000, 64K, 1M, "
                         "1G)")
    return int(m.group(1), 0) * _SUFFIXES[m.group(2)]


def _read_prefetch(spec):
    try:
        if spec == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(spec, "rb") as f:
                data = f.read()
    except OSError as e:
        raise InputError(f"--prefetch-list {spec}: {e.strerror}") from None
    return [line for line in data.splitlines() if line.strip()]


@click.command("pack")
@click.argument("source", type=click.Path())
@click.option("--bootstrap", "-B", required=True, type=click.Path(dir_okay=False),
              help="RAFS v6 bootstrap (metadata image) to write.")
@click.option("--blob-dir", "-D", required=True, type=click.Path(file_okay=False),
              help="Directory for the data blob (named by its blob id).")
@click.option("--chunk-size", default="0x100000", show_default=True,
              help="Chunk size: a power of two from 4 KiB to 16 MiB (e.g. 1M, 0x10000).")
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3",
              show_default=True, help="Chunk digest.")
@click.option("--compressor", type=click.Choice(["zstd", "lz4_block", "none"]), default="zstd",
              show_default=True,
              help="Per-chunk compression (a chunk that does not shrink is stored raw; "
                   "with zstd, so is a chunk of at most 64 KiB that starts as a gzip, "
                   "xz or bzip2 file, or of at most 4 KiB as a PNG file, without "
                   "trying).")
@click.option("--chunk-dict", multiple=True, type=click.Path(dir_okay=False),
              help="Bootstrap whose chunks are referenced instead of stored; repeatable.")
@click.option("--prefetch-list", metavar="FILE|-",
              help="Absolute image paths, one a line, recorded in the prefetch table "
                   "(their data goes first in the blob).")
@click.option("-T", "--timestamp", metavar="SECONDS",
              help="Set every inode's mtime and the build time to this UNIX time "
                   "(default: SOURCE_DATE_EPOCH if set, which is the build time and "
                   "clamps the mtimes after it; else keep the tree's mtimes).")
@click.option("-j", "--jobs", type=click.IntRange(1, 1024),
              help="Hash/compress threads (default: number of CPUs).")
@click.option("--type", "source_type", type=click.Choice(["dir", "tar", "targz", "tarzst"]),
              default="dir", show_default=True,
              help="SOURCE is a directory, or a tar stream (a file or '-' for stdin).")
@click.option("--whiteout-spec", type=click.Choice(["oci", "overlayfs", "none"]),
              default="oci", show_default=True,
              help="Tar sources: oci turns .wh. entries into overlayfs whiteouts; "
                   "overlayfs and none keep entries as they are.")
@click.option("--max-size", default=None, metavar="BYTES",
              help="Tar sources: most (decompressed) stream bytes to read, e.g. 1G "
                   "(default 1 TiB; K, M, G, T suffixes).")
@click.option("--mark-implied-dirs", is_flag=True,
              help="Tar sources: mark directories that have no entry of their own, so that "
                   "merge keeps the lower layers' metadata for them (as convert does).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True,
              help="Print blob ids, sizes, chunk counts and dedup figures as JSON.")
def pack(source, bootstrap, blob_dir, chunk_size, digester, compressor, chunk_dict,
         prefetch_list, timestamp, jobs, source_type, whiteout_spec, max_size,
         mark_implied_dirs, quiet, as_json):
    """Pack directory SOURCE (or a tar stream with --type) into a RAFS v6 bootstrap and
    one chunked, deduplicated blob."""
    opts = PackOptions(
        chunk_size=_parse_size(chunk_size, "--chunk-size"), digester=digester, compressor=compressor,
        chunk_dicts=list(chunk_dict),
        prefetch=_read_prefetch(prefetch_list) if prefetch_list else None,
        timestamp=parse_timestamp(timestamp) if timestamp is not None else None,
        workers=jobs)
    progress = Progress.maybe(enabled=not quiet and not as_json)
    # a process of its own: one malloc arena for all of pack's threads (builder/heap.py)
    bound_heap_arenas()
    with terminate_as_interrupt():       # kill PID: temporary files removed
        if source_type == "dir":
            r = build_rafs(source, bootstrap, blob_dir, opts, progress=progress)
        else:
            from erofs_tools.builder.tar_source import DEFAULT_MAX_SIZE, pack_tar
            r = pack_tar(source, bootstrap, blob_dir, opts, source_type=source_type,
                         whiteout_spec=whiteout_spec, mark_implied=mark_implied_dirs,
                         max_size=(_parse_size(max_size, "--max-size") if max_size
                                   else DEFAULT_MAX_SIZE))
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        blob = r["blob_id"] or "(no new blob)"
        new = [b for b in r["blobs"] if b["new"]]
        size = f", {new[0]['compressed_size']} bytes" if new else ""
        click.echo(f"{r['bootstrap']}: {r['inodes']} inodes, {len(r['blobs'])} blob(s); "
                   f"new blob {blob}{size}; {r['chunks_new']} new / {r['chunks_total']} chunks "
                   f"({r['chunks_dedup']} dedup, {r['chunks_dict']} from dicts) "
                   f"in {r['seconds']:.2f} s")
