"""A small progress bar for long commands, drawn on stderr only when stdout is a tty."""
import os
import sys
import time


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Progress:
    """scan(entries, bytes, copied) while walking, write(done, total) while writing, done()."""

    def __init__(self, stream=None, interval=0.1):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._shown = False

    @classmethod
    def maybe(cls, enabled=True):
        """A Progress when enabled and stdout is a terminal, else None."""
        if enabled and sys.stdout.isatty():
            return cls()
        return None

    def _draw(self, text, force=False):
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 80
        self.stream.write("\r" + text[: width - 1].ljust(width - 1))
        self.stream.flush()
        self._shown = True

    def scan(self, entries, nbytes, copied=None):
        """While walking: entries seen, their bytes, bytes copied so far."""
        extra = f", {_fmt_bytes(copied)} copied" if copied is not None else ""
        self._draw(f"scanning: {entries} entries, {_fmt_bytes(nbytes)}{extra}")

    def write(self, done, total, unit="inodes"):
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 30)
        self._draw(f"writing: [{bar:<30}] {frac * 100:5.1f}% {done}/{total} {unit}")

    def done(self):
        if self._shown:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()
