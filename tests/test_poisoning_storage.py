"""The daemon's storage layer against a borrowed blob id (issue 19, item 1), without a
kernel: chunk maps are tied to the bootstrap that pins them, cache files are replaced,
shares are refused, and agreeing bootstraps still share. The attack is the one of
test_poisoning (the project's own pack, the attacker's bootstrap rewritten to name the
genuine blob id)."""

import os

import pytest
from test_poisoning import make_attack

from fscache_daemon.storage import StorageError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import LocalFsBackend
from fscache_daemon.storage.image import load_image


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    return make_attack(tmp_path_factory.mktemp("poison-storage"))


def _open(cdir, ref, be):
    meta, fetched = bc.load_or_fetch_meta(cdir, ref.blob_id, be, entry=ref.entry,
                                          blob_size=ref.compressed_size, digests=ref.digests,
                                          pins=ref.pins, table=ref.table_digest)
    return meta, fetched


def _fill_all(cdir, meta, be):
    mgr = bc.BlobManager(meta, bc.BlobCache(cdir, meta, durable=False), be)
    try:
        mgr.fill(0, meta.uncompressed_size)
        with open(mgr.cache.path, "rb") as f:
            return {c.index: (f.seek(c.uncompressed_offset), f.read(c.uncompressed_size))[1]
                    for c in meta.chunks}
    finally:
        mgr.close()


def _expected(boot, blobs):
    """Chunk bytes of the image's own blob, decoded and verified by the reader."""
    from erofs_tools.reader import blob as rblob
    ref = load_image(boot).blobs[0]
    meta = rblob.open_blob(os.path.join(blobs, ref.blob_id), blob_id=ref.blob_id,
                           entry=ref.entry, digests=ref.digests)
    with open(os.path.join(blobs, ref.blob_id), "rb") as f:
        read = rblob.file_reader(f)
        return {c.index: rblob.read_chunk(meta, c, read) for c in meta.chunks}


def test_attacker_map_on_disk_is_rebuilt_for_the_genuine_bootstrap(attack, tmp_path):
    a = attack
    cdir = str(tmp_path / "cache")
    ga, aa = load_image(a["g_boot"]).blobs[0], load_image(a["a_boot"]).blobs[0]
    assert ga.blob_id == aa.blob_id and ga.pins and aa.pins
    assert ga.table_digest != aa.table_digest
    gbe, abe = LocalFsBackend(a["g_blobs"]), LocalFsBackend(a["a_blobs"])
    ameta, _ = _open(cdir, aa, abe)
    assert _fill_all(cdir, ameta, abe) == _expected(a["a_boot"], a["a_blobs"])
    assert os.stat(bc.cache_path(cdir, ga.blob_id)).st_blocks > 0
    # the attacker's map, record and full cache file are on disk: the genuine bootstrap
    # gets a map of its own, and the cache file is emptied
    gmeta, fetched = _open(cdir, ga, gbe)
    # its chunk table pins every chunk: the new map is made from it (one byte read: the
    # blob is there)
    assert fetched == 1
    assert bc.pin_mismatch(gmeta, ga.uncompressed_size, ga.pins) is None
    assert bc.pin_mismatch(ameta, ga.uncompressed_size, ga.pins) is not None
    cache = bc.BlobCache(cdir, gmeta, durable=False)
    assert cache.cached_chunks == 0
    st = os.stat(cache.path)
    assert st.st_size == gmeta.uncompressed_size and st.st_blocks == 0
    cache.close()
    assert _fill_all(cdir, gmeta, gbe) == _expected(a["g_boot"], a["g_blobs"])
    # the genuine map is reused as it is; the attacker's bootstrap would need a rebuild
    again, fetched = _open(cdir, ga, gbe)
    assert fetched == 0 and again.to_bytes() == gmeta.to_bytes()
    # a blob in use under the genuine map is not shared with the attacker's bootstrap
    with pytest.raises(StorageError, match="chunk table"):
        bc.check_shareable(gmeta, aa.blob_id, abe, entry=aa.entry,
                           blob_size=aa.compressed_size, digests=aa.digests, pins=aa.pins)
    bc.check_shareable(gmeta, ga.blob_id, gbe, entry=ga.entry, blob_size=ga.compressed_size,
                       digests=ga.digests, pins=ga.pins)


def test_genuine_bootstrap_with_attacker_blob_never_stores_its_bytes(attack, tmp_path):
    """The genuine bootstrap, the attacker's blob under its id (a hostile mirror): the
    bootstrap's digests replace the blob's, so no chunk verifies and none is stored."""
    a = attack
    cdir = str(tmp_path / "cache")
    ga = load_image(a["g_boot"]).blobs[0]
    abe = LocalFsBackend(a["a_blobs"])
    meta, _ = _open(cdir, ga, abe)
    mgr = bc.BlobManager(meta, bc.BlobCache(cdir, meta, durable=False), abe)
    try:
        with pytest.raises(bc.FillError):
            mgr.fill(0, meta.uncompressed_size)
        assert mgr.cache.cached_chunks == 0
        assert mgr.stats.snapshot()["verify_failures"] == len(meta.chunks)
    finally:
        mgr.close()


def test_unpinned_bootstrap_compares_with_its_own_backend(attack, tmp_path):
    """A bootstrap without chunk pins (trusting its blob's own digests) reuses a cached
    map only if its own backend gives the same one."""
    a = attack
    cdir = str(tmp_path / "cache")
    ga, aa = load_image(a["g_boot"]).blobs[0], load_image(a["a_boot"]).blobs[0]
    gbe, abe = LocalFsBackend(a["g_blobs"]), LocalFsBackend(a["a_blobs"])
    ameta, _ = _open(cdir, aa, abe)
    bare = dict(entry=ga.entry, blob_size=ga.compressed_size, digests=None, pins={},
                table=b"\1" * 32)
    meta, fetched = bc.load_or_fetch_meta(cdir, ga.blob_id, gbe, **bare)
    assert fetched > 0 and meta.to_bytes() != ameta.to_bytes()
    assert bc.pin_mismatch(meta, ga.uncompressed_size, ga.pins) is None
    again, _ = bc.load_or_fetch_meta(cdir, ga.blob_id, gbe, **bare)
    assert again.to_bytes() == meta.to_bytes()
    with pytest.raises(StorageError, match="chunk table"):
        bc.check_shareable(ameta, ga.blob_id, gbe, entry=ga.entry,
                           blob_size=ga.compressed_size, pins={})


def _cache_bytes(path, meta):
    with open(path, "rb") as f:
        return {c.index: os.pread(f.fileno(), c.uncompressed_size, c.uncompressed_offset)
                for c in meta.chunks}


def test_daemon_serves_both_tables_from_their_own_caches(attack, tmp_path):
    """No kernel (the daemon's null front end): the attacker's image and the genuine one
    mounted at once are both served, each from its own cache file with its own bytes;
    mounts.json records the cache keys, so a restart re-attaches each mount to its own
    file whatever the order of the records; unmounting one releases only its cache."""
    import json

    from fscache_daemon.daemon import Daemon
    from fscache_daemon.frontend.base import NullFrontend
    a = attack
    cdir = str(tmp_path / "cache")
    ma, mg = str(tmp_path / "ma"), str(tmp_path / "mg")
    d = Daemon(cdir, frontend=NullFrontend(), threads=2, durable=False, readahead=0)
    d.start()
    try:
        ra = d.mount(a["a_boot"], ma, f"localfs:{a['a_blobs']}")
        rg = d.mount(a["g_boot"], mg, f"localfs:{a['g_blobs']}")
        (ba,), (bg,) = ra["blobs"], rg["blobs"]
        assert ba["key"] == a["blob_id"] and ba["variant"] is None
        assert bg["key"] == bc.variant_key(a["blob_id"], load_image(a["g_boot"]).blobs[0]
                                           .table_digest)
        assert bg["variant"] == bg["key"].split("@")[1] and len(bg["variant"]) == 16
        assert bg["cache_file"] == bc.cache_path(os.path.join(cdir, "blobs"), bg["key"])
        for b in (ba, bg):
            mgr = d.blobs[b["key"]]
            d.fill(b["key"], 0, mgr.size)
        wa, wg = _expected(a["a_boot"], a["a_blobs"]), _expected(a["g_boot"], a["g_blobs"])
        assert _cache_bytes(ba["cache_file"], d.blobs[ba["key"]].meta) == wa
        assert _cache_bytes(bg["cache_file"], d.blobs[bg["key"]].meta) == wg
        m = d.metrics()["blobs"]
        assert m[ba["key"]]["mounts"] == [ma] and m[bg["key"]]["mounts"] == [mg]
        assert m[bg["key"]]["blob_id"] == a["blob_id"]
    finally:
        d.shutdown()
    # restart with the records in the other order: each mount gets its recorded cache
    path = os.path.join(cdir, "mounts.json")
    state = json.load(open(path))
    assert {r["mountpoint"]: r["blob_keys"] for r in state["mounts"]} == \
        {ma: [ba["key"]], mg: [bg["key"]]}
    state["mounts"].reverse()
    open(path, "w").write(json.dumps(state))
    d = Daemon(cdir, frontend=NullFrontend(), threads=2, durable=False, readahead=0)
    d.start()
    try:
        got = {i.mountpoint: i.blob_keys for i in d.all_images()}
        assert got == {ma: [ba["key"]], mg: [bg["key"]]}
        for b, want in ((ba, wa), (bg, wg)):
            mgr = d.blobs[b["key"]]
            assert mgr.complete()             # nothing rebuilt, nothing emptied
            assert mgr.fill(0, mgr.size) == 0
            assert _cache_bytes(b["cache_file"], mgr.meta) == want
        d.umount(ma)
        assert ba["key"] not in d.blobs and set(d.blob_users) == {bg["key"]}
        # the genuine image a second time shares its variant (same table)
        mg2 = str(tmp_path / "mg2")
        r2 = d.mount(a["g_boot"], mg2, f"localfs:{a['g_blobs']}")
        assert r2["blobs"][0]["key"] == bg["key"]
        assert d.metrics()["blobs"][bg["key"]]["mounts"] == sorted([mg, mg2])
    finally:
        d.shutdown()


def test_restore_refuses_cache_keys_of_another_blob(attack, tmp_path):
    """A mounts.json whose cache key names another blob id is not followed."""
    import json

    from fscache_daemon.daemon import Daemon
    from fscache_daemon.frontend.base import NullFrontend
    a = attack
    cdir = str(tmp_path / "cache")
    d = Daemon(cdir, frontend=NullFrontend(), threads=2, durable=False, readahead=0)
    d.start()
    try:
        d.mount(a["g_boot"], str(tmp_path / "mg"), f"localfs:{a['g_blobs']}")
    finally:
        d.shutdown()
    path = os.path.join(cdir, "mounts.json")
    state = json.load(open(path))
    state["mounts"][0]["blob_keys"] = ["0" * 64]
    open(path, "w").write(json.dumps(state))
    d = Daemon(cdir, frontend=NullFrontend(), threads=2, durable=False, readahead=0)
    d.start()
    try:
        assert not d.all_images() and not d.blobs
    finally:
        d.shutdown()


def test_failed_mount_keeps_no_blob_open(tmp_path):
    """A mount whose second blob cannot be opened (here: missing from its backend)
    leaves none of its blobs open: no cache held for an image that is not there."""
    from test_poisoning import dict_pair

    from fscache_daemon.daemon import Daemon
    from fscache_daemon.errors import DaemonError
    from fscache_daemon.frontend.base import NullFrontend
    pair = dict_pair(tmp_path)
    i2, blobs = pair["i2"], pair["blobs"]
    ids = [b["blob_id"] for b in i2["blobs"]]
    assert len(ids) == 2
    os.unlink(os.path.join(blobs, ids[-1]))
    d = Daemon(str(tmp_path / "cache"), frontend=NullFrontend(), threads=2, durable=False,
               readahead=0)
    d.start()
    try:
        with pytest.raises(DaemonError):
            d.mount(str(tmp_path / "b2"), str(tmp_path / "m"), f"localfs:{blobs}")
        assert not d.blobs and not d.blob_users and not d.all_images()
    finally:
        d.shutdown()
