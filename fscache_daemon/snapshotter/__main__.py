"""`python -m fscache_daemon.snapshotter --socket PATH --root DIR`: the snapshots service
alone, in the foreground, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from erofs_tools.errors import ErofsToolsError
from fscache_daemon.snapshotter.service import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fscache_daemon.snapshotter",
                                description="containerd snapshots service (proxy plugin)")
    p.add_argument("--socket", required=True, help="unix socket containerd connects to")
    p.add_argument("--root", required=True, help="directory for metadata and snapshots")
    p.add_argument("--daemon-api", help="fscache-daemon's API socket (Nydus layers)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="fetch this registry's blobs over plain HTTP (repeatable)")
    p.add_argument("--containerd-address", default="/run/containerd/containerd.sock",
                   help="containerd's socket: which images stand on a Nydus image's "
                        "layers when it is mounted (their registry references)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        svc = serve(args.socket, args.root, daemon_api=args.daemon_api,
                    insecure_registries=tuple(args.insecure_registry),
                    containerd_address=args.containerd_address)
    except (ErofsToolsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
