"""mkfs --tar=headerball (mkfs.erofs 1.9): the input is a tar stream of headers only, its
regular files' data left out, and each regular file becomes a hole of its size (reads
as zeros) in a full image (no tar device). The oracle: mkfs.erofs 1.9.4's image of the
same stream mounts with the host kernel to the same tree, content included (zeros), as
ours does; both match the source tree in everything but content; fsck.erofs 1.9.4
passes. The mode was refused before ("'headerball' is not one of 'f', 'i'"), so each of
these failed on the code before it."""
import os
import subprocess
import tarfile

import pytest
from helpers import assert_same_tree, fsck, mounted, run_mkfs, text

BIG = 6 << 30          # a file over 4 GiB costs a headerball nothing


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """A source tree, its tar (GNU tar, PAX), and the headerball of that tar."""
    base = tmp_path_factory.mktemp("hball")
    root = base / "src"
    (root / "d" / ("long-" * 40)).mkdir(parents=True)
    for i in range(12):
        (root / "d" / f"f{i}").write_bytes(text(1 + 1500 * i, i))
    (root / "d" / ("long-" * 40) / "inner").write_bytes(b"x" * 5000)
    (root / "empty").write_bytes(b"")
    os.link(root / "d" / "f3", root / "hard")
    os.symlink("d/f3", root / "sym")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chr", 0o20644, os.makedev(1, 7))
    os.setxattr(root / "d" / "f1", "user.k", b"value")
    os.chmod(root / "d" / "f2", 0o4751)
    os.chown(root / "d" / "f4", 1234, 5678)
    tar = base / "layer.tar"
    subprocess.run(["tar", "--format=pax", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-cf", tar, "-C", root, "."], check=True)
    st = os.stat(root)
    with open(root / "big", "wb") as f:       # (in the source; in the ball by hand)
        f.truncate(BIG)
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(root / "big", 0o644)
    os.utime(root / "big", (1_700_000_000, 1_700_000_000))
    ball = base / "layer.hb"
    with tarfile.open(tar) as t, open(ball, "wb") as out:
        for m in t.getmembers():
            out.write(m.tobuf(format=tarfile.PAX_FORMAT))
        big = tarfile.TarInfo("./big")
        big.size, big.mode, big.mtime = BIG, 0o644, 1_700_000_000
        out.write(big.tobuf(format=tarfile.PAX_FORMAT))
        out.write(bytes(1024))
    return root, tar, ball


def test_same_tree_as_mkfs_erofs(layer, tmp_path):
    root, _, ball = layer
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    # (build time 0: mkfs.erofs 1.9.4 drops the nanoseconds of an mtime in the second
    # it builds in, which a tree made just before would hit)
    times = ("-T", "0", "--mkfs-time")
    run_mkfs(ours, ball, "-q", "-U", "clear", *times, "--tar=headerball")
    subprocess.run(["mkfs.erofs", "--quiet", "-U", "clear", *times, "--tar=headerball",
                    os.fspath(ref), os.fspath(ball)], check=True, capture_output=True)
    fsck(ours)
    fsck(ref, extract=False)         # (its extraction would write 6 GiB of zeros)
    assert os.path.getsize(ours) <= os.path.getsize(ref) + 4096
    with mounted(ours) as a, mounted(ref) as b:
        # the same tree; every file's content zeros in both (the big one's end read)
        assert_same_tree(b, a, content=False)
        for top, _, names in os.walk(a):
            for name in names:
                p = os.path.join(top, name)
                if name != "big" and os.path.isfile(p) and not os.path.islink(p):
                    q = os.path.join(b, os.path.relpath(p, a))
                    with open(p, "rb") as f, open(q, "rb") as g:
                        data = f.read()
                        assert data == g.read() == bytes(len(data)), p
        assert os.path.getsize(os.path.join(a, "big")) == BIG
        with open(os.path.join(a, "big"), "rb") as f:
            f.seek(BIG - 5000)
            assert f.read() == bytes(5000)
        # and the source's tree in all but content
        assert_same_tree(root, a, content=False, ignore=("sha256",), whiteout_marks=True)
        with open(os.path.join(a, "d", "f5"), "rb") as f:
            assert f.read() == bytes(1 + 1500 * 5)


def test_a_tar_with_data_is_refused(layer, tmp_path):
    """A whole tar given as a headerball: its data read as headers, one error line."""
    _, tar, _ = layer
    image = tmp_path / "x.img"
    p = run_mkfs(image, tar, "--tar=headerball", check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert not image.exists()
