"""`erofs-tools optimize SRC DST --trace FILE`: an image reordered for an access trace."""
import json

import click


@click.command("optimize")
@click.argument("source", type=click.Path(dir_okay=False, exists=True))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False),
              help="Access trace of SOURCE (`fscache-daemon trace MOUNTPOINT -o FILE`).")
@click.option("--blob-dir", "-D", required=True, type=click.Path(file_okay=False),
              help="Directory holding SOURCE's blobs (named by blob id); the prefetch blob "
                   "is written there too unless --output-blob-dir is given.")
@click.option("--output-blob-dir", type=click.Path(file_okay=False),
              help="Directory for the new prefetch blob (default: --blob-dir).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def optimize_cmd(source, output, trace_path, blob_dir, output_blob_dir, as_json, quiet):
    """Write OUTPUT, the RAFS v6 bootstrap SOURCE reordered for a recorded start: its
    prefetch table lists the traced files in first-access order, and the traced chunks
    are copied, in that order, into one new blob read first; every other chunk stays in
    SOURCE's blobs (nothing else is copied)."""
    from erofs_tools.builder.optimize import Trace, optimize
    r = optimize(source, output, blob_dir, Trace.load(trace_path), output_blob_dir)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{r['bootstrap']}: {r['prefetch_files']} prefetch files, "
                   f"{r['prefetch_chunks']} chunks ({r['prefetch_bytes']} bytes) in blob "
                   f"{r['prefetch_blob']}, {r['reused_chunks']} chunks reused in place")
