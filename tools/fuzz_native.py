"""Mutation fuzzer for C core parsers the reader fuzzer does not drive with raw bytes.

    python tools/fuzz_native.py --cases 20000 [--seed S] [--targets fanhold,ci,cold,walk] [--json]

A tool, not a library module (it uses the daemon's and the reader's modules).
Targets, each case one of them:

- fanhold: the fd holder's fast path (csrc/fanhold.c through erofs_tools.reader.fanhold)
  on a mutated fanotify event stream: well-formed events on fds of real files, some
  with their ranges filled in the maps' bitmaps, then 1-4 byte-level mutations (event,
  metadata and info-record lengths, versions, fds, range fields, random bytes,
  truncation, splices). Checked against the daemon's parser (fanotify_abi.parse_events)
  and a bitmap test in Python: a stream the C side takes is one the parser takes; an
  event is answered (FAN_ALLOW written, its fd closed) only if its range, as the
  parser reads it, is wholly filled in its own file's map; nothing else is written or
  closed.
- ci: a RAFS chunk-info table (csrc/chunkmap.c: ern_ci_pins, ern_ci_table_text,
  ern_ci_map) made of plausible rows, then mutated (blob indexes, chunk indexes, flags,
  sizes, offsets, random bytes). Checked against the reader's rules (a row naming a
  blob past the table, an index pinned twice differently: CorruptImageError) and the
  pins made in Python; a chunk map made from them holds the pins, in uncompressed
  order, inside the blob's sizes, without overlaps.
- cold: the daemon's cold path (csrc/coldpath.c: ern_cold_decode, ern_cold_store) on a
  fetched range of stored, zstd and lz4-block chunks with mutated bytes and hostile
  chunk records (offsets, sizes). A chunk it decodes is one the reader's decode_chunk
  decodes to the same bytes; the store writes exactly the verified chunks at their
  offsets and sets exactly their bits.

- walk: the daemon's mount-time parsers of whole images (csrc/fileruns.c's file-runs
  walk, csrc/chunkmap.c's pin tables) on mutated images of mkfs's newest shapes
  (tools/fuzz_reader.py's NEWER_SEEDS_OURS: --MZ, --MZ -m, --tar=i -z with --zD or -m,
  an --incremental image of two layers), with that fuzzer's field maps and its checks:
  the C walk equals the reader's walk or leaves the image to it, the C pins equal the
  reader's. The image is opened by the reader first (the daemon only walks images it
  opened); both sides may refuse with an ErofsToolsError, nothing else.

The same parsers are fuzzed on every seed, with every read-side operation around them,
by tools/fuzz_reader.py (its `runs` and `pins` operations). Case N of seed S is
random.Random(f"{S}-{N}"): `--only N` replays it; `--verbose` names each case before it
runs (a crash under a sanitizer then names its case).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback

from erofs_tools.errors import CorruptImageError, ErofsToolsError

META = struct.Struct("=IBBHQii")        # struct fanotify_event_metadata
RANGE = struct.Struct("=BBHIQQ")        # struct fanotify_event_info_range
RESPONSE = struct.Struct("=iI")
FAN_ALLOW = 1
FDBASE = 900                             # the events' fds: FDBASE + file number
SIZES = (1, 4096, 5000, 3_000_321)       # the mapped files; one more file is not mapped
INTERESTING = (0, 1, 3, 4, 6, 7, 8, 12, 23, 24, 25, 28, 32, 48, 0x7F, 0x80, 0xFF,
               0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 63, (1 << 64) - 1)


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def _mutate_bytes(buf: bytearray, rnd: random.Random, fields: list[tuple[int, int]]) -> str:
    """One mutation of buf; fields: (offset, size) of the known fields."""
    k = rnd.random()
    if k < 0.5 and fields:
        off, size = rnd.choice(fields)
        if off + size > len(buf):
            return "none"
        old = int.from_bytes(buf[off:off + size], "little")
        v = rnd.choice(INTERESTING + (old + 1, old - 1, old + 24, old - 24,
                                      old ^ (1 << rnd.randrange(size * 8)),
                                      rnd.getrandbits(size * 8)))
        buf[off:off + size] = (v % (1 << (size * 8))).to_bytes(size, "little")
        return f"field@{off}/{size}={v}"
    if k < 0.7 and buf:
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        return "bitflips"
    if k < 0.8 and buf:
        i = rnd.randrange(len(buf))
        buf[i] = rnd.randrange(256)
        return f"byte@{i}"
    if k < 0.9 and buf:
        n = rnd.randrange(len(buf))
        del buf[n:]
        return f"truncate@{n}"
    if buf:
        a, b = sorted(rnd.randrange(len(buf) + 1) for _ in range(2))
        at = rnd.randrange(len(buf) + 1)
        buf[at:at] = buf[a:b]
        return f"splice[{a}:{b}]@{at}"
    return "none"


# ---- fanhold ----

class _FanState:
    def __init__(self, tmp: str) -> None:
        from erofs_tools.reader import fanhold
        self.paths = []
        for i, size in enumerate(SIZES + (10,)):
            p = os.path.join(tmp, f"f{i}")
            with open(p, "wb") as f:
                f.truncate(size)
            self.paths.append(p)
        self.ids = [(os.stat(p).st_dev, os.stat(p).st_ino) for p in self.paths]
        self.fanhold = fanhold
        self.rd, self.wr = os.pipe()
        os.set_blocking(self.rd, False)

    def open_fds(self) -> None:
        for i, p in enumerate(self.paths):
            fd = os.open(p, os.O_RDONLY)
            os.dup2(fd, FDBASE + i)
            os.close(fd)

    def drain(self) -> bytes:
        out = b""
        while True:
            try:
                b = os.read(self.rd, 65536)
            except BlockingIOError:
                return out
            if not b:
                return out
            out += b


def _covered(bits: bytes, nblocks: int, size: int, off: int, count: int) -> bool:
    start = min(off, size)
    end = size if count > size - start else start + count
    if end <= start:
        return False
    first, last = start >> 12, (end - 1) >> 12
    return last < nblocks and all(bits[b >> 3] >> (b & 7) & 1 for b in range(first, last + 1))


def fanhold_case(st: _FanState, rnd: random.Random) -> str:
    from fscache_daemon.errors import FrontendError
    from fscache_daemon.frontend import fanotify_abi as abi

    # the maps: random bitmaps, mostly filled; some files not in the table
    maps, bitmaps = [], {}
    for i, size in enumerate(SIZES):
        if rnd.random() < 0.15:
            continue
        nblocks = -(-size // 4096)
        fill = rnd.choice((1.0, 1.0, 0.9, 0.5))
        bits = bytearray((nblocks + 7) // 8)
        for b in range(nblocks):
            if rnd.random() < fill:
                bits[b >> 3] |= 1 << (b & 7)
        bitmaps[i] = bytes(bits)
        maps.append((i, size, nblocks, bytearray(bits)))
    buf, fields = bytearray(), []
    for _ in range(rnd.randint(1, 12)):
        i = rnd.randrange(len(SIZES) + 1)
        size = (SIZES + (10,))[i]
        off = rnd.choice((0, rnd.randrange(size + 1), size, size + 1, 1 << 63))
        count = rnd.choice((1, 4096, rnd.randrange(1, size + 2), (1 << 64) - 1, 0))
        info = RANGE.pack(abi.FAN_EVENT_INFO_TYPE_RANGE, 0, RANGE.size, 0, off, count)
        if rnd.random() < 0.2:          # another record before or after it
            other = bytes([rnd.randrange(8), 0]) + struct.pack("=H", 8) + b"\0" * 4
            info = other + info if rnd.random() < 0.5 else info + other
        base = len(buf)
        buf += META.pack(META.size + len(info), abi.FANOTIFY_METADATA_VERSION, 0,
                         META.size, abi.FAN_PRE_ACCESS, FDBASE + i, 1234) + info
        fields += [(base, 4), (base + 4, 1), (base + 6, 2), (base + 16, 4)]
        for r in range(base + META.size, len(buf) - 3, 4):
            fields.append((r + 2, 2) if buf[r] in (abi.FAN_EVENT_INFO_TYPE_RANGE,) else (r, 4))
        fields += [(len(buf) - 16, 8), (len(buf) - 8, 8)]
    for _ in range(rnd.randint(0, 4)):
        _mutate_bytes(buf, rnd, fields)
    max_events = rnd.choice((64, 64, 64, 3, 1))
    ans = st.fanhold.FilledAnswerer(max_events)
    pins = [st.fanhold.pin(bits) for *_x, bits in maps]
    st.open_fds()
    before = {FDBASE + i: os.fstat(FDBASE + i) for i in range(len(st.paths))}
    try:
        ans.set_maps([(st.ids[i][0], st.ids[i][1], size, nb, pins[k])
                      for k, (i, size, nb, _b) in enumerate(maps)])
        got = ans.allow(st.wr, bytes(buf))
        written = st.drain()
        try:
            events = abi.parse_events(bytes(buf))
        except FrontendError:
            events = None
        if got is None:
            assert not written, "fanhold: a refused stream was answered"
            for fd in before:
                os.fstat(fd)            # nothing closed
            return "fanhold:refused" + (" (parser too)" if events is None else "")
        assert events is not None, "fanhold: C took a stream the parser refuses"
        n, nevents = got
        assert nevents == len(events), "fanhold: event counts differ"
        done = [i for i in range(nevents) if ans.done(i)]
        allowed = list(ans.allowed(n))
        assert len(done) == n == len(allowed)
        want_resp = b""
        closed = set()
        for i, (j, _pad, off, count) in zip(done, allowed, strict=True):
            ev = events[i]
            assert ev.fd not in closed, "fanhold: an fd answered twice"
            assert (ev.offset, ev.count) == (off, count), "fanhold: range differs"
            fi, size, nb, _bits = maps[j]
            assert ev.fd in before and st.ids[fi] == (before[ev.fd].st_dev,
                                                      before[ev.fd].st_ino), \
                "fanhold: answered from another file's map"
            assert _covered(bitmaps[fi], nb, size, off, count), \
                "fanhold: allowed a range not filled"
            want_resp += RESPONSE.pack(ev.fd, FAN_ALLOW)
            closed.add(ev.fd)
        assert written == want_resp, "fanhold: responses differ from the answered events"
        for fd in before:
            try:
                os.fstat(fd)
                is_open = True
            except OSError:
                is_open = False
            assert is_open == (fd not in closed), f"fanhold: fd {fd} closed wrongly"
        return f"fanhold:{'allowed' if n else 'none-allowed'}"
    finally:
        for p in pins:
            st.fanhold.unpin(p)
        for fd in before:
            try:
                os.close(fd)
            except OSError:
                pass


# ---- chunk-info tables ----

CI_ROW = struct.Struct("<32sIIIIQQQII")    # digest, blob, flags, csize, usize, coff, uoff,
#                                           file offset, index, crc (format.rafs.ChunkInfo)


def _py_pins(rows, nblobs):
    out: list[dict] = [{} for _ in range(nblobs)]
    for digest, blob, flags, csize, usize, coff, uoff, _fo, index, _crc in rows:
        if blob >= nblobs:
            raise CorruptImageError("blob")
        pin = (uoff, usize, coff, csize, digest, bool(flags & 1))
        if out[blob].setdefault(index, pin) != pin:
            raise CorruptImageError("twice")
    return out


def ci_case(rnd: random.Random) -> str:
    from erofs_tools import _native_chunkmap as cmap

    nblobs = rnd.randint(1, 3)
    rows = []
    for b in range(nblobs):
        uoff = coff = 0
        for i in range(rnd.randint(0, 12)):
            usize = rnd.choice((1, 4096, 5000, 1 << 20))
            comp = rnd.random() < 0.5
            csize = rnd.randint(1, usize) if comp else usize
            rows.append((os.urandom(32), b, int(comp), csize, usize, coff, uoff, 0, i, 0))
            uoff += -(-usize // 4096) * 4096
            coff += csize
    rnd.shuffle(rows)
    if rows and rnd.random() < 0.3:
        rows.append(rnd.choice(rows))                   # an exact repeat
    table = bytearray(b"".join(CI_ROW.pack(*r) for r in rows))
    fields = [(80 * k + o, s) for k in range(len(rows))
              for o, s in ((32, 4), (36, 4), (40, 4), (44, 4), (48, 8), (56, 8), (72, 4))]
    desc = [_mutate_bytes(table, rnd, fields) for _ in range(rnd.randint(0, 3))]
    table = table[:len(table) // 80 * 80]
    rows = [CI_ROW.unpack_from(table, o) for o in range(0, len(table), 80)]
    try:
        want = _py_pins(rows, nblobs)
    except CorruptImageError:
        want = None
    got = []
    try:
        for b in range(nblobs):
            got.append(cmap.ci_pins(bytes(table), nblobs, b, "fuzz"))
    except CorruptImageError:
        assert want is None, f"ci: C refuses a table the reader takes ({desc})"
        return "ci:refused"
    assert want is not None, f"ci: C takes a table the reader refuses ({desc})"
    maps = 0
    for b, recs in enumerate(got):
        pins = {r[0]: r[1:] for r in struct.iter_unpack(cmap.PIN_FORMAT, recs)}
        assert pins == want[b], f"ci: blob {b}: pins differ ({desc})"
        text = b"".join(b"%d:%d:%d:%d:%d:" % (k, p[0], p[1], p[2], p[3]) + p[4]
                        for k, p in sorted(pins.items()))
        assert cmap.ci_table_text(recs) == text, "ci: table text differs"
        ends_u = [p[0] + -(-p[1] // 4096) * 4096 for p in pins.values()]
        ends_c = [p[2] + p[3] for p in pins.values()]
        usize = rnd.choice((max(ends_u, default=0), rnd.getrandbits(40)))
        csize = rnd.choice((max(ends_c, default=0), rnd.getrandbits(40)))
        # what the daemon passes: a blob-table entry's u64 and a file size
        usize, csize = min(usize, (1 << 64) - 1), min(csize, (1 << 64) - 1)
        chunk_size = rnd.choice((1 << 20, 4096, 1 << 31, rnd.getrandbits(32) or 1))
        count = rnd.choice((len(pins), len(pins), len(pins) + 1))
        for raw in (False, True):
            made = cmap.ci_map(recs, count, usize, csize, chunk_size, raw)
            if made is None:
                continue
            maps += 1
            entries, chunks_raw = made
            chunks = list(struct.iter_unpack(cmap.CHUNK_FORMAT, chunks_raw))
            assert len(chunks) == len(pins) == count
            assert sorted(c[0] for c in chunks) == list(range(count))
            prev = 0
            for c in chunks:            # in uncompressed order, each its pin, in bounds
                assert tuple(c[1:7]) == pins[c[0]], "ci: chunk differs from its pin"
                assert c[7:] == (-1, 0)
                assert 0 < c[2] <= chunk_size and c[1] % 4096 == 0 and c[1] >= prev
                prev = c[1] + -(-c[2] // 4096) * 4096
                assert prev <= usize and 0 < c[4] and c[3] + c[4] <= csize
                assert not (raw and c[6]) and (c[6] or c[4] == c[2])
            stored = sorted((c[3], c[3] + c[4]) for c in chunks)
            assert all(a[1] <= b[0] for a, b in zip(stored, stored[1:])), "ci: overlap"
            assert len(entries) == count * cmap.PIN_REC
    return "ci:pins" + (" with maps" if maps else "")


# ---- the daemon's cold path ----

def cold_case(rnd: random.Random, tmp: str) -> str:
    import zstandard

    from erofs_tools import _native
    from erofs_tools.reader.blob import _decompress

    n = rnd.randint(1, 6)
    src, chunks, uoff = bytearray(), [], 0
    for _i in range(n):
        size = rnd.choice((1, 100, 4096, 5000, 70000))
        data = (b"ab\0" * size)[:size // 4] + rnd.randbytes(size - size // 4)
        alg = rnd.choice(("none", "zstd", "lz4_block"))
        if alg == "zstd":
            stored = zstandard.ZstdCompressor(write_checksum=rnd.random() < 0.5,
                                              write_content_size=rnd.random() < 0.8
                                              ).compress(data)
        elif alg == "lz4_block":
            stored = _native.lz4_block_compress(data) or data
            alg = alg if stored is not data else "none"
        else:
            stored = data
        chunks.append([alg, len(src), len(stored), size, uoff, uoff, len(chunks)])
        src += stored
        uoff += -(-size // 4096) * 4096
    fields = [(c[1] + k, 1) for c in chunks for k in range(min(c[2], 12))]
    for _ in range(rnd.randint(0, 3)):
        if rnd.random() < 0.6:
            _mutate_bytes(src, rnd, fields)
        else:                           # the chunk's record: hostile blob meta
            c = rnd.choice(chunks)
            k = rnd.choice((1, 2, 3))
            c[k] = rnd.choice((0, 1, c[k] + 1, c[k] - 1, len(src), 0xFFFFFFFF, c[k] * 2))
            c[k] = min(max(0, c[k]), 0xFFFFFFFF)           # u32 in the blob meta
    dstlen = uoff
    dst = bytearray(dstlen)
    cc = _native.ColdChunks(n, bytes(src), dst)
    for i, (alg, so, sl, ul, do, fo, idx) in enumerate(chunks):
        cc.set(i, _native.COLD_ALGS[alg], so, sl, ul, do, fo, idx)
    cc.decode()
    ok = disagree = 0
    decoded = {}
    for i, (alg, so, sl, ul, _do, _fo, _idx) in enumerate(chunks):
        raw = bytes(src[so:so + sl]) if so + sl <= len(src) else None
        why = ""
        try:
            # the reader decodes only sizes BlobMeta allows (chunks of at most 16 MiB);
            # beyond the buffers here no decode can succeed
            fits = 0 < ul <= max(len(dst), len(src))
            want = _decompress(alg, raw, ul, "fuzz") if raw is not None and fits else None
        except CorruptImageError as e:
            want, why = None, str(e)
        if cc.status(i) == _native.COLD_OK:
            got = bytes(cc.data(i))
            if want is None and "Data corruption detected" in why:
                # the reader's zstd (python-zstandard's own copy) and the system's
                # libzstd differ on some corrupt blocks; the digest check after the
                # decode decides, as for any chunk whose bytes decode
                disagree += 1
                continue
            assert want is not None, \
                f"cold: chunk {i} ({alg}) decoded, the reader refuses it: {why}"
            assert got == want, f"cold: chunk {i} ({alg}) decoded to other bytes"
            decoded[i] = got
            cc.mark_verified(i)
            ok += 1
    for i, got in list(decoded.items()):    # a later chunk's output may land on it
        if bytes(cc.data(i)) != got:
            del decoded[i]
            cc.arr[i].verified = 0
    path = os.path.join(tmp, "cache")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, uoff)
        bitmap = bytearray((n + 7) // 8)
        written, _newly, werr = cc.store(fd, uoff, bitmap, n)
        assert werr == 0 and written == len(decoded)
        for i, (_a, _so, _sl, ul, _do, fo, idx) in enumerate(chunks):
            has = bool(bitmap[idx >> 3] >> (idx & 7) & 1)
            assert has == (i in decoded), f"cold: chunk {i}'s bit is wrong"
            # a mutated size may make chunks overlap in the file (BlobMeta refuses
            # that before the cold path): those bytes are the later chunk's
            alone = all(j == i or fo + ul <= chunks[j][5] or chunks[j][5] + chunks[j][3] <= fo
                        for j in decoded)
            if has and alone:
                assert os.pread(fd, ul, fo) == decoded[i], f"cold: chunk {i} stored wrongly"
    finally:
        os.close(fd)
    return "cold:" + ("decoded" if ok else "none-decoded") + \
        (" (zstd versions disagree)" if disagree else "")


# ---- the daemon's walk of whole images ----

def _fuzz_reader():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fuzz_reader", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "fuzz_reader.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def walk_corpus(tmp: str) -> list:
    """(fuzz_reader module, [(name, image, fields)]): the newest shapes' seeds."""
    fz = _fuzz_reader()
    work = os.path.join(tmp, "walk")
    src = fz._small_tree(os.path.join(work, "tree"))
    seeds = fz._newer_ours(work, fz._late_tree(work, src))
    return [fz, [(s.name, s.image, [(o, n) for o, n, _l in fz.field_map(s)["image"]])
                 for s in seeds]]


def walk_case(corpus, rnd: random.Random) -> str:
    from erofs_tools.reader.image import Image

    fz, seeds = corpus
    if not seeds:
        raise AssertionError("walk: no seed image was built")
    name, image, fields = rnd.choice(seeds)
    buf = bytearray(image)
    for _ in range(rnd.randint(1, 3)):
        if rnd.random() < 0.1 and len(buf) > 4096:      # a block spliced over another
            n = rnd.choice((12, 64, 512, 4096))
            a, b = rnd.randrange(len(buf) - n), rnd.randrange(len(buf) - n)
            buf[b:b + n] = buf[a:a + n]
        else:
            _mutate_bytes(buf, rnd, fields)
    def one(fn):
        try:
            return fn().split(":")[1]
        except ErofsToolsError as e:
            if not str(e).isprintable():
                raise AssertionError(f"walk: multi-line error message: {e!s:.300}") from None
            return "refused"
    try:
        img = Image(bytes(buf))
    except ErofsToolsError as e:
        if not str(e).isprintable():
            raise AssertionError(f"walk: multi-line error message: {e!s:.300}") from None
        return "walk:open-refused"
    try:
        runs = one(lambda: fz._check_runs(img))
        pins = one(lambda: fz._check_pins(img))
    finally:
        img.close()
    return f"walk:{runs}" + (f", pins {pins}" if pins != "none" else "")


def run(cases: int, seed: str = "0", targets=("fanhold", "ci", "cold", "walk"),
        timeout: float = 10.0,
        only: int | None = None, verbose: bool = False) -> dict:
    """The cases; the process's SIGALRM handler and the daemon's log level are put back
    after them (the suite runs this in-process, beside tests that read those logs)."""
    daemon_log = logging.getLogger("fscache_daemon")
    level = daemon_log.level
    handler = signal.signal(signal.SIGALRM, _alarm)
    daemon_log.setLevel(logging.ERROR)   # the parser's warnings
    try:
        return _run(cases, seed, targets, timeout, only, verbose)
    finally:
        daemon_log.setLevel(level)
        signal.signal(signal.SIGALRM, handler)


def _run(cases: int, seed: str, targets, timeout: float, only: int | None,
         verbose: bool) -> dict:
    outcomes: dict[str, int] = {}
    failures = []
    per_target: dict[str, int] = {}
    t0 = time.monotonic()
    slowest = 0.0
    with tempfile.TemporaryDirectory(prefix="fuzz-native-") as tmp:
        st = _FanState(tmp)
        corpus = None
        try:
            for case in ([only] if only is not None else range(cases)):
                rnd = random.Random(f"{seed}-{case}")
                target = rnd.choice(targets)
                per_target[target] = per_target.get(target, 0) + 1
                if verbose:
                    print(f"case {case} {target}", file=sys.stderr, flush=True)
                if target == "walk" and corpus is None:
                    corpus = walk_corpus(tmp)       # (built once, outside the alarm)
                c0 = time.monotonic()
                try:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                    got = fanhold_case(st, rnd) if target == "fanhold" else \
                        ci_case(rnd) if target == "ci" else \
                        walk_case(corpus, rnd) if target == "walk" else cold_case(rnd, tmp)
                    outcomes[got] = outcomes.get(got, 0) + 1
                except CaseTimeout:
                    failures.append({"case": case, "target": target,
                                     "error": f"timeout after {timeout}s"})
                except ErofsToolsError as e:
                    if "\n" in str(e):
                        failures.append({"case": case, "target": target,
                                         "error": f"multi-line error: {e!r}"})
                    outcomes[f"{target}:error"] = outcomes.get(f"{target}:error", 0) + 1
                except BaseException as e:  # noqa: BLE001 - everything else is a finding
                    failures.append({"case": case, "target": target,
                                     "error": f"{type(e).__name__}: {e}"[:500],
                                     "traceback": traceback.format_exc()[-3000:]})
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                slowest = max(slowest, time.monotonic() - c0)
        finally:
            os.close(st.rd)
            os.close(st.wr)
    el = time.monotonic() - t0
    n = 1 if only is not None else cases
    return {"cases": n, "failures": failures, "elapsed_s": round(el, 1),
            "cases_per_s": round(n / el, 1) if el else None, "per_target": per_target,
            "outcomes": outcomes, "slowest_case_s": round(slowest, 4), "seed": seed}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--targets", default="fanhold,ci,cold,walk")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--only", type=int, help="run just this case number")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.cases, args.seed, tuple(args.targets.split(",")), args.timeout,
              args.only, args.verbose)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            if k != "failures":
                print(f"{k}: {v}")
        for f in res["failures"][:50]:
            print(f"FAIL case {f['case']} [{f['target']}]: {f['error']}")
            if f.get("traceback"):
                print(f["traceback"])
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
