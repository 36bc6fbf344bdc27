"""Process faults: SIGKILL the daemon over and over while readers read a lazily mounted
image (fanotify front end, host kernel, blobs from docker-registry through
tests/faults.FaultProxy, which slows every chunk request down so kills land mid-fetch).

Kills alternate between two kinds of moment:
  - "fetch": 0-3 ms after the daemon verified m more chunks (m random, up to 3/KILLS of
    the image), while the readers' next requests are in flight at the proxy; aimed by
    the daemon's progress, so that a fast machine never fetched the whole image before
    the kills and a slow one is killed after work all the same;
  - "write": from the proxy's thread, 0-3 ms after it delivered the n-th chunk body
    (n random in 1..8) in full, i.e. while the daemon decompresses, verifies, pwrites
    and marks it.

After each kill the chunk-state record is read (the daemon is dead, so it is stable):
every chunk it says is verified must never be requested from the backend again by any
later daemon (the proxy's request log proves it). Readers run through all the kills and
must end with the exact bytes of the source (never zeros, never anything else).

FAULTS_KILLS (default 20) sets the number of kills (the image grows with it, so that
there is still work to interrupt); docs/reliability.md has a longer run.
"""

import os
import random
import threading
import time

import helpers
import pytest
from faults import FaultProxy, env_int
from registry_fixtures import start_registry
from test_daemon_support import DaemonProc, file_sha, pack, regular_files, require_lazy_kernel

from erofs_tools.reader import blob as rblob
from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
from fscache_daemon.storage import blobcache as bc

pytestmark = [pytest.mark.root, pytest.mark.registry]

KILLS = env_int("FAULTS_KILLS", 20)
DELAY = 0.1          # seconds the proxy holds every chunk request


def _bits(path, n):
    raw = bc.state_bits(path)
    return {i for i in range(n) if raw[i >> 3] & (1 << (i & 7))}


def test_sigkill_during_fetch_and_write(tmp_path):
    require_lazy_kernel()
    rnd = random.Random(int(os.environ.get("FAULTS_SEED", "20261129")))
    reg = start_registry(str(tmp_path / "reg"))
    proxy = FaultProxy(reg.host, match=r"^GET /v2/kill/app/blobs/")
    src = str(tmp_path / "src")
    r = random.Random(5)
    os.makedirs(os.path.join(src, "d"))
    for i in range(max(120, 6 * KILLS)):           # 120 x 96 KiB + 4 x 2 MiB, random
        with open(os.path.join(src, "d", f"{i:03d}"), "wb") as f:
            f.write(r.randbytes(96 << 10))
    for i in range(4):
        with open(os.path.join(src, f"big{i}"), "wb") as f:
            f.write(r.randbytes(2 << 20))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs, "--chunk-size", "0x10000")
    blob_id = info["blobs"][0]["blob_id"]
    client = reg.client()
    push_image(client, "kill/app", "v1", config=BlobSource(b"{}", OCI_CONFIG),
               layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB)])
    client.close()
    meta = rblob.open_blob(os.path.join(blobs, blob_id), blob_id=blob_id)
    nchunks = len(meta.chunks)
    by_coff = sorted((c.compressed_offset, c.compressed_offset + c.compressed_size, c.index)
                     for c in meta.chunks)

    def chunks_of(first, last):
        return {i for a, b, i in by_coff if a <= last and b > first}

    d = DaemonProc(str(tmp_path / "d"), threads=4,
                   extra=["--batch-size", "64k", "--readahead", "256k"]).start()
    state = bc.state_path(os.path.join(d.cache_dir, "blobs"), blob_id)
    mnt = str(tmp_path / "mnt")
    files = regular_files(src)
    expected = {rel: file_sha(os.path.join(src, rel)) for rel in files}
    results, errors, wrong = {}, [], []
    done = threading.Event()
    try:
        d.mount(boot, mnt, f"registry:{proxy.host}/kill/app:v1")
        proxy.always(("delay", DELAY))
        order = list(files)
        rnd.shuffle(order)

        def reader(part):
            for rel in part:
                for _attempt in range(3):
                    try:
                        got = file_sha(os.path.join(mnt, rel))
                    except OSError as e:        # allowed (EIO), never expected here
                        errors.append((rel, e.errno))
                        continue
                    results[rel] = got
                    if got != expected[rel]:
                        wrong.append(rel)
                    break

        readers = [threading.Thread(target=reader, args=(order[k::6],), daemon=True)
                   for k in range(6)]
        for t in readers:
            t.start()

        def readers_done():
            return all(not t.is_alive() for t in readers)

        kill_log = []          # (kind, verified chunks at the kill, proxy log mark at restart)
        armed = threading.Event()
        fired = threading.Event()
        countdown = [0]

        def on_sent(req):
            if armed.is_set():
                countdown[0] -= 1
                if countdown[0] > 0:
                    return
                armed.clear()
                time.sleep(rnd.uniform(0, 0.003))
                d.proc.kill()
                fired.set()

        proxy.on_sent = on_sent
        for k in range(KILLS):
            kind = "write" if k % 2 else "fetch"
            if kind == "fetch":
                # aimed by this daemon's progress, not by a clock (0.3-2.5 s after its
                # start could be all of the image on a fast machine: a kill with nothing
                # left to do): once it verified m more chunks, m random up to 3/KILLS of
                # the image, so that the kills spread over all of it
                m = rnd.randint(1, max(2, 3 * nchunks // KILLS))
                at = len(_bits(state, nchunks))
                helpers.wait_until(lambda m=m, at=at: len(_bits(state, nchunks)) >= at + m
                                   or readers_done(), what=f"{m} more chunks verified",
                                   interval=0.002)
                time.sleep(rnd.uniform(0, 0.003))
                d.proc.kill()
            else:
                fired.clear()
                countdown[0] = rnd.randint(1, 8)    # right after the n-th body
                armed.set()
                # waited for, not given 5 s: bodies come as long as readers read
                helpers.wait_until(lambda: fired.is_set() or readers_done(),
                                   what="the kill after a chunk body", interval=0.001)
                if not fired.is_set():
                    armed.clear()
                    d.proc.kill()
                    kind = "write(readers done)"
            d.proc.wait()
            verified = _bits(state, nchunks)
            time.sleep(rnd.uniform(0, 0.3))       # readers of holes wait meanwhile
            mark = proxy.mark()
            d.start()
            kill_log.append((kind, verified, mark))
            if readers_done():
                break
        proxy.on_sent = None
        proxy.clear()
        for t in readers:
            t.join(300)
        assert not any(t.is_alive() for t in readers), "a reader is stuck"
        done.set()

        # no reader ever saw wrong bytes; every file was read
        assert not wrong, wrong[:10]
        assert set(results) == set(files), "some files were never read"
        assert not errors, errors[:10]
        helpers.assert_same_tree(src, mnt)

        # no verified chunk was fetched again by a later daemon
        refetched = []
        for n, (kind, verified, mark) in enumerate(kill_log):
            for g in proxy.blob_gets(mark):
                rng = g.byte_range()
                again = chunks_of(*rng) & verified if rng else set()
                if again:
                    refetched.append((n, kind, sorted(again)[:5]))
        assert not refetched, refetched[:5]
        kinds = [k for k, _, _ in kill_log]
        cached_at_kills = [len(v) for _, v, _ in kill_log]
        print(f"{len(kill_log)} kills ({kinds.count('fetch')} fetch, {kinds.count('write')} "
              f"write, {kinds.count('write(readers done)')} after the readers); verified "
              f"chunks at "
              f"kills: {cached_at_kills}; of {nchunks}")
        assert len(kill_log) >= min(KILLS, 5)
        # the kills happened while there was still work to do
        assert cached_at_kills[0] < nchunks
        b = d.blob_metrics(blob_id)
        assert b["verify_failures"] == 0
    finally:
        proxy.on_sent = None
        proxy.clear()
        d.cleanup()
        proxy.stop()
        reg.stop()
