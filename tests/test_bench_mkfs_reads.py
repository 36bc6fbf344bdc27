"""benchmarks/bench_mkfs.py --read-rounds: beside the times, the read requests the kernel
sent to each image's loop device and the sectors they read (the loop device's own
/sys/block stat: that image's reads alone), the deterministic side of a row whose times
move by tens of percent on a shared machine. Real mounts (mount(8), a loop device)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mounted, require_root_kernel, require_tool, run_mkfs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_mkfs  # noqa: E402

pytestmark = pytest.mark.root

BLK = 4096


def tree(root: Path) -> int:
    """A small tree; -> its files' whole data blocks (what no inline tail can hold)."""
    blocks = 0
    for d in ("a", "a/b", "c"):
        (root / d).mkdir(parents=True)
        for i, size in enumerate((17, 3000, 20000, 70001)):
            (root / d / f"f{i}").write_bytes(os.urandom(size))
            blocks += size // BLK
    os.symlink("a/f0", root / "ln")
    return blocks


def test_kernel_reads_count_each_images_device_requests(tmp_path):
    require_root_kernel()
    require_tool("mkfs.erofs")
    require_tool("losetup")
    src = tmp_path / "src"
    data_blocks = tree(src)
    images = {"mkfs.erofs": str(tmp_path / "ref.img"), "erofs-tools": str(tmp_path / "ours.img")}
    subprocess.run([shutil.which("mkfs.erofs"), "-T", "0", images["mkfs.erofs"], str(src)],
                   check=True, capture_output=True)
    run_mkfs(images["erofs-tools"], src, "-q", "-T", "0")
    times, sizes, disturbed, ios = bench_mkfs.kernel_reads(images, 2, str(tmp_path))
    assert set(sizes.values()) == {sum(p.stat().st_size for p in src.rglob("f*"))}
    for name in images:
        assert len(times[name]) == 2 and len(ios[name]) == 2, name
        for requests, sectors in ios[name]:
            # the page cache dropped: every data block comes from the device again
            assert requests >= 1 and sectors * 512 >= data_blocks * BLK, (name, ios[name])
            assert sectors * 512 <= os.path.getsize(images[name]), (name, ios[name])
    # nothing left mounted or attached
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    out = subprocess.run(["losetup", "-j", images["erofs-tools"]], capture_output=True,
                         text=True).stdout
    assert out == ""


def test_device_reads_none_without_a_block_device(tmp_path):
    """A file-backed EROFS mount (mount(2) on the image file, no loop device) has no
    device stat to read: None, and kernel_reads reports times without counts."""
    require_root_kernel()
    src = tmp_path / "src"
    tree(src)
    img = tmp_path / "p.img"
    run_mkfs(img, src, "-q", "-T", "0")
    with mounted(img) as mnt:
        assert bench_mkfs.device_reads(mnt) is None
    with pytest.raises(SystemExit):
        bench_mkfs.device_reads(str(tmp_path))
