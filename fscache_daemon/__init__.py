"""fscache-daemon: serves RAFS v6 blob ranges to the kernel on demand."""

__version__ = "0.1.0"
