"""`erofs-tools merge BOOT... --bootstrap OUT`: flatten layer bootstraps (lowest first)."""
import json

import click

from erofs_tools.errors import InputError


def _blob_map(pairs):
    out = {}
    for p in pairs:
        old, sep, new = p.partition("=")
        if not sep or not old or not new:
            raise InputError(f"--blob-id {p!r}: expected OLD=NEW")
        out[old] = new
    return out


@click.command("merge")
@click.argument("bootstraps", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--bootstrap", "-B", "output", required=True, type=click.Path(dir_okay=False),
              help="Merged RAFS v6 bootstrap to write.")
@click.option("--whiteout-spec", type=click.Choice(["overlayfs", "oci"]), default="overlayfs",
              show_default=True,
              help="overlayfs: char device 0:0 whiteouts and trusted.overlay.opaque (what "
                   "pack --whiteout-spec oci produces); oci: also .wh. names.")
@click.option("--blob-id", "blob_ids", multiple=True, metavar="OLD=NEW",
              help="Rename a blob in the merged blob table (e.g. to its registry digest).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def merge_cmd(bootstraps, output, whiteout_spec, blob_ids, as_json, quiet):
    """Merge layer BOOTSTRAPS, lowest first, applying whiteouts and opaque directories
    as overlayfs would; the result references every layer's blob."""
    from erofs_tools.builder.merge import merge
    r = merge(list(bootstraps), output, blob_ids=_blob_map(blob_ids),
              whiteout_spec=whiteout_spec)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
    elif not quiet:
        click.echo(f"{r['bootstrap']}: {r['inodes']} inodes from {len(bootstraps)} layers, "
                   f"{len(r['blobs'])} blob(s)")
