"""The start set: the files a container's first instructions read, fetched at mount.

Before a container's program runs a line of its own, runc and the dynamic loader read a
chain of files one after another: /etc/passwd and /etc/group (runc resolves the user),
the command's executable, its ELF interpreter, /etc/ld.so.cache, then each library the
executable and those libraries need (DT_NEEDED). On a lazy mount each of them is a miss
that waits for the registry before the next one is even known: on the ML cold start
over the emulated link ~12 misses, 0.2-0.3 s, before Python's import began.

Every one of them is known from the image alone: the image config's Entrypoint + Cmd
and its PATH name the executable, its ELF headers name the interpreter and the
libraries, ld.so.cache (or the loader's default directories) where they are. So, as the
mount begins (a mount without a prefetch table: an optimized image's table already
lists them), the daemon fetches them side by side, in rounds: round 1 the fixed files,
the executable and the command's arguments that are files of the image (a script); each
next round the libraries the ELF files fetched in the round before need, until none is
new (at most MAX_ROUNDS). Between the mount and runc's first read the container is
still being created (~0.1-0.3 s), so most rounds end before the container asks.

Only hints come from these bytes: the ELF headers are read from chunks the daemon
fetched and verified itself (through the cache's writer fd, which raises no fanotify
event), a malformed header ends that file's part of the plan, and a wrong guess costs
bytes, never wrong data. The files fetched are ones the start reads whole anyway (the
readahead policy fetches the rest of a file read whole); a file over WHOLE_LIMIT gets
its first AROUND bytes (headers: a big executable or library faults in elsewhere).
`FSCACHE_DAEMON_START_SET=0` turns it off (to compare).
"""
from __future__ import annotations

import _thread
import json
import logging
import os
import posixpath
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable

from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.image import open_image
from fscache_daemon.prefetch import stream_table

log = logging.getLogger(__name__)

ENABLED = os.environ.get("FSCACHE_DAEMON_START_SET", "1") != "0"
# files every container start reads before its command (runc: the user and groups; the
# loader: its cache)
FIXED = ("/etc/passwd", "/etc/group", "/etc/ld.so.cache")
# files glibc reads as a program starts, where the image has them and they are small
# (under SMALL): the C.UTF-8 locale (a Python start coerces to it), iconv's module cache,
# the time zone
GLIBC = ("/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/lib/locale/C.UTF-8/LC_CTYPE",
         "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
         "/usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache",
         "/usr/lib64/gconv/gconv-modules.cache", "/etc/localtime")
SMALL = 1 << 20
# the loader's default directories, after ld.so.cache (multiarch first, as Debian's)
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ROUNDS = 4
MAX_FILES = 64
WHOLE_LIMIT = 16 << 20
AROUND = 1 << 20
MAX_SYMLINKS = 40
ELF_HEAD = 64 << 10       # program headers are read from the first bytes only
MAX_DYNAMIC = 64 << 10
MAX_STRINGS = 64 << 10    # a bigger string table: the names wanted read alone
MAX_NAME = 4096           # a DT_NEEDED or RUNPATH string read alone
MAX_LDCACHE = 4 << 20


def command(config: bytes) -> tuple[list[str], str]:
    """(argv, PATH) of an OCI image config (Entrypoint + Cmd; its Env's PATH)."""
    try:
        doc = json.loads(config)
    except ValueError:
        return [], DEFAULT_PATH
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        return [], DEFAULT_PATH
    argv: list[str] = []
    for k in ("Entrypoint", "Cmd"):
        v = cfg.get(k)
        if isinstance(v, list):
            argv += [a for a in v if isinstance(a, str)]
    path = DEFAULT_PATH
    env = cfg.get("Env")
    if isinstance(env, list):
        for e in env:
            if isinstance(e, str) and e.startswith("PATH="):
                path = e[5:]
    return argv, path


class Tree:
    """Paths of a bootstrap resolved as the container sees them (symlinks followed
    inside the image): path -> (resolved path, inode) of a regular file, or None."""

    def __init__(self, img) -> None:
        self.img = img
        # directory nid -> {name: nid}: each directory decoded once (the loader's
        # directories are looked up for every library)
        self._dirs: dict[int, dict[bytes, int]] = {}

    def _entries(self, ino) -> dict[bytes, int]:
        got = self._dirs.get(ino.nid)
        if got is None:
            got = self._dirs[ino.nid] = {d.name: d.nid for d in self.img.dirents(ino)}
        return got

    def _child(self, ino, name: bytes):
        if not ino.is_dir():
            return None
        nid = self._entries(ino).get(name)
        return None if nid is None else self.img.inode(nid)

    def resolve(self, path: str):
        got = self._walk(path)
        if got is None or not got[1].is_reg():
            return None
        return got

    def _walk(self, path: str):
        """(resolved path, inode) of whatever `path` names, symlinks followed."""
        parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
        done: list[bytes] = []
        ino = self.img.inode(self.img.root_nid)
        links = 0
        while parts:
            name = parts.pop(0)
            if name == b"..":
                if done:
                    done.pop()
                ino = self._at(done)
                continue
            child = self._child(ino, name)
            if child is None:
                return None
            if child.is_lnk():
                links += 1
                if links > MAX_SYMLINKS:
                    return None
                target = self.img.readlink(child)
                if target.startswith(b"/"):
                    done = []
                    ino = self.img.inode(self.img.root_nid)
                parts = [p for p in target.split(b"/") if p not in (b"", b".")] + parts
                continue
            done.append(name)
            ino = child
        return "/" + os.fsdecode(b"/".join(done)), ino

    def listdir(self, path: str) -> list[str]:
        """Names in directory `path` (symlinks followed); [] if it is none."""
        got = self._walk(path)
        if got is None or not got[1].is_dir():
            return []
        return [os.fsdecode(n) for n in self._entries(got[1]) if n not in (b".", b"..")]

    def _at(self, parts: list[bytes]):
        ino = self.img.inode(self.img.root_nid)
        for p in parts:
            ino = self._child(ino, p)
            if ino is None:
                return self.img.inode(self.img.root_nid)
        return ino


def find_executable(tree: Tree, name: str, path: str) -> str | None:
    if "/" in name:
        return name if tree.resolve(name) is not None else None
    for d in path.split(":"):
        if d.startswith("/") and tree.resolve(posixpath.join(d, name)) is not None:
            return posixpath.join(d, name)
    return None


PYTHON = re.compile(r"python(3)\.(\d+)$")
# modules a CPython 3.11+ start reads before the program's first line (the rest of its
# start is frozen into the executable): the encodings package and the UTF-8 codec
PYTHON_START = ("encodings/__pycache__/__init__.cpython-{tag}.pyc",
                "encodings/__pycache__/aliases.cpython-{tag}.pyc",
                "encodings/__pycache__/utf_8.cpython-{tag}.pyc",
                "__pycache__/sitecustomize.cpython-{tag}.pyc")


def python_start(tree: Tree, exe: str) -> list[str]:
    """The files CPython's start reads (PYTHON_START, then site's .pth files of each
    site directory) when `exe` is a CPython executable: its prefix from where it is."""
    m = PYTHON.search(posixpath.basename(exe))
    if m is None:
        return []
    ver, tag = f"{m[1]}.{m[2]}", f"{m[1]}{m[2]}"
    prefix = posixpath.dirname(posixpath.dirname(exe))     # /usr/bin/python3 -> /usr
    stdlib = f"{prefix}/lib/python{ver}"
    out = [f"{stdlib}/{f.format(tag=tag)}" for f in PYTHON_START]
    for d in (f"{stdlib}/site-packages", f"{prefix}/local/lib/python{ver}/dist-packages",
              f"{prefix}/lib/python3/dist-packages", f"{stdlib}/dist-packages"):
        out += [f"{d}/{n}" for n in sorted(tree.listdir(d)) if n.endswith(".pth")]
    return out


def pth_imports(pth: str, data: bytes | None, tag: str) -> list[str]:
    """The compiled modules the `import` lines of site's .pth file `pth` import first (a
    package's __init__ or a module, beside the .pth file)."""
    if not data or not tag:
        return []
    site = posixpath.dirname(pth)
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.startswith(("import ", "import\t")):
            continue
        # `import a; __import__('b').f()` (setuptools' distutils-precedence.pth)
        names = [line[6:].strip().split(";")[0].split(",")[0].strip().split(".")[0]]
        names += PTH_DUNDER_IMPORT.findall(line)
        for name in names:
            if name.isidentifier():
                out += [f"{site}/{name}/__pycache__/__init__.cpython-{tag}.pyc",
                        f"{site}/__pycache__/{name}.cpython-{tag}.pyc"]
    return out[:8]


PTH_DUNDER_IMPORT = re.compile(r"""__import__\(\s*['"]([A-Za-z_]\w*)""")


def elf_needs(read: Callable[[int, int], bytes | None]) -> tuple[str | None, list[str],
                                                                   list[str]] | None:
    """(interpreter, DT_NEEDED names, DT_RUNPATH/DT_RPATH dirs) of an ELF file whose bytes
    `read(offset, length)` gives (None where not cached); None: not ELF, or unreadable."""
    head = read(0, 64)
    if not head or len(head) < 52 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    end = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        ph, phsize = end + "IIQQQQQQ", 56
    elif head[4] == 1:
        phoff, = struct.unpack_from(end + "I", head, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        ph, phsize = end + "IIIIIIII", 32
    else:
        return None
    if phentsize < phsize or phnum > 512 or phoff + phnum * phentsize > ELF_HEAD:
        return None
    table = read(phoff, phnum * phentsize)
    if table is None:
        return None
    interp = None
    dyn = None
    loads: list[tuple[int, int, int]] = []     # (vaddr, offset, filesz)
    for i in range(phnum):
        f = struct.unpack_from(ph, table, i * phentsize)
        if head[4] == 2:
            ptype, off, vaddr, filesz = f[0], f[2], f[3], f[5]
        else:
            ptype, off, vaddr, filesz = f[0], f[1], f[2], f[4]
        if ptype == 3 and 0 < filesz <= 4096:
            s = read(off, filesz)
            if s:
                interp = s.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif ptype == 2:
            dyn = (off, min(filesz, MAX_DYNAMIC))
        elif ptype == 1:
            loads.append((vaddr, off, filesz))
    if dyn is None:
        return interp, [], []
    data = read(*dyn)
    if data is None:
        return interp, [], []
    fmt, size = (end + "qQ", 16) if head[4] == 2 else (end + "iI", 8)
    needed: list[int] = []
    paths: list[int] = []
    strtab = strsz = None
    for i in range(len(data) // size):
        tag, val = struct.unpack_from(fmt, data, i * size)
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag in (15, 29):
            paths.append(val)
        elif tag == 5:
            strtab = val
        elif tag == 10:
            strsz = val
    if strtab is None or not strsz:
        return interp, [], []
    soff = next((off + strtab - va for va, off, sz in loads if va <= strtab < va + sz), None)
    if soff is None:
        return interp, [], []
    if strsz <= MAX_STRINGS:
        strings = read(soff, strsz)
        if strings is None:
            return interp, [], []
    else:
        strings = None      # a big library's (C++ symbols): only the names wanted

    def name(v: int) -> str | None:
        if strings is None:
            got = read(soff + v, min(MAX_NAME, strsz - v)) if 0 <= v < strsz else None
            if got is None:
                return None
            return got.split(b"\0", 1)[0].decode("utf-8", "replace") or None
        if v >= len(strings):
            return None
        return strings[v:].split(b"\0", 1)[0].decode("utf-8", "replace") or None
    return (interp, [n for n in map(name, needed) if n],
            [d for v in paths if (rp := name(v)) for d in rp.split(":") if d])


def ld_cache(data: bytes) -> dict[str, str]:
    """soname -> path of a glibc ld.so.cache (the "glibc-ld.so.cache1.1" format, alone
    or after the old one); {} if it is neither."""
    magic = b"glibc-ld.so.cache1.1"
    at = data.find(magic)
    if at < 0 or len(data) < at + 48:
        return {}
    nlibs, = struct.unpack_from("<I", data, at + 20)
    base = at + 48
    out: dict[str, str] = {}

    def s(off: int) -> str:     # offsets count from the new format's header
        off += at
        return data[off:data.find(b"\0", off)].decode("utf-8", "replace")
    for i in range(min(nlibs, 1 << 16)):
        e = base + 24 * i
        if e + 24 > len(data):
            break
        _flags, key, value = struct.unpack_from("<iII", data, e)
        if at + key < len(data) and at + value < len(data):
            out.setdefault(s(key), s(value))
    return out


def find_library(tree: Tree, soname: str, runpath: Iterable[str], origin: str,
                 cache: dict[str, str]) -> str | None:
    if "/" in soname:
        return soname if tree.resolve(soname) else None
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in runpath]
    for d in dirs:
        if d.startswith("/") and tree.resolve(posixpath.join(d, soname)):
            return posixpath.join(d, soname)
    p = cache.get(soname)
    if p and tree.resolve(p):
        return p
    for d in LIB_DIRS:
        if tree.resolve(posixpath.join(d, soname)):
            return posixpath.join(d, soname)
    return None


Runs = list[tuple[int, int, int]]   # (blob index, uncompressed offset, length)


class Planner:
    """One start set's rounds over a bootstrap: `first()` the paths of round 1, and for
    each round's fetched ELF files the paths of the next (`after`)."""

    def __init__(self, bootstrap: str, nblobs: int) -> None:
        self.img = open_image(bootstrap)
        self.tree = Tree(self.img)
        self.nblobs = nblobs
        self.seen: set[str] = set()
        self.cache: dict[str, str] = {}
        self.tag = ""       # CPython's cache tag ("311") when the command is one

    def close(self) -> None:
        self.img.close()

    def runs(self, path: str) -> tuple[str, Runs, int] | None:
        """(resolved path, data runs, size) of a regular file not planned before."""
        got = self.tree.resolve(path)
        if got is None or got[0] in self.seen or len(self.seen) >= MAX_FILES:
            return None
        real, ino = got
        if (path in GLIBC or path.endswith(".pth")) and ino.size > SMALL:
            return None
        self.seen.add(real)
        runs = [(device - 1, phys, length)
                for _fo, length, device, phys in self.img.map_data(ino)
                if device is not None and 1 <= device <= self.nblobs]
        return real, runs, ino.size

    def fixed(self) -> list[str]:
        return list(FIXED) + list(GLIBC)

    def first(self, argv: list[str], path: str) -> list[str]:
        out: list[str] = []
        if argv:
            exe = find_executable(self.tree, argv[0], path)
            if exe:
                out.append(exe)
                got = self.tree.resolve(exe)
                real = got[0] if got else exe
                out += python_start(self.tree, real)
                m = PYTHON.search(posixpath.basename(real))
                self.tag = f"{m[1]}{m[2]}" if m else ""
            # a script the command names (python3 /app/run.py)
            out += [a for a in argv[1:] if a.startswith("/")]
        return out

    def after(self, real: str, read: Callable[[int, int], bytes | None],
              size: int = 0) -> list[str]:
        """The files the ELF file `real` (its bytes through `read`) needs next; of a
        site .pth file, the modules its `import` lines import."""
        if real == "/etc/ld.so.cache":
            return []
        if real.endswith(".pth"):
            return pth_imports(real, read(0, size) if 0 < size <= SMALL else None,
                               self.tag)
        got = elf_needs(read)
        if got is None:
            return []
        interp, needed, runpath = got
        out = [interp] if interp else []
        origin = posixpath.dirname(real)
        for n in needed:
            p = find_library(self.tree, n, runpath, origin, self.cache)
            if p:
                out.append(p)
        return out

    def learn_cache(self, read: Callable[[int, int], bytes | None], size: int) -> None:
        if 0 < size <= MAX_LDCACHE:
            data = read(0, size)
            if data:
                self.cache = ld_cache(data)


def file_reader(runs: Runs, size: int, pread: Callable[[int, int, int], bytes | None]
                ) -> Callable[[int, int], bytes | None]:
    """read(offset, length) of a file whose data `runs` are laid out one after another
    (file order), through `pread(blob index, offset, length)`; None past its end or where
    pread gives None (not cached)."""
    def read(off: int, length: int) -> bytes | None:
        if off < 0 or length <= 0 or off + length > size:
            return None
        out = bytearray()
        pos = 0
        for b, phys, n in runs:
            if off < pos + n and off + length > pos:
                lo = max(off, pos)
                hi = min(off + length, pos + n)
                got = pread(b, phys + lo - pos, hi - lo)
                if got is None or len(got) != hi - lo:
                    return None
                out += got
            pos += n
        return bytes(out) if len(out) == length else None
    return read


def plan_rounds(planner: Planner, command_of: Callable[[], tuple[list[str], str]],
                fetch: Callable[[Runs], None],
                pread: Callable[[int, int, int], bytes | None],
                times: list[float] | None = None) -> list[str]:
    """Run the rounds: fetch(runs) fetches (and waits for) one round's data runs; ->
    the files fetched, in order. The fixed files are fetched on a thread of their own
    while `command_of()` (the image config's command: a registry request) is awaited;
    `times` gets the seconds at which each round ended."""
    t0 = time.monotonic()
    fixed = _round(planner, planner.fixed())
    done = threading.Event()

    def fetch_fixed() -> None:
        try:
            fetch([r for _, runs, _ in fixed for r in runs])
        except Exception as e:  # noqa: BLE001 - best effort: readers fetch on demand
            log.warning("start set: fixed files not fetched: %s", e)
        finally:
            done.set()
    if fixed:
        _thread.start_new_thread(fetch_fixed, ())
    else:
        done.set()
    argv, path = command_of()
    todo = planner.first(argv, path)
    fetched: list[str] = []
    waiting = fixed
    for _ in range(MAX_ROUNDS):
        round_files = _round(planner, todo)
        if round_files:
            fetch([r for _, runs, _ in round_files for r in runs])
        if waiting:
            done.wait()
            round_files = waiting + round_files
            waiting = []
        if not round_files:
            break
        if times is not None:
            times.append(round(time.monotonic() - t0, 3))
        todo = []
        for real, runs, size in round_files:
            fetched.append(real)
            if real == "/etc/ld.so.cache":
                planner.learn_cache(file_reader(runs, size, pread), size)
        for real, runs, size in round_files:
            try:
                todo += planner.after(real, file_reader(runs, size, pread), size)
            except (struct.error, ErofsToolsError, ValueError) as e:
                log.debug("start set: %s: %s", real, e)
    done.wait()
    return fetched


def _round(planner: Planner, paths: list[str]) -> list[tuple[str, Runs, int]]:
    """(resolved path, runs to fetch, readable size) of the files of one round."""
    out = []
    for p in paths:
        got = planner.runs(p)
        if got is None:
            continue
        real, runs, size = got
        if size > WHOLE_LIMIT:
            runs = _head(runs, AROUND)
        out.append((real, runs, min(size, sum(r[2] for r in runs))))
    return out


def _head(runs: Runs, n: int) -> Runs:
    out: Runs = []
    for b, phys, length in runs:
        if n <= 0:
            break
        out.append((b, phys, min(length, n)))
        n -= length
    return out


def run(owner, img, mgrs, stop) -> None:
    """The start set of mount `img` (lifecycle: its blobs `mgrs` just opened), fetched
    through `owner`'s pool (prefetch.stream_table: readahead priority, after every
    reader's request; chunks in flight or cached are not asked again). Best effort."""
    t0 = time.monotonic()
    get_config = getattr(mgrs[0].backend, "image_config", None) if mgrs else None
    if get_config is None:
        return
    argv: list[str] = []

    def command_of() -> tuple[list[str], str]:
        try:
            config = get_config()
        except ErofsToolsError as e:
            log.info("%s: start set without a command: image config: %s",
                     img.mountpoint, e)
            config = None
        got = command(config) if config else ([], DEFAULT_PATH)
        argv[:] = got[0]
        return got
    keys = list(img.blob_keys)
    fetched_bytes = 0

    lock = threading.Lock()

    def fetch(jobs: Runs) -> None:
        nonlocal fetched_bytes
        n = stream_table(owner.pool, owner.blobs,
                                      [(keys[b], off, n) for b, off, n in jobs
                                       if 0 <= b < len(keys)], stop)
        with lock:      # the fixed files' round runs on a thread of its own
            fetched_bytes += n

    def pread(b: int, off: int, n: int) -> bytes | None:
        m = owner.blobs.get(keys[b]) if 0 <= b < len(keys) else None
        if m is None or not m.is_cached(off, n):
            return None
        try:
            return m.cache.pread(n, off)
        except (OSError, ErofsToolsError):  # released meanwhile: nothing more to plan
            return None

    planner = Planner(img.bootstrap, len(keys))
    times: list[float] = []
    try:
        files = plan_rounds(planner, command_of, fetch, pread, times)
    finally:
        planner.close()
    log.info("%s: start set of %s: %d files, %d bytes fetched in %.3f s (rounds ended "
             "at %s s): %s", img.mountpoint, argv[:1], len(files), fetched_bytes,
             time.monotonic() - t0, times, " ".join(files))
