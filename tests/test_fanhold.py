"""The fd holder's fast path in C (csrc/fanhold.c through fanotify_marks.FastAllow): the
events of one read whose ranges are filled are answered FAN_ALLOW and their fds closed,
every other one is left alone, and a malformed stream answers nothing. The events are
built by hand (the kernel's layout) on fds of a real file, and the answers go to a pipe
standing in for the group fd, so every byte written can be checked; the real group is
exercised by test_fanotify_frontend's holder tests."""
from __future__ import annotations

import os
import random
import struct

from erofs_tools.reader.fanhold import SERVE_TIMEOUT
from fscache_daemon.frontend import fanotify_abi as abi
from fscache_daemon.frontend.fanotify_marks import (
    SERVE_READY,
    FastAllow,
    FilledMap,
    FilledView,
    PollSet,
)

META = struct.Struct("=IBBHQii")
RANGE = struct.Struct("=BBHIQQ")
RESPONSE = struct.Struct("=iI")


def event(fd: int, offset: int | None, count: int | None, extra: bytes = b"") -> bytes:
    info = RANGE.pack(abi.FAN_EVENT_INFO_TYPE_RANGE, 0, RANGE.size, 0, offset, count) \
        if offset is not None else b""
    info += extra
    return META.pack(META.size + len(info), abi.FANOTIFY_METADATA_VERSION, 0, META.size,
                     abi.FAN_PRE_ACCESS, fd, 1234) + info


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_filled_events_answered_in_c_and_the_rest_left(tmp_path):
    size = 3_000_000 + 321
    nblocks = -(-size // 4096)
    path = tmp_path / "cache.blob"
    path.write_bytes(b"")
    os.truncate(path, size)
    other = tmp_path / "other"
    other.write_bytes(b"x")
    st = os.stat(path)
    fm = FilledMap(size)
    view = FilledView(os.dup(fm.fd), size)
    fast = FastAllow()
    r = random.Random(5)
    ref: set[int] = set()
    rd, wr = os.pipe()
    os.set_blocking(rd, False)
    try:
        for _ in range(30):
            for _ in range(5):
                off, n = r.randrange(size), r.randrange(1, 400_000)
                fm.set_range(off, n)
                ref.update(range(off // 4096, min(nblocks, -(-(off + n) // 4096))))
            buf, want, fds = b"", [], []
            for _ in range(r.randrange(1, 40)):
                kind = r.random()
                fd = os.open(other if kind < 0.1 else path, os.O_RDONLY)
                fds.append(fd)
                if kind < 0.1:          # a file without a map: left
                    buf += event(fd, 0, 4096)
                    want.append(False)
                    continue
                if kind < 0.15:         # no range record: left
                    buf += event(fd, None, None)
                    want.append(False)
                    continue
                off, n = r.randrange(size + 8192), r.randrange(300_000)
                if kind < 0.2:
                    n = 2**64 - 1 - r.randrange(4)     # an end past 2^64
                start, end = min(off, size), min(off + n, size)
                buf += event(fd, off, n, extra=b"\0\0\4\0" if kind < 0.25 else b"")
                want.append(end > start and all(
                    b in ref for b in range(start // 4096, (end - 1) // 4096 + 1)))
            got = fast.run(wr, buf, {(st.st_dev, st.st_ino): (view, None)})
            assert got == (sum(want), len(want))
            answers = os.read(rd, 1 << 16) if any(want) else b""
            assert [fd for fd, _ in RESPONSE.iter_unpack(answers)] == \
                [fd for fd, w in zip(fds, want) if w]
            assert all(resp == abi.FAN_ALLOW for _, resp in RESPONSE.iter_unpack(answers))
            for i, (fd, w) in enumerate(zip(fds, want)):
                assert fast.done(i) == w
                assert is_open(fd) != w, (i, w)      # closed exactly when answered
                if not w:
                    os.close(fd)
        # the first accesses the holder answered are in the view's touch log
        assert len(view.touches) > 0
    finally:
        os.close(rd)
        os.close(wr)
        view.close()
        fm.close()


def test_malformed_stream_answers_nothing(tmp_path):
    path = tmp_path / "cache.blob"
    path.write_bytes(b"\0" * 8192)
    st = os.stat(path)
    fm = FilledMap(8192)
    fm.set_range(0, 8192)
    view = FilledView(os.dup(fm.fd), 8192)
    fast = FastAllow()
    rd, wr = os.pipe()
    os.set_blocking(rd, False)
    fd = os.open(path, os.O_RDONLY)
    try:
        good = event(fd, 0, 4096)
        for bad in (good + good[:10],                              # truncated
                    good + b"\x05" + good[1:4] + b"\x02" + good[5:],  # a bad 2nd event
                    good[:4] + b"\x02" + good[5:],                # wrong version
                    good[:6] + b"\x40\x00" + good[8:]):           # metadata_len > event_len
            assert fast.run(wr, bad, {(st.st_dev, st.st_ino): (view, None)}) is None
            assert is_open(fd)
        try:
            assert os.read(rd, 64) == b""
        except BlockingIOError:
            pass
        # well formed: answered, closed
        assert fast.run(wr, good, {(st.st_dev, st.st_ino): (view, None)}) == (1, 1)
        assert not is_open(fd)
        assert RESPONSE.unpack(os.read(rd, 64)) == (fd, abi.FAN_ALLOW)
    finally:
        if is_open(fd):
            os.close(fd)
        os.close(rd)
        os.close(wr)
        view.close()
        fm.close()


def test_a_closed_view_leaves_the_table(tmp_path):
    """A view replaced by another (a new daemon's map) is never used again: its mapping
    is gone, the table follows the maps passed in."""
    size = 16384
    path = tmp_path / "cache.blob"
    path.write_bytes(b"\0" * size)
    st = os.stat(path)
    inode = (st.st_dev, st.st_ino)
    fast = FastAllow()
    rd, wr = os.pipe()
    fm1 = FilledMap(size)
    fm1.set_range(0, size)
    v1 = FilledView(os.dup(fm1.fd), size)
    fd = os.open(path, os.O_RDONLY)
    assert fast.run(wr, event(fd, 0, 4096), {inode: (v1, None)}) == (1, 1)
    v1.close()
    fm1.close()
    fm2 = FilledMap(size)       # nothing filled
    v2 = FilledView(os.dup(fm2.fd), size)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fast.run(wr, event(fd, 0, 4096), {inode: (v2, None)}) == (0, 1)
        assert is_open(fd)
    finally:
        os.close(fd)
        os.close(rd)
        os.close(wr)
        v2.close()
        fm2.close()


def test_serve_loop_answers_filled_events_in_c_until_something_else_comes(tmp_path):
    """FastAllow.serve (ern_fan_serve): while only the group has events and they are all
    filled, they are answered in C read after read without returning; an unfilled
    event, another ready fd or the timeout comes back to the caller, with the read it
    left and which of its events were answered. A SOCK_SEQPACKET pair stands in for the
    group: one message per read, the answers come out at the other end."""
    import select
    import socket
    import time

    size = 1 << 20
    path = tmp_path / "cache.blob"
    path.write_bytes(b"")
    os.truncate(path, size)
    st = os.stat(path)
    fm = FilledMap(size)
    fm.set_range(0, size // 2)
    view = FilledView(os.dup(fm.fd), size)
    filled = {(st.st_dev, st.st_ino): (view, None)}
    fast = FastAllow()
    group, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other_r, other_w = os.pipe()
    polls = PollSet()
    for fd in (group.fileno(), other_r):
        polls.register(fd, select.POLLIN)
    buf = memoryview(bytearray(abi.READ_BUFFER_SIZE))
    opened: list[int] = []

    def send(*ranges):
        fds = [os.open(path, os.O_RDONLY) for _ in ranges]
        opened.extend(fds)
        peer.send(b"".join(event(fd, off, n) for fd, (off, n) in zip(fds, ranges)))
        return fds

    try:
        # three reads of filled events: all answered in C, then the timeout
        sent = [send((0, 4096), (8192, 65536)), send((65536, 131072)), send((4096, 4096))]
        t0 = time.monotonic_ns()
        r, used, nev, n = fast.serve(group.fileno(), polls, 300, buf, filled)
        assert (r, used, n) == (SERVE_TIMEOUT, 0, 4)
        answers = [RESPONSE.unpack(peer.recv(64)) for _ in range(4)]
        assert answers == [(fd, abi.FAN_ALLOW) for fds in sent for fd in fds]
        assert not any(is_open(fd) for fds in sent for fd in fds)
        assert view.touches.page(0)["records"][0][:2] == [0, 4096]
        assert all(t0 <= rec[2] <= time.monotonic_ns() for rec in view.touches.page(0)["records"])
        # the caller's timer comes first however busy the group is: with no time left,
        # one read is answered and the call returns
        sent = [send((0, 4096)), send((4096, 4096))]
        r, used, nev, n = fast.serve(group.fileno(), polls, 0, buf, filled)
        assert (r, used, n) == (SERVE_TIMEOUT, 0, 1)
        assert not is_open(sent[0][0]) and is_open(sent[1][0])
        r, used, nev, n = fast.serve(group.fileno(), polls, 0, buf, filled)
        assert (r, n) == (SERVE_TIMEOUT, 1) and not is_open(sent[1][0])
        assert [RESPONSE.unpack(peer.recv(64))[0] for _ in range(2)] == [sent[0][0], sent[1][0]]
        # a read with an unfilled event: back to the caller with it and the done flags
        fds = send((0, 4096), (size - 4096, 4096))
        r, used, nev, n = fast.serve(group.fileno(), polls, 2000, buf, filled)
        assert (r, nev, n) == (SERVE_READY, 2, 1) and used > 0
        assert polls.ready() == [(group.fileno(), select.POLLIN)]
        assert fast.done(0) and not fast.done(1)
        assert not is_open(fds[0]) and is_open(fds[1])
        assert RESPONSE.unpack(peer.recv(64)) == (fds[0], abi.FAN_ALLOW)
        # another fd ready: back at once, the group's events not read
        fds = send((0, 4096))
        os.write(other_w, b"x")
        r, used, nev, n = fast.serve(group.fileno(), polls, 2000, buf, filled)
        assert (r, used, n) == (SERVE_READY, 0, 0)
        assert dict(polls.ready())[other_r] == select.POLLIN
        assert is_open(fds[0])
        # a malformed read: left whole to the caller's parser
        os.read(other_r, 1)
        group.recv(64)
        peer.send(event(fds[0], 0, 4096)[:30])
        r, used, nev, n = fast.serve(group.fileno(), polls, 2000, buf, filled)
        assert (r, used, nev, n) == (SERVE_READY, 30, 0, 0) and is_open(fds[0])
    finally:
        for fd in opened:
            if is_open(fd):
                os.close(fd)
        group.close()
        peer.close()
        os.close(other_r)
        os.close(other_w)
        view.close()
        fm.close()


def test_c_answers_note_first_touches_in_the_touch_log(tmp_path):
    """The C core notes the first touches of the events it answers in the file's
    TouchLog itself (no Python per event), the same records TouchLog.note makes; and a
    rearm of a full log makes room for every block again, keeping the records."""
    from erofs_tools.reader.fanhold import FilledAnswerer
    from fscache_daemon.frontend.fanotify_marks import TouchLog

    size = 40 * 4096 + 100
    path = tmp_path / "cache.blob"
    path.write_bytes(b"")
    os.truncate(path, size)
    st = os.stat(path)
    fm = FilledMap(size)
    fm.set_range(0, size)
    view = FilledView(os.dup(fm.fd), size)
    log, ref = TouchLog(size), TouchLog(size)
    ans = FilledAnswerer(64)
    rd, wr = os.pipe()
    os.set_blocking(rd, False)
    r = random.Random(7)
    try:
        ans.set_maps([(st.st_dev, st.st_ino, size, view.nblocks, view.ptr, log.area)])
        for _ in range(3):
            for _ in range(20):
                ranges = [(r.randrange(size + 4096), r.randrange(1, 5 * 4096))
                          for _ in range(r.randrange(1, 6))]
                fds = [os.open(path, os.O_RDONLY) for _ in ranges]
                buf = b"".join(event(fd, off, n) for fd, (off, n) in zip(fds, ranges))
                got = ans.allow(wr, buf)
                assert got is not None
                for fd, (off, n) in zip(fds, ranges):
                    if ans.done(fds.index(fd)):
                        ref.note(off, n, 0)
                    else:
                        os.close(fd)
                os.read(rd, 1 << 16)
            assert len(log) == len(ref) > 0
            assert [rec[:2] for rec in log.page(0)["records"]] == \
                [rec[:2] for rec in ref.page(0)["records"]]
            assert all(rec[2] > 0 for rec in log.page(0)["records"])
            # every block touched again counts as new after a rearm; a log without room
            # for all of them gets a new area (records kept), which FastAllow picks up
            gen = log.area.gen
            log.rearm()
            ref.rearm()
            assert len(log) == len(ref)
            assert log.area.cap - len(log) > log.nblocks
            if log.area.gen != gen:
                ans.set_maps([(st.st_dev, st.st_ino, size, view.nblocks, view.ptr,
                               log.area)])
        assert len(log) > log.nblocks        # past the first area's room
    finally:
        os.close(rd)
        os.close(wr)
        view.close()
        fm.close()
