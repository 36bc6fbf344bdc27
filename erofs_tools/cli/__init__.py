"""erofs-tools command line: one click group, one module per command group.

`main()` runs the group and turns every ErofsToolsError into "error: <message>" on
stderr and exit status 1.

Commands are registered lazily, one line each: `cli.lazy(NAME, "module:attribute")`.
The module is imported only when that command runs (or for --help), so a command starts
without importing the registry client, the reader, zstandard... (start-up time counts in
the mkfs benchmark), and one command module cannot break another. An already imported
click command can still be added eagerly with `cli.add_command(cmd)`.
"""
import importlib

import click

from erofs_tools import __version__
from erofs_tools.errors import run_console


class LazyGroup(click.Group):
    """click.Group whose commands may be given as "module:attribute" strings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = {}

    def lazy(self, name, target):
        self._lazy[name] = target

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in self._lazy:
            modname, _, attr = self._lazy[name].partition(":")
            cmd = getattr(importlib.import_module(modname), attr)
            self.add_command(cmd, name)
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="erofs-tools")
def cli():
    """EROFS and Nydus RAFS v6 image tools."""


cli.lazy("mkfs", "erofs_tools.cli.mkfs:mkfs")
cli.lazy("mount", "erofs_tools.cli.mount:mount_cmd")
cli.lazy("umount", "erofs_tools.cli.mount:umount_cmd")
cli.lazy("inspect", "erofs_tools.cli.read_cmds:inspect_cmd")
cli.lazy("check", "erofs_tools.cli.read_cmds:check_cmd")
cli.lazy("unpack", "erofs_tools.cli.read_cmds:unpack_cmd")
cli.lazy("stat", "erofs_tools.cli.read_cmds:stat_cmd")
cli.lazy("pack", "erofs_tools.cli.pack:pack")
cli.lazy("merge", "erofs_tools.cli.merge:merge_cmd")
cli.lazy("optimize", "erofs_tools.cli.optimize:optimize_cmd")
cli.lazy("convert", "erofs_tools.cli.registry_cmds:convert_cmd")
cli.lazy("push", "erofs_tools.cli.registry_cmds:push_cmd")
cli.lazy("pull", "erofs_tools.cli.registry_cmds:pull_cmd")


def main(argv=None):
    """Console entry point of erofs-tools. Run as the program (argv None: the arguments
    are the process's), the process ends once the command returns, without the
    interpreter's teardown (errors.exit_now); called with arguments (tests, in-process
    callers), it raises SystemExit as before."""
    run_console(cli, "erofs-tools", argv, fast_exit=argv is None)
