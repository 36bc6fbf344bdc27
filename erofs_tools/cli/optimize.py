"""`erofs-tools optimize SRC DST --trace FILE`: an image reordered for an access trace."""
import json

import click


def _is_ref(text):
    """oci:PATH[:TAG] or a registry reference (HOST/REPO...), not a bootstrap file."""
    import os
    return text.startswith("oci:") or (not os.path.exists(text) and "/" in text
                                       and not text.startswith(("/", ".")))


@click.command("optimize")
@click.argument("source")
@click.argument("output")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False),
              help="Access trace of SOURCE (`fscache-daemon trace MOUNTPOINT -o FILE`).")
@click.option("--blob-dir", "-D", type=click.Path(file_okay=False),
              help="Directory holding SOURCE's blobs (named by blob id); the prefetch blob "
                   "is written there too unless --output-blob-dir is given.")
@click.option("--output-blob-dir", type=click.Path(file_okay=False),
              help="Directory for the new prefetch blob (default: --blob-dir).")
@click.option("--insecure/--secure", default=None,
              help="References: plain HTTP / HTTPS to the registry (default: plain HTTP "
                   "only for loopback hosts).")
@click.option("--platform", default="linux/amd64", show_default=True,
              help="References: OS/ARCH picked from an index.")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="References: directory for temporary files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def optimize_cmd(source, output, trace_path, blob_dir, output_blob_dir, insecure, platform,
                 work_dir, as_json, quiet):
    """Write OUTPUT, the RAFS v6 bootstrap SOURCE reordered for a recorded start: its
    prefetch table lists the traced files in first-access order, and the traced chunks
    are copied, in that order, into one new blob read first; every other chunk stays in
    SOURCE's blobs (nothing else is copied).

    SOURCE and OUTPUT may also be Nydus image references (oci:PATH[:TAG] or a registry
    reference): the result is pushed to OUTPUT with only the prefetch blob uploaded."""
    from erofs_tools.builder.optimize import Trace, optimize
    from erofs_tools.errors import InputError
    trace = Trace.load(trace_path)
    if _is_ref(source):
        from erofs_tools.registry.optimize import optimize_ref
        r = optimize_ref(source, output, trace, insecure=insecure, platform=platform,
                         work_dir=work_dir)
        if as_json:
            click.echo(json.dumps(r, sort_keys=True))
        elif not quiet:
            click.echo(f"{output}: manifest {r['manifest']}, {r['prefetch_files']} prefetch "
                       f"files, {r['prefetch_chunks']} chunks in blob "
                       f"{r['prefetch_blob'][:16]}, {r['reused_chunks']} chunks reused")
        return
    if blob_dir is None:
        raise InputError("--blob-dir is needed with a bootstrap file")
    r = optimize(source, output, blob_dir, trace, output_blob_dir)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{r['bootstrap']}: {r['prefetch_files']} prefetch files, "
                   f"{r['prefetch_chunks']} chunks ({r['prefetch_bytes']} bytes) in blob "
                   f"{r['prefetch_blob']}, {r['reused_chunks']} chunks reused in place")
