"""Hand edits of images built by mkfs, for the hostile-input tests: the superblock
checksum's feature bit cleared (the edits would fail it first), a compressed inode of
extent records appended at the image's end (a copy of a built inode's record: the
reader is pointed at it by a superblock field or a dirent), and the edited image read
in a child under a 512 MiB address-space cap (what a test checks is a one-line error
or bounded memory, not the test process's own)."""
import struct
import subprocess
import sys

from erofs_tools.format import erofs as E

CAP = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))


def peak_mib():
    # the child's own peak (VmHWM of its mm): ru_maxrss keeps the mm it was forked
    # from, pytest's, which has grown to hundreds of MiB by then in a whole-suite run
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) >> 10
"""


def no_checksum(data: bytearray) -> None:
    """Clear FEATURE_COMPAT_SB_CHKSUM."""
    off = E.SUPER_OFFSET + 8
    struct.pack_into("<I", data, off, struct.unpack_from("<I", data, off)[0] & ~1)


def append_records_inode(data: bytearray, im, like, size: int, advise: int, count: int,
                         records: bytes, blksz: int) -> int:
    """Append to `data` inode `like`'s record (of Image `im`) made COMPRESSED_FULL, of
    `size` bytes and no xattrs, then its map header (`advise`; the record `count` where
    16- and 32-byte records keep it), the `records` at their alignment, zeros to a
    block's end; -> the new inode's nid."""
    data += bytes(-len(data) % E.SLOT_SIZE)
    at = len(data)
    rec = bytearray(data[like.offset:like.offset + like.inode_size])
    fmt = struct.unpack_from("<H", rec)[0] & ~0xE
    struct.pack_into("<HH", rec, 0, fmt | E.LAYOUT_COMPRESSED_FULL << 1, 0)
    struct.pack_into("<Q" if like.version else "<I", rec, 8, size)
    data += rec + struct.pack("<IHBB", count, advise, 0, 0)
    data += bytes(-len(data) % E.extent_recsize(advise))
    data += records
    data += bytes(-len(data) % blksz)
    return (at - im.meta_off) // E.SLOT_SIZE


def run_capped(script: str, image_path) -> list[str]:
    """Run `script` (sys.argv[1]: the image's path) in a child under the cap; -> the
    lines it printed (it must exit 0: a MemoryError's traceback fails the test)."""
    r = subprocess.run([sys.executable, "-c", CAP + script, str(image_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()
