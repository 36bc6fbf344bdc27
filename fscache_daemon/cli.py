"""fscache-daemon command line (stub until the daemon issue lands)."""
import sys

import click

from erofs_tools.errors import ErofsToolsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """On-demand fscache/fanotify daemon for RAFS v6 images."""


def main(argv=None):
    try:
        rv = cli.main(args=argv, prog_name="fscache-daemon", standalone_mode=False)
    except ErofsToolsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
