"""erofs-tools command line: one click group, one module per command group.

`main()` runs the group and turns every ErofsToolsError into "error: <message>" on
stderr and exit status 1. Register a command with one import line and one add_command
line below.
"""
import sys

import click

from erofs_tools import __version__
from erofs_tools.errors import ErofsToolsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="erofs-tools")
def cli():
    """EROFS and Nydus RAFS v6 image tools."""


from erofs_tools.cli import mkfs as _mkfs  # noqa: E402
from erofs_tools.cli import mount as _mount  # noqa: E402
from erofs_tools.cli import pack as _pack  # noqa: E402

cli.add_command(_mkfs.mkfs)
cli.add_command(_mount.mount_cmd)
cli.add_command(_mount.umount_cmd)
from erofs_tools.cli import read_cmds as _read_cmds  # noqa: E402
for _c in _read_cmds.COMMANDS:
    cli.add_command(_c)
cli.add_command(_pack.pack)


def main(argv=None):
    """Console entry point: ErofsToolsError -> 'error: msg', exit 1."""
    try:
        rv = cli.main(args=argv, prog_name="erofs-tools", standalone_mode=False)
    except ErofsToolsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
