"""Mounts of different images run side by side in the daemon (lifecycle.py): one whose
backend hangs while its chunk maps are read does not hold up another; a second mount of
the same mount point still waits for the first and is refused; a blob two images share
is opened once. No kernel needed (front end "none"); the kernel and containerd version
is tests/test_snapshotter_parallel_mounts.py."""

import json
import os
import threading
import time

import pytest
from test_daemon_support import pack, write_tree

from fscache_daemon.daemon import Daemon
from fscache_daemon.errors import ConflictError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("par")
    out = {}
    for name, seed in (("a", 31), ("b", 32)):
        src = write_tree(str(base / f"src-{name}"), seed=seed, nfiles=6, big=(1 << 20,),
                         text=False)
        blobs = str(base / f"blobs-{name}")
        pack(src, str(base / f"{name}.boot"), blobs, "--chunk-size", "0x10000")
        out[name] = (str(base / f"{name}.boot"), f"localfs:{blobs}")
    return out


def test_a_hanging_backend_does_not_hold_up_another_mount(images, tmp_path):
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    gate, entered = threading.Event(), threading.Event()
    real_backend = d._backend

    def backend(spec, options):
        be = real_backend(spec, options)
        if spec == images["a"][1] and "reader" not in vars(be):
            real_reader = be.reader

            def reader(blob_id):
                read = real_reader(blob_id)

                def slow(offset, length):
                    entered.set()
                    assert gate.wait(60)
                    return read(offset, length)
                return slow
            be.reader = reader          # this instance only: image a's blob dir
        return be
    d._backend = backend
    results: list = []

    def mount(name, mp):
        try:
            results.append((name, d.mount(images[name][0], mp, images[name][1])))
        except ConflictError as e:
            results.append((name, e))

    mp_a, mp_b = str(tmp_path / "a"), str(tmp_path / "b")
    try:
        ta = threading.Thread(target=mount, args=("a", mp_a))
        ta.start()
        assert entered.wait(30)                 # a's chunk map read hangs
        ta2 = threading.Thread(target=mount, args=("a", mp_a))   # the same mount point
        ta2.start()
        t0 = time.monotonic()
        mount("b", mp_b)                        # another image: not held up
        took = time.monotonic() - t0
        assert results == [("b", results[0][1])] and isinstance(results[0][1], dict)
        # not held up: b's mount returned while a's still hangs (checked next); the
        # bound only catches a hang, whatever the load
        assert took < 60, took
        assert ta.is_alive() and ta2.is_alive()
        assert [m["mountpoint"] for m in d.list()] == [os.path.realpath(mp_b)]
        gate.set()
        ta.join(30)
        ta2.join(30)
        # the first mount of a's mount point made it; the second waited and was refused
        got = [v for n, v in results if n == "a"]
        assert sorted(type(v).__name__ for v in got) == ["ConflictError", "dict"], got
        both = sorted(os.path.realpath(p) for p in (mp_a, mp_b))
        assert sorted(m["mountpoint"] for m in d.list()) == both
        with open(os.path.join(d.cache_dir, "mounts.json")) as f:
            saved = json.load(f)        # the last one written holds both
        assert sorted(m["mountpoint"] for m in saved["mounts"]) == both
        for mp in (mp_a, mp_b):
            d.umount(mp)
        assert d.blobs == {} and d.blob_users == {}
    finally:
        gate.set()
        d.shutdown()


def test_two_mounts_of_one_blob_at_once_share_one_cache(images, tmp_path):
    """Both read the chunk map (side by side), one opens the cache file, the other
    shares that manager; the blob is released with the last of them."""
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    mps = [str(tmp_path / f"m{i}") for i in range(2)]
    errors: list = []

    def mount(mp):
        try:
            d.mount(images["a"][0], mp, images["a"][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    try:
        threads = [threading.Thread(target=mount, args=(mp,)) for mp in mps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        keys = [m["blobs"][0]["key"] for m in d.list()]
        assert len(keys) == 2 and keys[0] == keys[1] and list(d.blobs) == [keys[0]]
        assert d.blob_users[keys[0]] == {os.path.realpath(mp) for mp in mps}
        d.umount(mps[0])
        assert list(d.blobs) == [keys[0]]       # still used by the other mount
        d.umount(mps[1])
        assert d.blobs == {} and d.blob_users == {}
    finally:
        d.shutdown()
