"""The fanotify fd holder: keeps the pre-content group alive across daemon crashes.

If the process owning a fanotify group dies, the kernel allows every pending access and
drops the marks, so readers of unfilled holes read zeros. The holder is a small process
that owns the group, the marks, the writer fds opened before marking, and every event it
has read (with its event fd). A daemon connects over a unix socket:

  control connection (any number, request/reply):
    {"op":"hello"}              -> {"ok":true,"pid":N} + SCM_RIGHTS [dup of the group fd]
    {"op":"mark","path":P}      -> {"ok":true,"new":bool} + [writer fd opened before marking]
    {"op":"mark","path":P,"filled":{"inode":[dev,ino]}} + [memfd]
                                -> the same; the holder also maps the file's "filled"
                                   bitmap (FilledMap), owned by this connection
    {"op":"unmark","path":P[,"inode":[dev,ino]]} -> {"ok":true,"inode":[dev,ino]}
    {"op":"sweep","keep":[[dev,ino],...]} -> {"ok":true,"released":[paths]}: unmarks
                                   the other files that nothing else has open
    {"op":"status"}             -> {"ok":true,"marks":[...],"pending":N,"subscribed":bool,
                                    "filled_maps":N,"stats":{...}}
    {"op":"touches","inode":[dev,ino],"since":N[,"rearm":B]} -> {"ok":true,"records":[[o,n,ns]],"next":N}
  event connection (at most one, the live daemon):
    {"op":"subscribe"}          -> {"ok":true,"pending":N}, then a stream of
                                   {"op":"events","events":[{id,mask,pid,offset,count}]}
                                   + [event fds]; from the daemon (no replies):
    {"op":"answer","id":N,"response":R}   the holder writes the response, closes the fd
  An event's id is the holder's event fd number (unique while the event is pending).

Fast path: an event whose range is wholly set in its file's filled bitmap is allowed by
the holder at once (the daemon sets a block's bit only after its verified data is in the
cache file, and never clears one), its first access noted for the daemon's traces. A bitmap
lives only as long as the connection that sent it: then every event is forwarded again.

Only the holder writes responses, and only answers from the current subscriber count
(the kernel matches a response by fd number alone: docs/fanotify.md says why that matters).

Events the holder has read but no daemon answered stay pending in the holder: the kernel
keeps their readers blocked (measured on 6.18: events read by a process that dies are
neither re-queued nor answered). When a daemon subscribes it gets every pending event
again, so a restarted daemon answers what the dead one had been working on.

The holder itself must outlive every mount of a marked file: SIGTERM is refused while marks
of files in use exist (without a daemon, those nothing has open are released first), and
SIGKILL of the holder fails open (nothing can prevent that in 6.18). SIGUSR1: listen again
if the socket vanished (a daemon finds us by our command line; no orphan).

Run: python -m fscache_daemon.frontend.fdholder --sock PATH
"""

from __future__ import annotations

import argparse
import collections.abc
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

from fscache_daemon.errors import FanotifyUnsupportedError, FrontendError, HolderError
from fscache_daemon.frontend import fanotify_abi as abi
from fscache_daemon.frontend import fanotify_marks as marks
from fscache_daemon.frontend.fanotify_marks import FastAllow, FilledView, MarkTable, PendingEvent
from fscache_daemon.frontend.fanotify_marks import recv_msg as _recv
from fscache_daemon.frontend.fanotify_marks import send_msg as _send

log = logging.getLogger(__name__)

# SCM_RIGHTS carries at most 253 fds per message; stay well below
EVENTS_PER_MSG = 64
# a daemon that does not drain its socket for this long is treated as hung and dropped
SEND_TIMEOUT = 5.0
# how long a new daemon retries while the holder still sees a predecessor subscribed
SUBSCRIBE_TIMEOUT = 3.0


# ------------------------------------------------------------------------------- server


class FdHolder:
    """The holder process's state and poll loop (single-threaded by design)."""

    def __init__(self, sock_path: str):
        self.sock_path = os.path.abspath(sock_path)
        abi.raise_nofile_limit()
        self.group_fd = abi.fanotify_init(
            abi.FAN_CLASS_PRE_CONTENT | abi.FAN_CLOEXEC | abi.FAN_NONBLOCK,
            os.O_RDWR | os.O_LARGEFILE)
        self.marks = MarkTable(self.group_fd)    # with writer fds opened before marking
        self.pending: dict[int, tuple[int, abi.RawEvent]] = {}  # id -> (event fd, event)
        # inode -> (filled bitmap, the connection that sent it)
        self.filled: dict[tuple[int, int], tuple[FilledView, socket.socket]] = {}
        self._fast = FastAllow()
        self._rbuf = bytearray(abi.READ_BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self.stats = {"events": 0, "allowed_filled": 0, "forwarded": 0}
        self.subscriber: socket.socket | None = None
        self.controls: dict[int, socket.socket] = {}
        self.listener = self._listen()
        self._sig_r, self._sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        # fd -> handler; the poller is kept in step by _watch/_unwatch (rebuilding it per
        # event costs more than the event itself)
        self._handlers: dict[int, collections.abc.Callable[[int], None]] = {}
        self._poller = marks.PollSet()   # select.poll's calls; polled in C (serve)
        self._left: tuple | None = None  # a read of the group the C loop left to Python
        self._unsent: collections.deque[int] = collections.deque()  # ids for the daemon
        self._stuck_since: float | None = None  # when the daemon's socket filled up
        self._watch(self.listener.fileno(), lambda _: self._accept())
        self._watch(self._sig_r, lambda _: self._handle_signals())
        self._watch(self.group_fd, lambda _: self._read_group())

    def _watch(self, fd: int, handler) -> None:
        self._handlers[fd] = handler
        self._poller.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _listen(self) -> socket.socket:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.sock_path)
        except OSError:
            pass  # nobody answers: a stale socket file from a dead holder
        else:
            probe.close()
            raise HolderError(f"{self.sock_path}: another fd holder is running")
        probe.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # root-only socket: it hands out the group fd
        try:
            s.bind(self.sock_path)
        finally:
            os.umask(old)
        s.listen(8)
        return s

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        os.write(self._sig_w, bytes([signum]))

    def _handle_signals(self) -> None:
        try:
            sigs = os.read(self._sig_r, 64)
        except BlockingIOError:
            return
        for signum in sigs:
            if signum == signal.SIGUSR1:
                self._rebind()
                continue
            if self.subscriber is None and not self.controls:
                # no daemon (whose marks a sweep must keep: the "keep" of its own sweeps)
                self._sweep(())     # the files nothing has open need no mark
            if self.marks:
                # exiting now would fail open: every hole of every marked file reads zeros
                log.error("fd holder: refusing %s: %d cache files still marked; unmount "
                          "and unmark first", signal.Signals(signum).name, len(self.marks))
            else:
                log.info("fd holder: %s, no marks left; exiting", signal.Signals(signum).name)
                self._stop = True

    def _rebind(self) -> None:
        """SIGUSR1: listen again if our socket vanished (cache directory deleted)."""
        if os.path.exists(self.sock_path):
            return
        os.makedirs(os.path.dirname(self.sock_path), mode=0o700, exist_ok=True)
        try:
            fresh = self._listen()
        except (OSError, HolderError) as exc:
            return log.error("fd holder: cannot listen on %s: %s", self.sock_path, exc)
        self._unwatch(self.listener.fileno())
        self.listener.close()
        self.listener = fresh
        self._watch(fresh.fileno(), lambda _: self._accept())
        log.warning("fd holder: socket %s had vanished; listening again", self.sock_path)

    # -- loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        # SIGHUP too: a closing terminal must not take the group (and every mount's data)
        # down with it
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGIO, signal.SIG_IGN)     # a lease break (_sweep) is no end
        log.info("fd holder: pid %d serving %s", os.getpid(), self.sock_path)
        while not self._stop:
            # filled events are answered in C meanwhile, the rest comes back here
            t = self._check_stuck()
            r, used, nev, n = self._fast.serve(self.group_fd, self._poller, -1 if t is None
                                               else int(t) + 1, self._rview, self.filled)
            self.stats["events"] += n
            self.stats["allowed_filled"] += n
            self._left = (self._rview[:used], (0, nev) if nev else None) if used else None
            ready = self._poller.ready() if r == marks.SERVE_READY else []
            for fd, revents in ready:
                handler = self._handlers.get(fd)  # may be gone: closed earlier this round
                if handler is None:
                    continue
                try:
                    handler(revents)
                except Exception:  # noqa: BLE001 - dying here would fail open; log, go on
                    log.exception("fd holder: error handling fd %d", fd)
        self.close()

    def close(self) -> None:
        for fd, conn in list(self.controls.items()):
            self._unwatch(fd)
            conn.close()
        self.controls.clear()
        self._drop_subscriber("holder exiting")
        self.listener.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        for view, _ in self.filled.values():
            view.close()
        self.filled.clear()
        self.marks.close_all()
        os.close(self.group_fd)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  12))[1]
        if uid not in (0, os.getuid()):
            log.warning("fd holder: refusing connection from uid %d", uid)
            conn.close()
            return
        fd = conn.fileno()
        self.controls[fd] = conn  # every connection starts as a control one
        self._watch(fd, lambda _: self._from_control(fd, conn))

    # -- group events ------------------------------------------------------------------

    def _read_group(self) -> None:
        # drain the kernel queue even with no daemon: keeps it far from overflowing
        # (an overflow would lose permission events); fds are cheap (RLIMIT raised)
        if self._left is not None:      # read (and its filled events answered) in C
            (buf, fast), self._left = self._left, None
        else:
            try:   # into one buffer kept for the holder's life: no allocation per event
                buf = self._rview[:os.readv(self.group_fd, [self._rbuf])]
            except BlockingIOError:
                return
            fast = self._fast.run(self.group_fd, buf, self.filled) if self.filled else None
        # the filled ones answered in C (fanotify_marks.FastAllow); the rest (not filled,
        # or the answer failed) go to the daemon
        if fast is not None:
            self.stats["events"] += fast[0]
            self.stats["allowed_filled"] += fast[0]
            if fast[0] == fast[1]:
                return
        try:
            events = abi.parse_events(buf)
        except FrontendError as exc:
            # cannot happen with a sane kernel; the events' readers stay blocked (killable)
            log.critical("fd holder: unparsable events dropped: %s", exc)
            return
        fresh = []
        for i, ev in enumerate(events):
            if fast is not None and self._fast.done(i):
                continue
            if ev.overflow or ev.fd < 0:
                log.critical("fd holder: fanotify queue overflow; events were lost")
                continue
            self.stats["events"] += 1
            self.stats["forwarded"] += 1
            # the id is the event fd number: unique while pending (the fd stays open until
            # the daemon is done) and what the kernel matches responses against
            self.pending[ev.fd] = (ev.fd, ev)
            fresh.append(ev.fd)
        if self.subscriber is not None and fresh:
            self._unsent.extend(fresh)
            self._flush()

    def _drop_views(self, conn: socket.socket) -> None:
        """Forget the filled bitmaps `conn` sent (its daemon is gone or replaced them)."""
        for inode in [i for i, (_, c) in self.filled.items() if c is conn]:
            view, _ = self.filled.pop(inode)
            view.close()

    def _flush(self) -> None:
        """Send queued events without ever blocking.

        A blocking send would deadlock: the daemon's loop thread may itself be blocked
        sending us answers that we only read when our loop runs.
        """
        while self._unsent and self.subscriber is not None:
            batch: list[int] = []
            while self._unsent and len(batch) < EVENTS_PER_MSG:
                eid = self._unsent[0]
                if eid in self.pending:  # skip events answered meanwhile
                    batch.append(eid)
                self._unsent.popleft()
            if not batch:
                break
            evs, fds = [], []
            for eid in batch:
                fd, ev = self.pending[eid]
                evs.append({"id": eid, "mask": ev.mask, "pid": ev.pid,
                            "offset": ev.offset, "count": ev.count})
                fds.append(fd)
            try:
                _send(self.subscriber, {"op": "events", "events": evs}, fds)
            except BlockingIOError:
                # socket full: retry on POLLOUT; a daemon that never drains is dropped
                self._unsent.extendleft(reversed(batch))
                if self._stuck_since is None:
                    self._stuck_since = time.monotonic()
                self._poller.modify(self.subscriber.fileno(), select.POLLIN | select.POLLOUT)
                return
            except OSError as exc:
                # the events stay pending; the next daemon gets them
                self._drop_subscriber(f"send failed: {exc}")
                return
        self._stuck_since = None
        if self.subscriber is not None:
            self._poller.modify(self.subscriber.fileno(), select.POLLIN)

    def _check_stuck(self) -> float | None:
        """Drop a daemon whose socket stayed full too long; returns ms to wait or None."""
        if self._stuck_since is None:
            return None
        left = self._stuck_since + SEND_TIMEOUT - time.monotonic()
        if left <= 0:
            self._drop_subscriber(f"its socket stayed full for {SEND_TIMEOUT:.0f}s")
            return None
        return left * 1000

    def _drop_subscriber(self, why: str) -> None:
        if self.subscriber is not None:
            log.warning("fd holder: daemon gone (%s); %d events wait for the next one",
                        why, len(self.pending))
            self._unwatch(self.subscriber.fileno())
            self._drop_views(self.subscriber)
            self.subscriber.close()
            self.subscriber = None
        self._unsent.clear()
        self._stuck_since = None

    def _on_subscriber(self, revents: int) -> None:
        if revents & select.POLLOUT:
            self._flush()
        if revents & ~select.POLLOUT:
            self._from_subscriber()

    def _from_subscriber(self) -> None:
        # drain everything queued: answers arrive in bursts from the daemon's workers
        while self.subscriber is not None:
            try:
                msg, _ = _recv(self.subscriber)
            except BlockingIOError:
                return
            except (OSError, HolderError) as exc:
                self._drop_subscriber(str(exc))
                return
            if msg is None:
                self._drop_subscriber("connection closed")
                return
            op = msg.get("op")
            if op != "answer":
                log.warning("fd holder: unexpected message from daemon: %r", op)
                continue
            eid = msg.get("id")     # from JSON: a list would make pop() raise TypeError
            item = self.pending.pop(eid, None) if isinstance(eid, int) else None
            if item is None:
                log.warning("fd holder: %s for unknown event %r", op, eid)
                continue
            fd, _ = item
            try:
                self._respond(fd, msg.get("response"))
            finally:
                os.close(fd)

    def _respond(self, fd: int, response) -> None:
        try:
            abi.write_response(self.group_fd, fd, int(response))
        except (FrontendError, ValueError, TypeError) as exc:
            # a bad response value: fall back to EIO so the reader is not stuck forever
            log.error("fd holder: bad answer for event fd %d: %s; denying", fd, exc)
            abi.write_response(self.group_fd, fd, abi.RESPONSE_EIO)

    # -- control requests ----------------------------------------------------------------

    def _from_control(self, fd: int, conn: socket.socket) -> None:
        if self.controls.get(fd) is not conn:
            return  # closed or taken over earlier in this poll round
        try:
            msg, fds = _recv(conn, 1)
        except (OSError, HolderError) as exc:
            log.warning("fd holder: control connection error: %s", exc)
            msg, fds = None, []
        if msg is None:
            del self.controls[fd]
            self._unwatch(fd)
            self._drop_views(conn)
            conn.close()
            return
        op = msg.get("op")
        if fds and not (op == "mark" and msg.get("filled") is not None):
            for extra in fds:
                os.close(extra)
            fds = []
        try:
            if op == "subscribe":
                del self.controls[fd]
                self._unwatch(fd)
                self._subscribe(conn)
            elif op == "hello":
                _send(conn, {"ok": True, "pid": os.getpid()}, [self.group_fd])
            elif op == "mark":
                new, wfd = self._mark(str(msg["path"]))
                if fds:
                    self._install_view(wfd, fds.pop(), msg["filled"], conn)
                _send(conn, {"ok": True, "new": new}, [wfd])
            elif op == "unmark":
                inode = msg.get("inode")
                done = self._unmark(str(msg["path"]), tuple(inode) if inode else None)
                _send(conn, {"ok": True, "inode": list(done)})
            elif op == "sweep":     # marks of files no daemon keeps and nobody has open
                keep = msg.get("keep")
                _send(conn, {"ok": True, "released": self._sweep(
                    keep if isinstance(keep, list) else ())})
            elif op == "touches":   # first accesses allowed here, for access traces
                _send(conn, FilledView.touches_reply(self.filled, msg))
            elif op == "status":
                _send(conn, {"ok": True, "marks": self.marks.paths(),
                             "pending": len(self.pending),
                             "subscribed": self.subscriber is not None,
                             "filled_maps": len(self.filled), "stats": self.stats})
            else:
                _send(conn, {"ok": False, "error": f"unknown op {op!r}"})
        except (FrontendError, OSError, KeyError) as exc:
            try:
                _send(conn, {"ok": False, "error": str(exc),
                             "unsupported": isinstance(exc, FanotifyUnsupportedError)})
            except OSError:
                pass
        finally:
            for extra in fds:
                os.close(extra)

    def _subscribe(self, conn: socket.socket) -> None:
        if self.subscriber is not None:
            # a restarted daemon can ask before we noticed its predecessor hang up: read
            # what the old connection holds (answers, then EOF) before deciding
            self._from_subscriber()
        if self.subscriber is not None:
            # two daemons answering one group would race on the same events
            _send(conn, {"ok": False, "error": "another daemon is subscribed"})
            self._drop_views(conn)
            conn.close()
            return
        _send(conn, {"ok": True, "pending": len(self.pending)})
        # non-blocking: the holder must never sleep in a recv or a send (see _flush)
        conn.setblocking(False)
        self.subscriber = conn
        self._watch(conn.fileno(), self._on_subscriber)
        log.info("fd holder: daemon subscribed; re-sending %d pending events", len(self.pending))
        self._unsent.extend(sorted(self.pending))
        self._flush()

    def _mark(self, path: str) -> tuple[bool, int]:
        new, wfd = self.marks.mark(path)
        if new:
            log.info("fd holder: marked %s", path)
        return new, wfd

    def _install_view(self, wfd: int, map_fd: int, spec, conn: socket.socket) -> None:
        """Map the filled bitmap (map_fd, ours to close) of the file marked at wfd, in
        place of any older one. A bitmap for another inode than the one marked (the path
        was replaced meanwhile) or an unusable memfd is refused: events are forwarded."""
        st = os.fstat(wfd)
        inode = (st.st_dev, st.st_ino)
        want = spec.get("inode") if isinstance(spec, dict) else None
        if want is not None and tuple(want) != inode:
            os.close(map_fd)
            log.warning("fd holder: filled map for inode %r, marked %r; not used", want, inode)
            return
        try:
            view = FilledView(map_fd, st.st_size)
        except (FrontendError, OSError, ValueError) as exc:
            log.warning("fd holder: filled map refused: %s", exc)
            return
        old = self.filled.pop(inode, None)
        if old is not None:
            view.touches = old[0].touches   # the same file: keep its first accesses
            old[0].close()
        self.filled[inode] = (view, conn)

    def _sweep(self, keep) -> list[str]:
        """Unmark the files whose inode is not in `keep` and that nothing else has open
        (MarkTable.release_unused): a restart's forgotten mounts, gone since."""
        done = self.marks.release_unused({tuple(k) for k in keep if isinstance(k, list)})
        for inode, path in done:
            old = self.filled.pop(inode, None)
            if old is not None:
                old[0].close()
            log.info("fd holder: released %s: no mount uses it any more", path)
        return [p for _, p in done]

    def _unmark(self, path: str, inode: tuple[int, int] | None) -> tuple[int, int]:
        done = self.marks.unmark(path, inode)
        old = self.filled.pop(done, None)
        if old is not None:
            old[0].close()
        log.info("fd holder: unmarked %s", path)
        return done


# ------------------------------------------------------------------------------- client


class HolderChannel:
    """The daemon side: a PreContentWatcher channel whose group lives in the holder.

    Marks go through the holder (it keeps the writer fds across daemon restarts), events
    come from the holder with their fds, answers go back to it. `group_fd` is this
    process's dup of the holder's group (e.g. for inspection); holding it is harmless.
    """

    def __init__(self, sock_path: str, timeout: float = 10.0):
        self.sock_path = sock_path
        abi.raise_nofile_limit()  # every event the holder sends us arrives as an fd
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ctl = self._connect(timeout)
        self._events: socket.socket | None = None
        self._writers: dict[tuple[int, int], int] = {}  # inode -> our writer fd dup
        reply, fds = self._call({"op": "hello"}, maxfds=1)
        if len(fds) != 1:
            raise HolderError(f"{sock_path}: fd holder sent no group fd")
        self.group_fd = fds[0]
        self.holder_pid = reply.get("pid")

    def _connect(self, timeout: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(self.sock_path)
        except OSError as exc:
            s.close()
            raise HolderError(f"{self.sock_path}: cannot reach fd holder: "
                              f"{exc.strerror or exc}") from exc
        return s

    def _call(self, req: dict, maxfds: int = 0,
              fds: collections.abc.Sequence[int] = ()) -> tuple[dict, list[int]]:
        with self._lock:
            try:
                _send(self._ctl, req, fds)
                reply, fds = _recv(self._ctl, maxfds)
            except OSError as exc:
                raise HolderError(f"{self.sock_path}: fd holder request failed: {exc}") from exc
        if reply is None:
            raise HolderError(f"{self.sock_path}: fd holder closed the connection")
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            cls = FanotifyUnsupportedError if reply.get("unsupported") else HolderError
            raise cls(reply.get("error", "fd holder refused the request"))
        return reply, fds

    def fileno(self) -> int:
        if self._events is None:
            # subscribe lazily (from the loop): events must not pile up in the socket
            # before anyone reads them, and marks (keys) are registered by then
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            while True:
                s = self._connect(10.0)
                _send(s, {"op": "subscribe"})
                reply, _ = _recv(s)
                if reply and reply.get("ok"):
                    break
                s.close()
                why = (reply or {}).get("error", "connection closed")
                # a predecessor that is exiting may still hold the subscription briefly
                if time.monotonic() > deadline:
                    raise HolderError(f"{self.sock_path}: subscribe refused: {why}")
                time.sleep(0.1)
            s.settimeout(None)
            self._events = s
        return self._events.fileno()

    def receive(self) -> list[PendingEvent]:
        msg, fds = _recv(self._events, EVENTS_PER_MSG) if self._events is not None else (None, [])
        if msg is None:
            raise HolderError(f"{self.sock_path}: fd holder closed the event connection")
        evs = msg.get("events", [])
        if msg.get("op") != "events" or len(evs) != len(fds):
            for fd in fds:
                os.close(fd)
            raise HolderError(f"{self.sock_path}: malformed event message")
        return [PendingEvent(fd, e["mask"], e["pid"], e["offset"], e["count"], e["id"])
                for e, fd in zip(evs, fds)]

    def answer(self, ev: PendingEvent, response: int) -> None:
        """Hand the response to the holder, which writes it (see the module doc: why)."""
        try:
            with self._send_lock:
                if self._events is None:
                    # closed: the holder keeps the event and gives it to the next daemon
                    log.warning("fd holder channel closed; event %d left to the holder",
                                ev.token)
                    return
                _send(self._events, {"op": "answer", "id": ev.token, "response": response})
        finally:
            os.close(ev.fd)

    def mark(self, path: str, filled=None) -> int:
        """Mark path through the holder; with `filled` (a FilledMap of that file) the
        holder allows events on filled ranges itself while this channel is open."""
        path = os.path.abspath(path)
        req: dict[str, object] = {"op": "mark", "path": path}
        if filled is not None:
            req["filled"] = {"inode": list(filled.inode) if filled.inode else None}
            _, fds = self._call(req, maxfds=1, fds=[filled.fd])
        else:
            _, fds = self._call(req, maxfds=1)
        if len(fds) != 1:
            raise HolderError(f"{path}: fd holder sent no writer fd")
        st = os.fstat(fds[0])
        inode = (st.st_dev, st.st_ino)
        if inode in self._writers:  # marked before: keep the dup we already handed out
            os.close(fds[0])
        else:
            self._writers[inode] = fds[0]
        return self._writers[inode]

    def unmark(self, path: str, inode: tuple[int, int] | None = None) -> None:
        """Unmark `inode` (as marked under path), or whatever is marked at path."""
        req: dict[str, object] = {"op": "unmark", "path": os.path.abspath(path)}
        if inode is not None:
            req["inode"] = list(inode)
        reply, _ = self._call(req)
        wfd = self._writers.pop(tuple(reply.get("inode", ())), None)
        if wfd is not None:
            os.close(wfd)

    def status(self) -> dict:
        reply, _ = self._call({"op": "status"})
        return reply

    def release_unused(self, keep: collections.abc.Iterable[tuple[int, int]]) -> list[str]:
        """Have the holder unmark the files not in `keep` (inodes) that nothing else has
        open; the paths it unmarked."""
        reply, _ = self._call({"op": "sweep", "keep": [list(k) for k in keep]})
        return list(reply.get("released") or [])

    def close(self) -> None:
        """Leaves the group, marks and unanswered events with the holder."""
        for wfd in self._writers.values():
            os.close(wfd)
        self._writers.clear()
        with self._send_lock:
            if self._events is not None:
                self._events.close()
                self._events = None
        self._ctl.close()
        if self.group_fd >= 0:
            os.close(self.group_fd)
            self.group_fd = -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fscache_daemon.frontend.fdholder",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--sock", required=True, help="unix socket path to serve")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s fdholder %(levelname)s %(message)s")
    try:
        holder = FdHolder(args.sock)
    except FrontendError as exc:
        log.error("%s", exc)
        return 1
    holder.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
