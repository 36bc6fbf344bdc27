"""The one exception hierarchy of erofs-tools.

Every error a user can cause (bad arguments, bad input trees, corrupt or hostile images,
registry failures) is an ErofsToolsError whose str() is a one-line message fit to print
after "error: ". The CLI turns these into exit status 1 (`run_console`, for erofs-tools
and fscache-daemon); anything else is a bug.
"""
import contextlib
import os
import sys
from collections.abc import Iterator


class ErofsToolsError(Exception):
    """Base class; the message is one line a user understands.

    str() keeps it one line whatever it quotes: a name, blob id or text taken from a
    hostile image, tar or registry may hold a newline or a terminal escape; control
    characters come out as \\xNN (shown_path does the same for paths it shortens)."""

    def __str__(self) -> str:
        msg = super().__str__()
        if msg.isprintable():
            return msg
        return "".join(c if c.isprintable() else _escaped(ord(c)) for c in msg)


def _escaped(o: int) -> str:
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


class InputError(ErofsToolsError):
    """The user's input (source tree, tar stream, option) cannot be turned into an image."""


class CreateFileError(InputError, OSError):
    """A file cannot be created where an output or temporary file must go (a missing
    or read-only directory, /proc): an InputError, so the programs print one line, and
    an OSError, as callers of fsutil.create_exclusive have always caught."""

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, message)

    def __str__(self) -> str:
        msg = self.strerror or ""
        if msg.isprintable():
            return msg
        return "".join(c if c.isprintable() else _escaped(ord(c)) for c in msg)


class FormatLimitError(InputError):
    """The input holds something the on-disk format cannot represent."""


class CorruptImageError(ErofsToolsError):
    """An image, bootstrap or blob is truncated, inconsistent or hostile."""


class DigestMismatchError(CorruptImageError):
    """Data does not match the digest recorded for it."""


class ImageChangedError(CorruptImageError):
    """The image file was truncated, grown or rewritten while a reader had it open."""


class RegistryError(ErofsToolsError):
    """A registry request failed (after retries) or returned something invalid."""

    # set by RegistrySession.fail on an HTTP answer (for upload restarts); absent else
    status: int
    codes: list[str]


class AuthError(RegistryError):
    """The registry refused our credentials or no usable credentials were found."""


class MountError(ErofsToolsError):
    """mount(2)/umount(2) or the cache setup around them failed."""


# bytes a name may hold that would break a message's one line (a newline) or the terminal
_CONTROL = bytes(range(0x20)) + b"\x7f"


def shown_path(path: "str | bytes", limit: int = 300) -> str:
    """A path for a one-line message: its last `limit` bytes at most (a path deeper than
    PATH_MAX would otherwise make a 4 KB line), control characters as \\xNN: a file name
    may hold a newline (an image's, a tar's, a source tree's), and the message must stay
    one line."""
    path = os.fsencode(path)
    if len(path) > limit:
        path = b"..." + path[-limit:]
    if path.translate(None, _CONTROL) != path:
        path = b"".join(b"\\x%02x" % c if c in _CONTROL else bytes((c,)) for c in path)
    return os.fsdecode(path)


def run_console(group, prog_name: str, argv=None, fast_exit: bool = False):
    """Run a click group as a console program: an ErofsToolsError or a usage error is
    one line "error: <message>" on stderr and exit status 1, like every other bad
    input; ^C is "error: interrupted", status 130. fast_exit: the process ends here
    once the command has returned (exit_now), not through the interpreter's teardown."""
    import click  # only the programs need it, not every importer of the errors

    try:
        rv = group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except ErofsToolsError as e:
        # one line whatever a message holds (a peer's text, a name quoted unescaped)
        click.echo("error: " + " ".join(str(e).splitlines()), err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as e:
        msg = " ".join(e.format_message().split())
        hint = " (see --help)" if isinstance(e, click.UsageError) else ""
        click.echo(f"error: {msg}{hint}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as e:
        click.echo("error: interrupted" + _notes(e), err=True)
        sys.exit(130)
    except Terminated as e:
        import signal
        click.echo(f"error: terminated by {signal.Signals(e.signum).name}{_notes(e)}", err=True)
        sys.exit(128 + e.signum)
    code = rv if isinstance(rv, int) else 0
    if fast_exit:
        exit_now(code)
    sys.exit(code)


def _notes(e: BaseException) -> str:
    """What the code the interruption went through added (add_note), on the same line:
    e.g. mkfs's "the device was partly written"."""
    notes = getattr(e, "__notes__", None)
    return f" ({'; '.join(notes)})" if notes else ""


class Terminated(BaseException):
    """A terminating signal, raised by `terminate_as_interrupt`'s handler (a
    BaseException, as KeyboardInterrupt: no `except Exception` stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM and SIGHUP raise Terminated,
    so that the code that removes temporary files runs (mkfs --tar's spool and sparse
    copies, a half-written image or blob) and the program ends with "error: terminated
    by SIGTERM", status 128 + the signal's number; before, `kill PID` left them behind
    (a spool as large as the tar). SIGKILL cannot be caught. Elsewhere: a no-op."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def exit_now(code: int) -> None:
    """End the process with `code` as the interpreter would, without tearing it down:
    the atexit functions run and stdout/stderr are flushed (a failed flush is status
    120, as Python's own), then os._exit. The teardown frees every module, function and
    interned string one by one and collects the heap several times over: ~15-25 ms at
    the end of every erofs-tools run (20-30 ms of a /usr/share pack's serial tail, with
    one core idle). Not while a non-daemon thread runs (the teardown would wait for it):
    then sys.exit."""
    import atexit
    import os
    import threading
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None:
                f.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)
