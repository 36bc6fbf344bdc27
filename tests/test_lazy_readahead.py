"""Readahead through a real daemon and the host kernel: a sequential reader of a lazily
mounted file is kept ahead of by growing windows whose markers reach the daemon, so only a
handful of its reads ever wait for the daemon."""

import os
import random
import time

import pytest
from test_daemon_support import DaemonProc, drop_caches, pack, require_lazy_kernel

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.mark.parametrize("window", [None, 1024, 0])
def test_sequential_reader_is_kept_ahead_of(tmp_path, monkeypatch, window):
    """window: FSCACHE_DAEMON_MOUNT_READAHEAD_KB (None: the default, 256 KiB; 1024: the
    default before; 0: the kernel's window is left alone)."""
    require_lazy_kernel()
    if window is None:
        monkeypatch.delenv("FSCACHE_DAEMON_MOUNT_READAHEAD_KB", raising=False)
    else:
        monkeypatch.setenv("FSCACHE_DAEMON_MOUNT_READAHEAD_KB", str(window))
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(40 * MiB)
    (src / "big.bin").write_bytes(data)
    (src / "small.txt").write_bytes(b"small\n")
    info = pack(str(src), str(tmp_path / "boot"), str(tmp_path / "blobs"),
                "--compressor", "none")
    blob_id = info["blobs"][0]["blob_id"]
    d = DaemonProc(str(tmp_path / "d"), threads=4).start()
    try:
        mnt = str(tmp_path / "mnt")
        before = set(os.listdir("/sys/fs/erofs"))
        d.mount(str(tmp_path / "boot"), mnt, f"localfs:{tmp_path / 'blobs'}")
        (inst,) = set(os.listdir("/sys/fs/erofs")) - before
        ra_kb = f"/sys/class/bdi/{inst}/read_ahead_kb"
        # the window asked for while the blob is incomplete, else the kernel's (128 KiB)
        want = {None: "256", 1024: "1024", 0: "128"}[window]
        assert open(ra_kb).read().strip() == want
        drop_caches()
        got = bytearray()
        with open(os.path.join(mnt, "big.bin"), "rb", buffering=0) as f:
            while chunk := f.read(256 << 10):
                got += chunk
        assert got == data
        b = d.blob_metrics(blob_id)
        fs = d.metrics()["frontend_stats"]
        # 40 chunks, one kernel read (event) per window of the mount's: ~45 at 1 MiB,
        # ~160 at 256 KiB, ~320 at 128 KiB. The first miss fetched the rest of the file
        # up to 16 MiB, the next one opened a sequential window and each window's marker
        # started the next (2, 4, 8, 16 MiB); what else reached the daemon were reads of
        # chunks still in flight: the smaller the mount's window, the later the reader's
        # kernel readahead touches a marker, so the closer it follows the daemon's
        # windows and the more of its reads find a chunk in flight (7-8 requests at
        # 1 MiB, 12-18 at 256 KiB and 128 KiB), and the less is fetched ahead (38 of
        # 40 MiB at 1 MiB, 27-33 at 256 KiB, 27 at 128 KiB)
        # what the window is for: fewer, larger events
        assert 40 <= fs["holder_events"] <= {None: 240, 1024: 100, 0: 480}[window], fs
        # (a loaded machine lets the reader catch up with more in-flight chunks: over 20 seen
        # at 1 MiB with five helpers running; a reader without the windows makes ~40)
        most_requests, least_ahead = (30, 30) if window == 1024 else (30, 20)
        assert b["requests"] <= most_requests, (b, fs)
        assert b["readahead_bytes"] >= least_ahead * MiB, (b, fs)
        assert b["bytes_fetched"] <= 41 * MiB           # nothing fetched twice
        # once the blob is complete the mount gets the kernel's default window back
        assert open(os.path.join(mnt, "small.txt"), "rb").read() == b"small\n"
        deadline = time.monotonic() + 20
        while open(ra_kb).read().strip() != "128":
            assert time.monotonic() < deadline, d.blob_metrics(blob_id)
            time.sleep(0.05)
        assert d.blob_metrics(blob_id)["complete"]
        d.umount(mnt)
    finally:
        d.cleanup()
