"""An image file truncated or rewritten while a reader tool has it mapped
(docs/reliability.md; reader/mapped.py, csrc/imageguard.c).

Before the fix a truncation killed the tool with SIGBUS (exit 135, here -7 from
subprocess), `unpack -o` leaving its `.NAME.unpack-*` tree behind; a rewrite in place
was written out as it was read. Every case runs the tool in a child process (a SIGBUS
fails the test instead of killing pytest); the change is real: the file is truncated
or rewritten by the child at a chosen moment (its Nth inode lookup), no fault is
simulated."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest
from test_tar_helpers import run_cli

from erofs_tools.reader.image import Image

PAGE = os.sysconf("SC_PAGESIZE")

# the tool with a hook: at the Nth Image.inode call, the file at PATH is truncated to
# ARG bytes ("truncate"), or 4 KiB at offset ARG are overwritten in place ("rewrite"; with
# "rewrite-keep" the writer then sets the file's times back to what they were)
HOOK = textwrap.dedent("""
    import os, sys, time
    from erofs_tools.reader import image as _image
    path, at, mode, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    _orig, _calls = _image.Image.inode, [0]

    def _inode(self, nid):
        _calls[0] += 1
        if _calls[0] == at:
            if mode == "truncate":
                os.truncate(path, arg)
            else:
                time.sleep(0.05)        # a slow reader: the mtime moves on any kernel
                st = os.stat(path)
                with open(path, "r+b") as f:
                    f.seek(arg)
                    f.write(bytes(range(256)) * 16)
                if mode == "rewrite-keep":
                    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
        return _orig(self, nid)

    _image.Image.inode = _inode
    sys.argv = ["erofs-tools"] + sys.argv[5:]
    from erofs_tools.cli import main
    main()
""")


def _tool(path, at, mode, arg, *args, cwd=None):
    return subprocess.run([sys.executable, "-c", HOOK, str(path), str(at), mode, str(arg),
                           *map(str, args)], capture_output=True, timeout=120, cwd=cwd)


def _one_error(r, what=b"the image file changed while it was read"):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr[-2000:]
    assert what in r.stderr, r.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("changed")
    src = d / "src"
    for i in range(12):
        sub = src / f"d{i:02}"
        sub.mkdir(parents=True)
        for j in range(25):
            (sub / f"f{j:02}").write_bytes(os.urandom(1000 + 997 * j))
    (src / "big").write_bytes(os.urandom(3 << 20))
    os.symlink("big", src / "lnk")
    run_cli("mkfs", d / "plain.img", src)
    run_cli("pack", "-q", "-B", d / "one.boot", "-D", d / "blobs", src)
    (src / "extra").write_bytes(b"x" * 5000)
    run_cli("pack", "-q", "-B", d / "two.boot", "-D", d / "blobs", src)
    return d


@pytest.fixture
def work(images, tmp_path):
    """A fresh copy of each image in a directory of its own (what is left there after a
    failed command is checked)."""
    for name in ("plain.img", "one.boot", "two.boot"):
        (tmp_path / name).write_bytes((images / name).read_bytes())
    return tmp_path


def _left(work):
    return sorted(set(os.listdir(work)) - {"plain.img", "one.boot", "two.boot"})


def test_image_api_truncated_after_open(images, tmp_path):
    """Image opened, the file truncated to two pages, then metadata and data read: an
    ImageChangedError from every read, never a signal, never zeros as data."""
    img = tmp_path / "t.img"
    img.write_bytes((images / "plain.img").read_bytes())
    code = textwrap.dedent(f"""
        import os
        from erofs_tools.errors import CorruptImageError
        from erofs_tools.reader.image import Image
        img = Image({str(img)!r})
        size = img.size
        os.truncate({str(img)!r}, {2 * PAGE})
        got = []
        for step in ("read", "walk", "data"):
            try:
                if step == "read":
                    img.read(size - 100, 100)
                elif step == "walk":
                    for _p, _d, ino in img.walk():
                        img.xattrs(ino)
                else:
                    big = img.inode(img.lookup("/big").nid)
                    for _o, data, n in img.iter_data(big):
                        assert data is None or len(data) == n
            except CorruptImageError as e:
                got.append(type(e).__name__ + " " + str(e))
        print(len(got), got[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith(b"3 ImageChangedError ") and \
        f"the image file changed while it was read (now {2 * PAGE} bytes)".encode() in r.stdout


@pytest.mark.parametrize("how", ["dir", "tar", "tar-stdout"])
def test_unpack_truncated_while_read(work, how):
    args = {"dir": ("-o", work / "out"), "tar": ("--tar", work / "out.tar"),
            "tar-stdout": ("--tar", "-")}[how]
    r = _tool(work / "plain.img", 60, "truncate", 2 * PAGE, "unpack", work / "plain.img",
              *args)
    _one_error(r)
    assert _left(work) == []            # no output, no .out.unpack-* tree, no temp file
    if how == "tar-stdout":             # cut short: no end blocks after the members
        assert len(r.stdout) % 512 == 0 and r.stdout[-1024:] != bytes(1024)


def test_unpack_truncated_inside_a_page(work):
    """A shrink to a size inside a page faults nothing (the page's tail reads as
    zeros): the size check before the commit fails the command."""
    size = (work / "plain.img").stat().st_size
    for args in (("-o", work / "out"), ("--tar", work / "out.tar")):
        r = _tool(work / "plain.img", 2, "truncate", size - 100, "unpack",
                  work / "plain.img", *args)
        _one_error(r)
        assert _left(work) == []


@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
def test_tar_stream_changed_half_way(images, work, mode):
    """`unpack --tar -` cannot take bytes back: what went out before the error is the
    source's exact bytes, cut short before the end blocks. The change faults nothing
    for the file it hits (/d06/f24, 1.6 MiB of output after it): the new end 1000 bytes
    before the end of its blocks (their tail reads as zeros), or its first 4 KiB
    overwritten in place (without the check per MiB, the stream held those bytes)."""
    img = Image(work / "plain.img")
    (_o, n, _dev, phys), = [x for x in img.map_data(img.lookup("/d06/f24")) if x[0] == 0]
    img.close()
    arg = phys + n - 1000 if mode == "truncate" else phys
    r = _tool(work / "plain.img", 100, mode, arg, "unpack", work / "plain.img", "--tar", "-")
    _one_error(r)
    assert len(r.stdout) > 1 << 20     # members went out before the change
    complete = 0
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r|") as tf:
        with pytest.raises(tarfile.ReadError):      # cut short: no end blocks
            for m in tf:
                if m.isfile():
                    f = tf.extractfile(m)
                    assert f is not None
                    data = f.read()
                    if len(data) == m.size:
                        assert data == (images / "src" / m.name).read_bytes(), m.name
                        complete += 1
    assert complete > 50


def test_unpack_rewritten_in_place(work):
    """Same size, other bytes (the big file's data overwritten) while unpacked: the
    mtime moved, so nothing is committed."""
    size = (work / "plain.img").stat().st_size
    for args in (("-o", work / "out"), ("--tar", work / "out.tar")):
        r = _tool(work / "plain.img", 2, "rewrite", size - (1 << 20), "unpack",
                  work / "plain.img", *args)
        _one_error(r)
        assert _left(work) == []


def test_unpack_rewritten_keeping_mtime(work):
    """The same rewrite by a writer that sets the mtime back (os.utime): the size and
    mtime are as they were, but the ctime moved (no user can set it), so nothing is
    committed. Before the ctime was compared, both outputs were written with the
    rewritten bytes and the command exited 0."""
    size = (work / "plain.img").stat().st_size
    for args in (("-o", work / "out"), ("--tar", work / "out.tar")):
        r = _tool(work / "plain.img", 2, "rewrite-keep", size - (1 << 20), "unpack",
                  work / "plain.img", *args)
        _one_error(r)
        assert _left(work) == []


@pytest.mark.parametrize("cmd", ["check", "inspect", "stat"])
def test_read_commands_truncated_while_read(work, cmd):
    extra = ("--json",) if cmd == "stat" else ()
    r = _tool(work / "plain.img", 60, "truncate", 2 * PAGE, cmd, work / "plain.img", *extra)
    _one_error(r)
    if cmd in ("check", "stat"):        # no verdict, no figures of what was not read
        assert r.stdout == b""
    r = _tool(work / "one.boot", 60, "truncate", 2 * PAGE, cmd, work / "one.boot", *extra)
    _one_error(r)


def test_merge_truncated_while_read(work):
    out = work / "merged.boot"
    r = _tool(work / "two.boot", 400, "truncate", 2 * PAGE, "merge", work / "one.boot",
              work / "two.boot", "-B", out)
    _one_error(r)
    assert _left(work) == []


def test_merge_rewritten_in_place(work):
    """A rewrite of the lower layer's file (same size; its first inode block
    overwritten) after it was read: nothing written."""
    out = work / "merged.boot"
    r = _tool(work / "one.boot", 600, "rewrite", 2 * PAGE, "merge", work / "one.boot",
              work / "two.boot", "-B", out)
    _one_error(r)
    assert _left(work) == []


@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
def test_optimize_changed_while_read(images, work, mode):
    """`optimize`: the source bootstrap truncated, or its inode blocks rewritten, while
    it is copied: no output bootstrap, no prefetch blob left in the blob directory."""
    img = Image(work / "one.boot")
    _fo, _n, dev, phys = next(iter(img.map_data(img.lookup("/big"))))
    blob_id = img.blob_id(dev)
    img.close()
    chunk = {"blob": 0, "uncompressed_offset": phys, "file_offset": 0, "first_access": 0.01}
    trace = {"version": 1, "image": {"blobs": [blob_id]},
             "entries": [{"path": "/big", "inode": 0, "first_access": 0.01,
                          "chunks": [chunk]}]}
    (work / "trace.json").write_text(json.dumps(trace))
    blobs = sorted(os.listdir(images / "blobs"))
    arg = 2 * PAGE
    r = _tool(work / "one.boot", 250, mode, arg, "optimize", work / "one.boot",
              work / "opt.boot", "--trace", work / "trace.json", "-D", images / "blobs")
    _one_error(r)
    assert _left(work) == ["trace.json"]
    assert sorted(os.listdir(images / "blobs")) == blobs


def test_unchanged_image_reads_as_before(images, work):
    """The guard changes nothing while the file stays: the same hooked run, no change."""
    r = _tool(work / "plain.img", 10**9, "truncate", 0, "unpack", work / "plain.img",
              "--tar", work / "out.tar")
    assert r.returncode == 0, r.stderr
    with tarfile.open(work / "out.tar") as tf:
        assert len(tf.getnames()) == 1 + 12 * 26 + 2
        f = tf.extractfile("big")
        assert f is not None and f.read() == (images / "src" / "big").read_bytes()


def _foreign_fault(pre="", post=""):
    """A child that opens an Image (the guard installed), then faults on a mapping of
    another file that shrank: that SIGBUS is not the reader's to answer."""
    return textwrap.dedent(f"""
        import mmap, os, sys, tempfile
        {pre}
        from erofs_tools.reader.image import Image
        img = Image(sys.argv[1])
        {post}
        fd, p = tempfile.mkstemp(dir=os.path.dirname(sys.argv[1]))
        os.write(fd, bytes(4 * {PAGE}))
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        os.ftruncate(fd, 0)
        print("survived", m[3 * {PAGE}], flush=True)
    """)


@pytest.mark.parametrize("variant", ["plain", "faulthandler-first", "faulthandler-later"])
def test_other_sigbus_still_kills(work, variant):
    """Any other SIGBUS takes the action it had before: the default (death by SIGBUS),
    or faulthandler's traceback and then death; never a loop, never zeros."""
    pre, post = {"plain": ("", ""),
                 "faulthandler-first": ("import faulthandler; faulthandler.enable()", ""),
                 "faulthandler-later": ("", "import faulthandler; faulthandler.enable(); "
                                            "Image(sys.argv[1])")}[variant]
    r = subprocess.run([sys.executable, "-c", _foreign_fault(pre, post), work / "plain.img"],
                       capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])
    assert b"survived" not in r.stdout
    if variant != "plain":
        assert b"Bus error" in r.stderr


def test_guard_on_top_after_faulthandler(work):
    """faulthandler enabled after the first image: the next image puts the guard back
    on top, and a shrink of that image is an error, not faulthandler's death."""
    code = textwrap.dedent(f"""
        import faulthandler, os, sys
        from erofs_tools.errors import CorruptImageError
        from erofs_tools.reader.image import Image
        Image(sys.argv[2])
        faulthandler.enable()
        img = Image(sys.argv[1])
        os.truncate(sys.argv[1], {2 * PAGE})
        try:
            img.read(img.size - 10, 10)
        except CorruptImageError as e:
            print("ok", e)
    """)
    r = subprocess.run([sys.executable, "-c", code, work / "plain.img", work / "one.boot"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"ok "), (r.returncode, r.stderr[-2000:])
    assert b"changed while it was read" in r.stdout


def test_no_guard_slot_left(work):
    """All 1024 guard slots taken: an image is read into memory instead of mapped (no
    SIGBUS possible), and a truncation is still caught by the check before a commit."""
    code = textwrap.dedent("""
        import mmap, os, sys
        from erofs_tools._native_guard import MapGuard
        from erofs_tools.errors import ImageChangedError
        from erofs_tools.reader.image import Image
        keep = []
        while True:
            m = mmap.mmap(-1, 4096)
            try:
                keep.append((m, MapGuard(m)))
            except OSError:
                break
        img = Image(sys.argv[1])
        assert type(img.data) is bytes and len(keep) == 1024, (type(img.data), len(keep))
        os.truncate(sys.argv[1], 8192)
        n = sum(1 for _ in img.walk())
        try:
            img.check_unchanged()
        except ImageChangedError as e:
            print("ok", n, e)
        for m, g in keep:
            m.close()
            g.release()
        img2 = Image(sys.argv[2])
        assert type(img2.data) is not bytes
    """)
    r = subprocess.run([sys.executable, "-c", code, work / "plain.img", work / "one.boot"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"ok 315 "), (r.stdout, r.stderr[-2000:])


def test_failed_open_leaves_no_descriptor(tmp_path):
    """The guard's own descriptor (for the size checks) goes with an Image whose parse
    failed and that nobody closes: 200 bad opens, no descriptor more."""
    import gc

    from erofs_tools.errors import CorruptImageError
    bad = tmp_path / "bad.img"
    bad.write_bytes(os.urandom(2 * PAGE))
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        with pytest.raises(CorruptImageError):
            Image(bad)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_chunk_pins_of_a_truncated_bootstrap(work):
    """The chunk-info rows (`erofs-tools mount`'s and the daemon's pins) read after the
    bootstrap shrank: an ImageChangedError, no pins made of zeros."""
    code = textwrap.dedent(f"""
        import os, sys
        from erofs_tools.errors import CorruptImageError
        from erofs_tools.reader.bootstrap import chunk_pins
        from erofs_tools.reader.image import Image
        img = Image(sys.argv[1])
        assert img._chunk_table[0] >= {2 * PAGE}, img._chunk_table
        os.truncate(sys.argv[1], {2 * PAGE})
        try:
            chunk_pins(img)
        except CorruptImageError as e:
            print(type(e).__name__, e)
    """)
    r = subprocess.run([sys.executable, "-c", code, work / "one.boot"], capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"ImageChangedError "), \
        (r.returncode, r.stdout, r.stderr[-2000:])
