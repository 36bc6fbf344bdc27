#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction: the delay half of an
emulated link where the kernel has no netem (CONFIG_NET_SCH_NETEM unset; the rate half
is tc tbf on a veth pair).

    python3 delay_relay.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS

Every chunk read from one side is written to the other DELAY_MS after it arrived (so a
request/response pair costs 2 x DELAY_MS more, as over a link with that round trip);
the first data of a connection waits one extra round trip, standing in for the TCP
handshake the client's connect() did not wait for. Chunks are forwarded in order, and
reading goes on while earlier chunks wait, so bulk transfers are not slowed beyond the
delay (the rate limit is tbf's). Prints "listening" once it accepts connections."""
from __future__ import annotations

import collections
import socket
import sys
import threading
import time

CHUNK = 256 << 10


def pump(src: socket.socket, dst: socket.socket, delay: float, first_extra: float) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def writer() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    extra = first_extra
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            data = b""
        with ready:
            queue.append((time.monotonic() + delay + extra, data))
            ready.notify()
        extra = 0.0
        if not data:
            break
    t.join()


def serve(conn: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    try:
        up = socket.create_connection(upstream)
    except OSError:
        conn.close()
        return
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pump, args=(up, conn, delay, 0.0), daemon=True)
    back.start()
    pump(conn, up, delay, 2 * delay)
    back.join()
    conn.close()
    up.close()


def main() -> None:
    listen, upstream, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lh, lp = listen.rsplit(":", 1)
    uh, up = upstream.rsplit(":", 1)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lh, int(lp)))
    srv.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, (uh, int(up)), delay_ms / 1000),
                         daemon=True).start()


if __name__ == "__main__":
    main()
