"""Shared test helpers: CI-aware requirements, read-only kernel mounts of image files,
a full-metadata tree comparison, fsck.erofs and mkfs wrappers.

    require(cond, reason)          skip normally, FAIL when EROFS_TOOLS_CI=1
    require_root_kernel()          root + EROFS file-backed mounts
    with mounted(image) as mnt:    mount(2) -t erofs -o ro (file-backed), umount after
    diffs = compare_trees(src, mnt)   [] when identical (content, mode, uid/gid, mtime ns,
                                   xattrs, hardlink groups, rdev, symlink targets)
    fsck(image)                    fsck.erofs --extract (reads every file), must pass
    NYDUS_VECTORS                  tests/data/nydus: the Nydus-written test vectors
                                   (in the repository, with their licences)
"""
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

CI = os.environ.get("EROFS_TOOLS_CI") == "1"
DATA = pathlib.Path(__file__).resolve().parent / "data"
NYDUS_VECTORS = DATA / "nydus"
MS_RDONLY = 0x1
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def require(condition, reason):
    """Skip the test when `condition` is false, except under CI where it fails."""
    if condition:
        return
    if CI:
        pytest.fail(f"prerequisite missing under EROFS_TOOLS_CI=1: {reason}")
    pytest.skip(reason)


def is_root():
    return os.geteuid() == 0


def erofs_available():
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1] == "erofs" for line in f if line.strip()):
                return True
    except OSError:
        return False
    # module not loaded yet: try loading it
    subprocess.run(["modprobe", "erofs"], capture_output=True)
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "erofs" for line in f if line.strip())


def require_root_kernel():
    require(is_root(), "needs root (mount(2))")
    require(erofs_available(), "kernel without EROFS")


def require_tool(name):
    require(shutil.which(name) is not None, f"{name} not installed (apt-get install erofs-utils)")


def sys_mount(source, target, fstype="erofs", flags=MS_RDONLY, data=None):
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                   os.fsencode(data) if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source} on {target}: {os.strerror(e)}")


def sys_umount(target, lazy=False):
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


@contextlib.contextmanager
def mounted(image, options=None):
    """Mount IMAGE (a regular file, or a block device) read-only with the host kernel;
    yield the mount point; unmount and remove it afterwards."""
    require_root_kernel()
    mnt = tempfile.mkdtemp(prefix="erofs-mnt-")
    try:
        try:
            sys_mount(image, mnt, "erofs", MS_RDONLY, options)
        except OSError as e:
            if e.errno == errno.ENOTBLK:
                require(False, "kernel lacks file-backed EROFS mounts (6.12+)")
            raise
        try:
            yield mnt
        finally:
            try:
                sys_umount(mnt)
            except OSError:
                sys_umount(mnt, lazy=True)
    finally:
        os.rmdir(mnt)


def fsck(image, extract=True, devices=()):
    """Run fsck.erofs (with --extract: decode every file) and assert it passes."""
    require_tool("fsck.erofs")
    cmd = ["fsck.erofs"] + [f"--device={d}" for d in devices]
    if extract:
        cmd.append("--extract")
    cmd.append(os.fspath(image))
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, f"fsck.erofs failed ({p.returncode}): {p.stdout}{p.stderr}"
    return p.stdout + p.stderr


def run_mkfs(image, source, *args, check=True):
    """Run `erofs-tools mkfs` as a child process; -> CompletedProcess."""
    cmd = [sys.executable, "-m", "erofs_tools", "mkfs", os.fspath(image), os.fspath(source),
           *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if check:
        assert p.returncode == 0, f"mkfs failed: {p.stdout}{p.stderr}"
    return p


def assert_mkfs_refused(image, source, args, msg):
    """`erofs-tools mkfs IMAGE SOURCE ARGS` ends with the one line `error: MSG` on stderr,
    exit 1, and no image."""
    p = run_mkfs(image, source, *args, check=False)
    assert p.returncode == 1
    assert p.stderr == f"error: {msg}\n"
    assert not os.path.exists(image)


def assert_size_vs_anchor(ours, theirs, label, most=1.0):
    """Our image `ours` is at most `most` times the size of mkfs.erofs 1.9.4's `theirs`
    (the ratio printed after `label`)."""
    ratio = os.path.getsize(ours) / os.path.getsize(theirs)
    print(f"{label}: ours {os.path.getsize(ours)} / mkfs.erofs {os.path.getsize(theirs)} "
          f"= {ratio:.4f}")
    assert ratio <= most, ratio


def run_erofs_tools(*args, check=True):
    """Run `erofs-tools ARGS` as a child process (text output); -> CompletedProcess."""
    p = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                       capture_output=True, text=True, errors="replace", timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def run_pack(source, boot, blob_dir, *args, check=True):
    """Run `erofs-tools pack SOURCE -B BOOT -D BLOB_DIR -q` as a child process."""
    cmd = [sys.executable, "-m", "erofs_tools", "pack", os.fspath(source), "-B",
           os.fspath(boot), "-D", os.fspath(blob_dir), "-q", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if check:
        assert p.returncode == 0, f"pack failed: {p.stdout}{p.stderr}"
    return p


def write_native_image(nb, path):
    """Lay out a NativeBuilder's image and write it to `path`, which must be new."""
    nb.layout()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        nb.write(fd)
    finally:
        os.close(fd)


def assert_same_image_for_any_workers(tmp_path, source, *args, workers=(1, 2, 3)):
    """mkfs `source` with each worker count: the images must be byte-identical (the
    compression pool commits in order) and pass fsck.erofs; -> the last image's path."""
    images = []
    for n in workers:
        img = tmp_path / f"w{n}.img"
        run_mkfs(img, source, *args, "-T", "0", "-U", "clear", "--workers", n)
        images.append(img.read_bytes())
    assert all(i == images[0] for i in images), args
    fsck(img)
    return img


# ------------------------------------------------------------------ tree compare ----

def _digest(path, size):
    """sha256 of a file; holes are hashed without reading them when SEEK_DATA works."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        pos = 0
        zero = bytes(1 << 20)
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data_at = size
                else:
                    data_at = pos
            data_at = min(data_at, size)
            while pos < data_at:            # hole: zeros
                n = min(len(zero), data_at - pos)
                h.update(zero[:n])
                pos += n
            if pos >= size:
                break
            try:
                hole_at = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            except OSError:
                hole_at = size
            os.lseek(fd, pos, os.SEEK_SET)
            while pos < hole_at:
                buf = f.read(min(1 << 20, hole_at - pos))
                if not buf:
                    raise AssertionError(f"{path}: short read at {pos}")
                h.update(buf)
                pos += len(buf)
    return h.hexdigest()


def _xattrs(path):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            out[n] = f"<errno {e.errno}>"
    return out


def scan_tree(root, content=True, exclude=()):
    """Map relative path (bytes, b'' = root) -> dict of comparable properties."""
    root = os.fsencode(root)
    exclude = {os.fsencode(e) for e in exclude}
    entries = {}
    groups = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        kind = stat.S_IFMT(st.st_mode)
        rec = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattr": _xattrs(full),
        }
        if stat.S_ISREG(kind):
            rec["size"] = st.st_size
            if content:
                rec["sha256"] = _digest(full, st.st_size)
        elif stat.S_ISLNK(kind):
            rec["target"] = os.readlink(full)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if stat.S_ISDIR(kind):
            for name in os.listdir(full):
                child = os.path.join(rel, name) if rel else name
                if child not in exclude:
                    stack.append(child)
        else:
            groups.setdefault(st.st_ino, []).append(rel)
            rec["_ino"] = st.st_ino
            rec["_nlink"] = st.st_nlink
        entries[rel] = rec
    for members in groups.values():
        members.sort()
        for rel in members:
            entries[rel]["links"] = members
    return entries


def kernel_view(mnt):
    """scan_tree of a mounted image (or a source tree) with the inode numbers left out:
    two images of one tree number their inodes apart."""
    tree = scan_tree(mnt)
    for rec in tree.values():
        rec.pop("_ino", None)
    return tree


def file_digests(tree):
    """relative path -> b"sha256:" + digest of every non-empty regular file under
    `tree`: the value of mkfs --xattr-inode-digest's xattr."""
    return {rel: b"sha256:" + bytes.fromhex(rec["sha256"])
            for rel, rec in scan_tree(tree).items()
            if rec["type"] == 0o100000 and rec["size"]}


def anchor_mkfs(image, source, *args, need=None, epoch=0):
    """The anchor's mkfs.erofs -T EPOCH -U clear ARGS IMAGE SOURCE (quiet; epoch None:
    no -T, the files keep their mtimes); `need`: an option its --help must list (e.g.
    xattr-inode-digest: the 1.9 anchor)."""
    require_tool("mkfs.erofs")
    if need:
        p = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True,
                           errors="replace")
        require(need in p.stdout + p.stderr,
                f"mkfs.erofs without --{need} (needs the 1.9 anchor: "
                "export PATH=$(python3 benchmarks/anchor.py):$PATH)")
    when = () if epoch is None else ("-T", str(epoch))
    subprocess.run(["mkfs.erofs", "--quiet", *when, "-U", "clear", *map(str, args),
                    os.fspath(image), os.fspath(source)], check=True, capture_output=True)


def sha256s(view):
    """relative path -> sha256 (None: no regular file) of a scan_tree/kernel_view
    result: the content two trees must agree on."""
    return {k: v.get("sha256") for k, v in view.items()}


def record_sizes(img):
    """-> {extent record size (the 48-bit layout), or the layout name: compressed
    files} of IMG's non-empty compressed regular files, read by our reader."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import state
    seen = {}
    with open_image(img) as im:
        for _p, _d, ino in im.walk():
            if ino.is_reg() and ino.size and ino.layout in (E.LAYOUT_COMPRESSED_FULL,
                                                            E.LAYOUT_COMPRESSED_COMPACT):
                adv = getattr(state(im).zmap(ino), "advise", 0)
                key = E.extent_recsize(adv) if ino.layout == E.LAYOUT_COMPRESSED_FULL and \
                    adv & E.ADVISE_EXTENTS else ino.layout_name
                seen[key] = seen.get(key, 0) + 1
    return seen


def write_48bit_tree(root, fill="x", period=40, chr_name="dev"):
    """The 48-bit layout's test tree under ROOT: mtimes with and without nsec, one
    before 1970 and one after 2038 (a compact inode holds 32 bits from the epoch), a
    uid over 65535, hardlinks, a symlink, a FIFO, a character device CHR_NAME, xattrs,
    300 entries in /many (names padded with FILL, up to PERIOD - 1 of it: dirents over
    several blocks), tails inline and not, an empty file and directory."""
    root = pathlib.Path(root)
    (root / "d" / "e").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "many").mkdir()
    for i in range(300):
        (root / "many" / f"entry-{i:04d}-{fill * (i % period)}").write_bytes(b"%d\n" % i)
    for name, data in {"a": b"hello\n", "d/b": b"x" * 5000, "d/e/c": os.urandom(70000),
                       "zero": b"", "block": b"b" * 4096}.items():
        (root / name).write_bytes(data)
    os.utime(root / "a", ns=(0, 981173106_123456789))
    os.utime(root / "d" / "b", ns=(0, -315619200_000000000))          # 1960
    os.utime(root / "d" / "e" / "c", ns=(0, 5364662400_500000000))     # 2140
    os.chown(root / "d" / "b", 70000, 70001)
    os.link(root / "a", root / "d" / "a-link")
    os.symlink("a", root / "sym")
    os.mkfifo(root / "fifo")
    os.mknod(root / chr_name, 0o20644, os.makedev(1, 3))
    os.setxattr(root / "d", "user.k", b"v")
    os.setxattr(root / "a", "trusted.t", b"t" * 40)
    return root


def mkfs_both(tmp_path, tree, *args, need=None):
    """ours.img by `erofs-tools mkfs` and ref.img by the anchor's mkfs.erofs, both
    -T 0 -U clear ARGS of `tree`, in tmp_path -> (ours, ref)."""
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, tree, "-q", "-T", "0", "-U", "clear", *args)
    anchor_mkfs(ref, tree, *args, need=need)
    return ours, ref


def reader_unpack(img, out, **open_kw):
    """Our reader on `img`: `check` finds it clean and `unpack` writes it into `out`
    without a warning; -> the opened Image (open_kw: open_image's blob_dir, devices)."""
    from erofs_tools.reader.fsck import check_image
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.unpack import unpack_to_dir
    im = open_image(img, **open_kw)
    assert check_image(im) == []
    warnings = []
    unpack_to_dir(im, out, warnings)
    assert warnings == []
    return im


def mark_whiteout_dirs(entries):
    """What mkfs (as mkfs.erofs 1.9) adds to a source: trusted.overlay.origin="" on each
    directory holding an overlayfs whiteout (char 0:0), so that overlayfs never lists
    them; `entries` from scan_tree, changed in place."""
    for rel, rec in entries.items():
        if rec["type"] == stat.S_IFCHR and rec.get("rdev") == (0, 0):
            parent = entries[os.path.dirname(rel)]
            parent["xattr"] = {**parent["xattr"], "trusted.overlay.origin":
                               parent["xattr"].get("trusted.overlay.origin", b"")}
    return entries


def compare_trees(expected, actual, ignore=(), content=True, exclude=(), max_report=50,
                  check_nlink=False, whiteout_marks=False):
    """Compare two trees with full metadata; -> list of difference strings ([] = same).
    `ignore`: fields to skip (mode, uid, gid, mtime_ns, xattr, links, sha256, rdev...).
    check_nlink: also compare st_nlink of non-directories (only valid when the source
    tree has no hardlinks to files outside it). whiteout_marks: `actual` is (made from)
    an image of mkfs's, which marks the directories holding whiteouts."""
    a = scan_tree(expected, content, exclude)
    if whiteout_marks:
        mark_whiteout_dirs(a)
    b = scan_tree(actual, content)
    ignore = set(ignore) | {"_ino"}
    if not check_nlink:
        ignore.add("_nlink")
    diffs = []
    for rel in sorted(set(a) | set(b)):
        ea, eb = a.get(rel), b.get(rel)
        shown = os.fsdecode(rel) or "."
        if ea is None:
            diffs.append(f"{shown}: unexpected entry")
            continue
        if eb is None:
            diffs.append(f"{shown}: missing entry")
            continue
        for key in sorted(set(ea) | set(eb)):
            if key in ignore:
                continue
            if ea.get(key) != eb.get(key):
                va, vb = ea.get(key), eb.get(key)
                if key == "mode":
                    va, vb = oct(va) if va is not None else va, oct(vb) if vb is not None else vb
                diffs.append(f"{shown}: {key}: expected {va!r}, got {vb!r}")
        if len(diffs) >= max_report:
            break
    return diffs


def assert_same_tree(expected, actual, **kw):
    diffs = compare_trees(expected, actual, **kw)
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:50])


def mkfs_and_check(image, source, *args, ignore=(), content=True, exclude=(), do_fsck=True,
                   check_nlink=False, whiteout_marks=True):
    """erofs-tools mkfs SOURCE, fsck the image, mount it and compare with SOURCE."""
    run_mkfs(image, source, *args)
    if do_fsck:
        fsck(image)
    with mounted(image) as mnt:
        assert_same_tree(source, mnt, ignore=ignore, content=content, exclude=exclude,
                         check_nlink=check_nlink, whiteout_marks=whiteout_marks)
    return image


# ------------------------------------------------------------ waiting on facts ----

# how long a wait on an observable fact may take before it counts as a hang: bounds a
# hang only, never a speed (a 2-core machine at load 20 runs a test ~10x slower)
HANG = 120.0


def wait_until(predicate, timeout=HANG, what="the condition", interval=0.005):
    """Poll `predicate` until it returns a true value (returned); fail after `timeout` s.
    For waiting on an observable fact instead of sleeping a guessed time."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wchan(pid, tid=None):
    """The kernel function task `pid` (thread `tid`) sleeps in ('' if running or gone)."""
    path = f"/proc/{pid}/task/{tid}/wchan" if tid else f"/proc/{pid}/wchan"
    try:
        with open(path) as f:
            w = f.read().strip()
    except OSError:
        return ""
    return "" if w == "0" else w


def blocked_in_fanotify(pid, tid=None, within=2.0):
    """True while the task waits for a fanotify permission/pre-content answer. Sampled
    for up to `within` s: the kernel wakes every waiter of a group when any event of it
    is answered, and on a loaded machine a woken waiter reads as running ('') until it
    gets a CPU and sleeps again."""
    deadline = time.monotonic() + within
    while True:
        if wchan(pid, tid).startswith("fanotify"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def holder_status(sock):
    """The fanotify fd holder's status (its "pending" is the events no daemon answered)."""
    from fscache_daemon.frontend.fdholder import HolderChannel
    ch = HolderChannel(os.fspath(sock), timeout=10)
    try:
        return ch.status()
    finally:
        ch.close()


def wait_holder_pending(sock, at_least=1, timeout=30.0):
    """Wait until the fd holder keeps at least `at_least` unanswered events: a reader is
    then provably waiting for a daemon."""
    return wait_until(lambda: holder_status(sock)["pending"] >= at_least, timeout,
                      f"{at_least} pending event(s) in the fd holder at {sock}")


SHIFTED_TEXT = 600_000       # bytes of the text every file of the shifted tree repeats
SHIFTED_CUTS = 8


def shifted_cut_len(k):
    return 200_000 + 1777 * k


# copies of the text after the first (lang1-5, twice, the cuts)
SHIFTED_COPIES = 5 + 2 + sum(shifted_cut_len(k) for k in range(SHIFTED_CUTS)) / SHIFTED_TEXT


def write_shifted_tree(root):
    """Files sharing long runs at differing offsets into directory `root` (as the .mo
    files of one package in every language, or firmware shifted by a few bytes): a
    600 KB text behind a prefix of another length in each, one file holding it twice,
    copies cut short (their ends fall inside earlier pclusters' output: -E dedupe's
    partial references), and a small piece of it. Host and VM tests share it."""
    import random
    rnd = random.Random(23)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(400)]

    def put(name, data):
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    base = text(SHIFTED_TEXT, 1, words)
    for i in range(6):
        pre = text(137 * i + rnd.randint(1, 9000), 100 + i, words)
        put(f"lang{i}.mo", pre + base + text(3000 + i, 200 + i, words))
    put("twice", text(5000, 300, words) + base + random.Random(4).randbytes(777) + base)
    for k in range(SHIFTED_CUTS):
        put(f"z-cut{k}", text(999 + k, 301 + k, words) + base[:shifted_cut_len(k)])
    put("small", base[1000:4000])


# Vocabularies of compressible test text; the trees of the compression tests use one
# each (their files, and so their images' sizes, stay as the tests were written for).
TEXT_WORDS = (b"erofs", b"cluster", b"block", b"inode", b"kernel", b"mount", b"data",
              b"compress", b"the", b"of", b"and", b"\n")
TAIL_WORDS = TEXT_WORDS[:7] + (b"tail",) + TEXT_WORDS[8:]


def text(n, seed=0, words=TEXT_WORDS):
    """n bytes of compressible text (words from a small vocabulary)."""
    import random
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def vocab_text(n, seed, vocab):
    """n bytes of text from `vocab` random lowercase words of 2-9 letters, the words
    and their order both drawn from random.Random(seed)."""
    import random
    rnd = random.Random(seed)
    words = [bytes(rnd.randrange(97, 123) for _ in range(rnd.randint(2, 9)))
             for _ in range(vocab)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def noise(n, seed=1):
    """n incompressible bytes."""
    import random
    return random.Random(seed).randbytes(n)


def metadata_tree(root, *, more_files=None, dirs=(("many", 600),), links=()):
    """The metadata-zone and metabox tests' tree under `root` (created): files of many
    sizes (inline tails), empty ones, directories of many entries (`dirs`: name, count;
    their blocks in the image), xattrs inline and shared, hardlinks, symlinks (fast,
    long, and `links`: name, target), devices, a fifo, mixed owners and whole-second
    mtimes."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    files = {"t100k": text(100000, 1), "rnd": noise(20000, 2), "a/small": b"small\n",
             "a/b/t5000": text(5000, 3), "a/b/c/t4095": text(4095, 4), "empty": b"",
             "a/b/t4000": text(4000, 5), **(more_files or {})}
    for name, data in files.items():
        (root / name).write_bytes(data)
    for d, count in dirs:
        (root / d).mkdir()
        for i in range(count):
            (root / d / (f"{i:04d}-" + "entry-" * (i % 9))).write_bytes(text(i * 13 % 3000, i))
    os.link(root / "t100k", root / "a" / "hard")
    os.symlink("../t100k", root / "a" / "sym")
    os.symlink("x" * 3000, root / "a" / "longsym")
    for name, target in links:
        os.symlink(target, root / name)
    os.mkfifo(root / "a" / "fifo")
    os.mknod(root / "a" / "chr", 0o20644, os.makedev(1, 7))
    os.setxattr(root / "a", "user.dir", b"xattr on a directory")
    os.setxattr(root / "a" / "b", "trusted.big", b"v" * 300)
    for name in ("t100k", "rnd", "a/small", "empty"):
        os.setxattr(root / name, "user.shared", b"on several inodes: shared")
    os.chown(root / "rnd", 100000, 70000)
    os.chown(root / "a" / "small", 1000, 1000)
    for k, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(1_700_000_000_000_000_000 + k * 1_000_000_000,) * 2,
                 follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_000_000_000,) * 2)
    return root

def write_zmix_tree(root):
    """A small tree for the compressed layouts (the 48-bit layout's extent records among
    them): text files from 1 byte to 300 KB (one extent, many, inline tails, fragments),
    incompressible data (plain extents) alone and between text, a file repeated and one
    holding the same text twice (dedupe), an empty file, a subdirectory."""
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    files = {"one": b"x", "small": text(700, 1), "mid": text(5000, 2), "big": text(70_000, 3),
             "large": text(300_000, 4), "noise": noise(20_000, 5),
             "mixed": text(30_000, 6) + noise(9000, 7) + text(30_000, 8), "empty": b"",
             "sub/copy-of-big": text(70_000, 3), "sub/twice": text(40_000, 9) * 2,
             "sub/page": text(4096, 10)}
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
