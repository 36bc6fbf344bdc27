"""`erofs-tools convert | push | pull`: Nydus images in OCI registries (or `oci:PATH`).

Credentials come from docker's config.json ($DOCKER_CONFIG or ~/.docker). Plain HTTP
or HTTPS follows one rule, the daemon's too: plain HTTP for a loopback registry
(127.0.0.1, localhost, ::1), HTTPS with certificate verification for every other host;
--insecure / --secure override it.
"""
import json

import click

_platform_opt = click.option("--platform", default="linux/amd64", show_default=True,
                             help="OS/ARCH picked from an index.")
_insecure_opt = click.option("--insecure/--secure", default=None,
                             help="Plain HTTP / HTTPS to the registry (default: plain HTTP "
                                  "only for loopback hosts).")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")


@click.command("convert")
@click.argument("src_ref")
@click.argument("dst_ref")
@_insecure_opt
@click.option("--chunk-dict", multiple=True, type=click.Path(dir_okay=False),
              help="Bootstrap whose chunks are referenced instead of stored (its blobs must "
                   "be in the destination repository already); repeatable.")
@_platform_opt
@click.option("--chunk-size", default="0x100000", show_default=True,
              help="Chunk size: a power of two from 4 KiB to 16 MiB.")
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3",
              show_default=True)
@click.option("--compressor", type=click.Choice(["zstd", "none"]), default="zstd",
              show_default=True)
@click.option("-j", "--jobs", type=click.IntRange(1, 1024),
              help="Hash/compress threads (default: number of CPUs).")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Also keep the merged bootstrap (image.boot) and the blobs here.")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Directory for temporary files (layer bootstraps, blobs).")
@click.option("--merge-platform", is_flag=True,
              help="Push an index listing both the source manifest (copied) and the Nydus "
                   "one.")
@click.option("--oci-ref", is_flag=True,
              help="Index SRC's gzip layers where they are (zran): DST lists the original "
                   "layers plus a small bootstrap layer; no layer is converted.")
@click.option("--zran-span", default="0x80000", show_default=True,
              help="With --oci-ref: bytes of decompressed layer between access points.")
@_json_opt
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def convert_cmd(src_ref, dst_ref, insecure, chunk_dict, platform, chunk_size, digester,
                compressor, jobs, output, work_dir, merge_platform, oci_ref, zran_span,
                as_json, quiet):
    """Convert the OCI/Docker image SRC_REF (registry reference or oci:PATH[:TAG]) into a
    Nydus RAFS v6 image pushed to DST_REF."""
    from erofs_tools.builder.rafs import PackOptions
    from erofs_tools.cli.pack import _parse_size
    from erofs_tools.registry.convert import convert
    if oci_ref:
        _convert_oci_ref(src_ref, dst_ref, insecure, chunk_dict, platform,
                         _parse_size(chunk_size), digester, compressor, merge_platform,
                         output, work_dir, _parse_size(zran_span, "--zran-span"), as_json, quiet)
        return
    opts = PackOptions(chunk_size=_parse_size(chunk_size), digester=digester,
                       compressor=compressor, workers=jobs)
    log = None if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    r = convert(src_ref, dst_ref, insecure=insecure, chunk_dicts=list(chunk_dict),
                platform=platform, pack_options=opts, output_dir=output, work_dir=work_dir,
                log=log, merge_platform=merge_platform)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        up = sum(1 for p in r["pushed"] if p["how"] == "uploaded")
        click.echo(f"{r['destination']}: manifest {r['manifest']}, {len(r['blob_layers'])} "
                   f"blob layer(s) + bootstrap; {up} blob(s) uploaded; "
                   f"{r['tar_bytes']} tar bytes in {r['seconds']:.2f} s")


def _convert_oci_ref(src_ref, dst_ref, insecure, chunk_dict, platform, chunk_size,
                     digester, compressor, merge_platform, output, work_dir, span, as_json,
                     quiet):
    from erofs_tools.errors import InputError
    from erofs_tools.registry.zran_convert import convert_oci_ref
    if chunk_dict or merge_platform or compressor != "zstd":
        raise InputError("--oci-ref takes no --chunk-dict, --merge-platform or --compressor "
                         "(the layers stay as they are)")
    log = None if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    r = convert_oci_ref(src_ref, dst_ref, insecure=insecure, platform=platform,
                        chunk_size=chunk_size, span=span, digester=digester,
                        output_dir=output, work_dir=work_dir, log=log)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{r['destination']}: manifest {r['manifest']}, {len(r['layers'])} gzip "
                   f"layer(s) by reference + bootstrap layer of {r['bootstrap_layer_size']} "
                   f"bytes ({r['meta_bytes']} bytes of zran meta) in {r['seconds']:.2f} s")


@click.command("push")
@click.argument("bootstrap", type=click.Path(dir_okay=False, exists=True))
@click.argument("ref")
@click.option("--blob-dir", "-D", required=True, type=click.Path(file_okay=False),
              help="Directory holding the blobs, named by blob id.")
@_insecure_opt
@_platform_opt
@_json_opt
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def push_cmd(bootstrap, ref, blob_dir, insecure, platform, as_json, quiet):
    """Push BOOTSTRAP and its blobs as a Nydus image to REF."""
    from erofs_tools.registry.nydus_push import push_nydus
    r = push_nydus(bootstrap, blob_dir, ref, insecure=insecure, platform=platform)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{ref}: manifest {r['manifest']}, {len(r['blob_layers'])} blob layer(s)")


@click.command("pull")
@click.argument("ref")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for image.boot (and the blobs).")
@click.option("--blobs", is_flag=True, help="Also fetch every blob, named by blob id.")
@_insecure_opt
@_platform_opt
@_json_opt
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def pull_cmd(ref, out_dir, blobs, insecure, platform, as_json, quiet):
    """Pull the Nydus image REF: its bootstrap as OUTPUT/image.boot, and with --blobs its
    blobs as OUTPUT/<blob id>."""
    from erofs_tools.registry.nydus_pull import pull_nydus
    r = pull_nydus(ref, out_dir, blobs=blobs, insecure=insecure, platform=platform)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{r['bootstrap']}: {len(r['blobs'])} blob(s)"
                   + (f", {len(r['fetched'])} fetched or present" if blobs else ""))
