"""`erofs-tools mkfs -z` images mount on the VM test kernels (6.12 and 6.1), not only on
the host's 6.18: every decompressor the guest kernel has (6.1: lz4 and lzma; 6.12:
deflate and zstd too), big pclusters (-C), ztailpacking (5.16+), fragments and dedupe
(6.1+) and full indexes (legacy-compress), each image built in the guest from a varied
tree and compared with it through the guest kernel's mount (full metadata, nlink).

What each kernel series has is written down here (SUPPORTED), not read from the kernel:
a guest whose config lost a decompressor fails test_kernel_config_matches, and an image
whose algorithm the kernel lacks must be refused at mount (checked, not skipped), so
the table is tested in both directions.

Runs inside the guest (vm-tests/run); skipped elsewhere.
"""
import gzip
import os
import re
import shutil
import subprocess
import sys

import pytest
from vmguest import GUEST_ONLY, IN_GUEST, kernel_log, mounted_equal, scratch_dir, text

pytestmark = GUEST_ONLY

if IN_GUEST:
    from helpers import noise, write_shifted_tree  # noqa: E402

    from erofs_tools.errors import MountError  # noqa: E402
    from erofs_tools.mount import mount_erofs  # noqa: E402

# Decompressors (and the config option that builds each) per kernel series of the VM
# suite. lz4 is always there with CONFIG_EROFS_FS_ZIP; deflate came in 6.6, zstd in 6.10.
SUPPORTED = {
    "6.1": {"lz4", "lz4hc", "lzma"},
    "6.12": {"lz4", "lz4hc", "lzma", "deflate", "zstd"},
}
OPTION = {"lzma": "CONFIG_EROFS_FS_ZIP_LZMA", "deflate": "CONFIG_EROFS_FS_ZIP_DEFLATE",
          "zstd": "CONFIG_EROFS_FS_ZIP_ZSTD"}
ALGS = ["lz4", "lz4hc", "lzma", "deflate", "zstd"]

# (mkfs arguments): all on-disk features 6.1 already reads (ztailpacking since 5.16,
# fragments and dedupe since 6.1), with the algorithms of both kernels, then the same
# features with 6.12's deflate and zstd.
COMBOS = [
    ("-z", "lz4hc", "-C", "65536"),
    ("-z", "lzma", "-C", "65536", "-E", "legacy-compress"),
    ("-z", "lz4", "-E", "ztailpacking"),
    ("-z", "lz4", "-E", "legacy-compress"),
    ("-z", "lzma", "-E", "ztailpacking"),
    ("-z", "lz4hc", "-E", "fragments"),
    ("-z", "lzma", "-C", "65536", "-E", "fragments,ztailpacking"),
    ("-z", "lz4hc", "-E", "dedupe"),
    ("-z", "lzma", "-E", "dedupe,ztailpacking"),
    ("-z", "lz4hc", "-C", "65536", "-E", "ztailpacking,fragments,dedupe,legacy-compress"),
    ("-z", "deflate", "-C", "65536", "-E", "ztailpacking"),
    ("-z", "deflate", "-E", "fragments,dedupe,legacy-compress"),
    ("-z", "zstd", "-C", "65536", "-E", "ztailpacking,fragments"),
    ("-z", "zstd", "-E", "dedupe"),
]


def series():
    m = re.match(r"(\d+\.\d+)\.", os.uname().release)
    assert m, os.uname().release
    return m.group(1)


def supported():
    """The explicit expectation for this kernel; a series not in the table fails."""
    s = series()
    assert s in SUPPORTED, f"kernel {s}: add its decompressors to SUPPORTED"
    return SUPPORTED[s]


@pytest.fixture(scope="module")
def tree():
    """Sizes around the block and pcluster edges (compressible and not), a few MiB file,
    repeated content (dedupe, fragments), sparse files, hardlinks, symlinks, every inode
    kind and user./trusted./security. xattrs, owners, modes and mtimes. On the scratch
    ext4 (trusted. and security. xattrs, device nodes)."""
    base = os.path.join(os.environ["VMTEST_SCRATCH"], "ztree-" + os.urandom(4).hex())
    root = os.path.join(base, "src")
    os.makedirs(os.path.join(root, "d", "e e"))
    shared = text(150_000, 42)
    files = {
        "empty": b"", "one": b"x", "t100": text(100, 3),
        "t4095": text(4095), "t4096": text(4096), "t4097": text(4097),
        "t8191": text(8191, 5), "t8193": text(8193, 6),
        "t65535": text(65535, 7), "t65537": text(65537, 8),
        "r100": noise(100, 2), "r4097": noise(4097, 3), "r70000": noise(70000, 4),
        "big": text(5 << 19, 2) + b"end",                       # 2.5 MiB
        "mixed": b"".join(text(20000, i) + noise(9000, i) for i in range(10)),
        "text-tail-noise": text(50000, 5) + noise(3000, 5),
        "d/zeros": bytes(1 << 20),
        "d/e e/\u00e9t\u00e9 name": text(10001, 8),
        "dup1": shared, "d/dup2": shared, "d/e e/dup3": shared + b"x",
        "dup-prefix": shared[:100_000] + text(37777, 9),
    }
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    for i in range(30):
        with open(os.path.join(root, "d", f"f{i:02d}"), "wb") as f:
            f.write(text(i * 431 + 1, i))
    with open(os.path.join(root, "sparse"), "wb") as f:
        for i in range(4):
            f.seek(i * (600 << 10) + 77)
            f.write(text(7000, i))
    with open(os.path.join(root, "sparse-tail"), "wb") as f:
        f.write(text(9000, 9))
        f.truncate(1 << 20)
    os.link(os.path.join(root, "big"), os.path.join(root, "d", "hardlink"))
    os.link(os.path.join(root, "t4097"), os.path.join(root, "d", "e e", "hardlink2"))
    os.symlink("big", os.path.join(root, "sym"))
    os.symlink("/x/" + "y" * 3000, os.path.join(root, "d", "longsym"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "d", "chr"), 0o20644, os.makedev(1, 7))
    os.mknod(os.path.join(root, "d", "blk"), 0o60600, os.makedev(8, 1))
    os.setxattr(os.path.join(root, "t4097"), "user.note", b"tail with xattrs")
    os.setxattr(os.path.join(root, "text-tail-noise"), "user.big", b"v" * 900)
    os.setxattr(os.path.join(root, "d", "f07"), "trusted.x", b"1")
    os.setxattr(os.path.join(root, "t8193"), "security.selinux", b"system_u:object_r:x\0")
    os.chmod(os.path.join(root, "t100"), 0o4755)
    os.chown(os.path.join(root, "t65537"), 70000, 12)
    os.utime(os.path.join(root, "r100"), ns=(1, 1_600_000_000_123_456_789))
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def work():
    with scratch_dir("zimg", "mnt") as base:
        yield base


def _check(tree, work, args):
    """mkfs in the guest; mounted and equal if the kernel has the algorithm, else
    refused at mount."""
    img, mnt = os.path.join(work, "img"), os.path.join(work, "mnt")
    subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", *args, img, tree],
                   check=True)
    alg = args[args.index("-z") + 1]
    if alg not in supported():
        with kernel_log() as log, pytest.raises(MountError):
            mount_erofs(img, mnt)
        # refused for the algorithm (available_compr_algs), not for another reason
        assert "unidentified algorithms" in "".join(log), log
        return
    mounted_equal(img, tree, mnt, check_nlink=True)


def test_kernel_config_matches():
    """The guest kernel builds exactly the decompressors SUPPORTED names for it."""
    with gzip.open("/proc/config.gz", "rt") as f:
        cfg = set(f.read().splitlines())
    assert "CONFIG_EROFS_FS_ZIP=y" in cfg
    have = supported()
    for alg, opt in OPTION.items():
        assert (f"{opt}=y" in cfg) == (alg in have), (series(), opt)


@pytest.mark.parametrize("alg", ALGS)
def test_algorithm(tree, work, alg):
    _check(tree, work, ("-z", alg))


@pytest.mark.parametrize("args", COMBOS, ids=lambda a: " ".join(a))
def test_features(tree, work, args):
    _check(tree, work, args)


@pytest.fixture(scope="module")
def shifted_tree():
    """helpers.write_shifted_tree: -E dedupe references earlier pclusters, some only in
    part (LI_PARTIAL_REF, 6.1+)."""
    base = os.path.join(os.environ["VMTEST_SCRATCH"], "shifted-" + os.urandom(4).hex())
    root = os.path.join(base, "src")
    os.makedirs(root)
    write_shifted_tree(root)
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("args", [("-z", "lz4hc"), ("-z", "lzma"),
                                  ("-z", "lz4", "-C", "65536", "-E", "ztailpacking"),
                                  ("-z", "zstd")], ids=lambda a: " ".join(a))
def test_dedupe_partial_references(shifted_tree, work, args):
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import is_compressed, state
    from erofs_tools.reader.zmap import PCLUSTER
    _check(shifted_tree, work, (*args, "-E", "dedupe"))
    with open_image(os.path.join(work, "img")) as im:
        partial = sum(x.partial for _p, _d, ino in im.walk() if is_compressed(ino)
                      for x in state(im).zmap(ino).extents if x.kind == PCLUSTER)
    assert partial > 0
