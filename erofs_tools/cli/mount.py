"""`erofs-tools mount` / `erofs-tools umount`: eager local mounting of RAFS v6 images."""
import json

import click

from erofs_tools.mount import DEFAULT_CACHE_DIR, mount_rafs, prepare_caches, umount


@click.command("mount")
@click.argument("bootstrap", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--blob-dir", required=True, type=click.Path(file_okay=False),
              help="Directory holding the data blobs, named by blob id.")
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True,
              type=click.Path(file_okay=False),
              help="Where the uncompressed cache files (one per blob) are written.")
@click.option("--allow-suid-dev", is_flag=True,
              help="Honour setuid/setgid bits and device nodes in the image (the default "
                   "mounts nosuid,nodev: only for images you trust as much as root).")
@click.option("--prepare-only", is_flag=True,
              help="Only write the cache files; print them and do not mount.")
@click.option("--json", "as_json", is_flag=True, help="Print the cache files as JSON.")
def mount_cmd(bootstrap, mountpoint, blob_dir, cache_dir, allow_suid_dev, prepare_only,
              as_json):
    """Mount a RAFS v6 BOOTSTRAP read-only, nosuid and nodev on MOUNTPOINT, expanding its
    blobs first."""
    if prepare_only:
        devices = prepare_caches(bootstrap, blob_dir, cache_dir)
    else:
        devices = mount_rafs(bootstrap, mountpoint, blob_dir, cache_dir,
                             allow_suid_dev=allow_suid_dev)
    if as_json:
        click.echo(json.dumps({"mountpoint": None if prepare_only else mountpoint,
                               "devices": devices}))


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount_cmd(mountpoint, lazy):
    """Unmount an image mounted with `erofs-tools mount`."""
    umount(mountpoint, lazy=lazy)
