"""Zran layers shared between images, through the fscache daemon (real docker-registry,
real fanotify lazy mounts): one gzip layer indexed twice with different chunk sizes and
spans (two meta blobs, two cache-file layouts under one blob id), and an image listing the
same layer twice. Each image reads back as its layers extracted in order by GNU tar,
mounted together, one after the other, and after a daemon restart; neither ever sees the
other's bytes."""
import json
import os

import pytest
from helpers import assert_same_tree
from registry_fixtures import registry  # noqa: F401
from test_tar_helpers import E, layer_paths, make_oci_layout, reference_rootfs, run_cli
from test_zran_convert import reads_right_or_eio, zran_layers


def _image(tmp_path, name, layers):
    d = tmp_path / name
    d.mkdir()
    tars = layer_paths(d, layers)
    lay, m = make_oci_layout(str(d / "src"), tars)
    return tars, lay, m


def _convert(registry, repo, out, chunk, span):
    p = run_cli("convert", "--oci-ref", f"{registry.host}/src/{repo}:v1",
                f"{registry.host}/idx/{repo}:v1", "--insecure", "--zran-span", span,
                "--chunk-size", chunk, "-o", out, "--json")
    r = json.loads(p.stdout)
    for x in r["layers"]:              # only image.boot stays local: meta blobs by backend
        path = os.path.join(out, x["meta_blob"] or "-")
        if x["meta_blob"] and os.path.exists(path):
            os.unlink(path)
    return r


@pytest.mark.root
@pytest.mark.registry
def test_shared_layer_two_indexes_and_a_repeated_layer(tmp_path, registry):  # noqa: F811
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    l1, l2, l3 = zran_layers()
    l1 = l1 + [E("unique-shared", data=os.urandom(70_000))]     # this test's digests
    l3 = l3 + [E("unique-b", data=os.urandom(100))]
    ta, la, ma = _image(tmp_path, "a", [l1, l2])
    tb, lb, mb = _image(tmp_path, "b", [l1, l3, l1])            # l1 twice, over l3
    shared = ma.layers()[0].digest
    assert mb.layers()[0].digest == shared == mb.layers()[2].digest
    with registry.client() as c:
        push_from_layout(la, c, "src/a", "v1")
        push_from_layout(lb, c, "src/b", "v1")
    ra = _convert(registry, "a", str(tmp_path / "out-a"), "0x10000", "64K")
    rb = _convert(registry, "b", str(tmp_path / "out-b"), "0x40000", "128K")
    # one layer, two indexes: different meta blobs, different cache-file layouts
    assert ra["layers"][0]["meta_blob"] != rb["layers"][0]["meta_blob"]
    assert rb["layers"][0]["meta_blob"] == rb["layers"][2]["meta_blob"]
    ref_a = reference_rootfs(ta, str(tmp_path / "ref-a"))
    ref_b = reference_rootfs(tb, str(tmp_path / "ref-b"))
    boot_a = str(tmp_path / "out-a" / "image.boot")
    boot_b = str(tmp_path / "out-b" / "image.boot")
    mnt_a, mnt_b = str(tmp_path / "mnt-a"), str(tmp_path / "mnt-b")
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        # one after the other: A fills the layer's cache, is released, then B mounts
        d.mount(boot_a, mnt_a, f"registry:{registry.host}/idx/a:v1")
        assert_same_tree(ref_a, mnt_a, check_nlink=True)
        d.umount(mnt_a)
        d.mount(boot_b, mnt_b, f"registry:{registry.host}/idx/b:v1")
        assert_same_tree(ref_b, mnt_b, check_nlink=True)
        # both at once (B's cache of the layer in use: A gets one of its own)
        d.mount(boot_a, mnt_a, f"registry:{registry.host}/idx/a:v1")
        for ref, mnt in ((ref_a, mnt_a), (ref_b, mnt_b)):
            assert_same_tree(ref, mnt, check_nlink=True)
        caches = os.listdir(os.path.join(d.cache_dir, "blobs"))
        hexd = shared.split(":")[1]
        assert f"{hexd}.blob" in caches and any(
            n.startswith(hexd + "@") and n.endswith(".blob") for n in caches), caches
        # a restart with both zran mounts: served again, each from its own cache
        d.stop()
        d.start()
        for ref, mnt in ((ref_a, mnt_a), (ref_b, mnt_b)):
            assert_same_tree(ref, mnt, check_nlink=True)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_lazy_reads_through_a_cold_mirror_and_a_redirecting_registry(tmp_path,  # noqa: F811
                                                                     registry):
    """The daemon's zran range reads through a cold pull-through mirror (it answers
    Range with 200 and the whole layer) and through a registry that redirects blob GETs
    to object storage: every file equals the layers extracted in order by GNU tar."""
    from registry_fixtures import StorageServer, start_registry
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    l1, l2, l3 = zran_layers()
    l3 = l3 + [E("unique-m", data=os.urandom(5000))]
    tars, lay, _m = _image(tmp_path, "s", [l1, l2, l3])
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    os.makedirs(tmp_path / "redir" / "storage")
    store = StorageServer(str(tmp_path / "redir" / "storage"))
    redir = start_registry(str(tmp_path / "redir"), redirect_to=store.url)
    mirror = start_registry(str(tmp_path / "mirror"),
                            extra_config={"proxy": {"remoteurl": registry.url}})
    d = None
    try:
        for reg in (registry, redir):
            with reg.client() as c:
                push_from_layout(lay, c, "src/m", "v1")
            _convert(reg, "m", str(tmp_path / f"out-{reg.host}"), "0x10000", "64K")
        d = DaemonProc(str(tmp_path / "d")).start()
        for n, (host, out) in enumerate(((mirror.host, registry.host),
                                         (redir.host, redir.host))):
            mnt = str(tmp_path / f"mnt{n}")
            d.mount(str(tmp_path / f"out-{out}" / "image.boot"), mnt,
                    f"registry:{host}/idx/m:v1")
            assert_same_tree(ref, mnt, check_nlink=True)
        # the layers were read by range from the object storage
        assert any(r[3] and "/data" in r[1] for r in store.requests), store.requests[:5]
    finally:
        if d is not None:
            d.cleanup()
        mirror.stop()
        redir.stop()
        store.stop()


@pytest.mark.root
@pytest.mark.registry
def test_corrupt_meta_blob_is_an_error_never_wrong_bytes(tmp_path, registry):  # noqa: F811
    """A zran meta blob whose stored bytes changed in the registry: the daemon checks it
    against the bootstrap's blob_meta_digest; no file of that layer is served (EIO, or
    the mount is refused naming the meta blob), the other layers' files are exact."""
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    l1, l2, l3 = zran_layers()
    l1 = l1 + [E("unique-c", data=os.urandom(5000))]
    tars, lay, m = _image(tmp_path, "c", [l1, l2, l3])
    with registry.client() as c:
        push_from_layout(lay, c, "src/c", "v1")
    r = _convert(registry, "c", str(tmp_path / "out"), "0x10000", "64K")
    meta = r["layers"][0]["meta_blob"]
    path = registry.blob_data_path("sha256:" + meta)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        os.makedirs(mnt)
        st, res = d.api.request("POST", "/api/v1/mounts", {
            "bootstrap": str(tmp_path / "out" / "image.boot"), "mountpoint": mnt,
            "backend": f"registry:{registry.host}/idx/c:v1"})
        if st != 201:
            assert meta[:12] in json.dumps(res) and "digest" in json.dumps(res), (st, res)
            return
        d.mounts.append(mnt)
        eio, good = reads_right_or_eio(ref, mnt)
        assert eio >= 1 and good >= 1, (eio, good)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_layers_without_file_data(tmp_path, registry):  # noqa: F811
    """Layers with no regular file data (an empty tar, as `docker build` wrote for
    metadata-only steps; directories, links and empty files only) among data layers:
    no meta blob for them, the image mounts lazily and reads back as GNU tar's."""
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    l1, l2, _l3 = zran_layers()
    l1 = l1 + [E("unique-e", data=os.urandom(3000))]
    nodata = [E("etc", "dir"), E("etc/empty", data=b""), E("etc/ln", "symlink", link="x"),
              E("fifo", "fifo")]
    tars, lay, m = _image(tmp_path, "e", [l1, [], nodata, l2])
    with registry.client() as c:
        push_from_layout(lay, c, "src/e", "v1")
    r = _convert(registry, "e", str(tmp_path / "out"), "0x10000", "64K")
    assert [x["meta_blob"] is None for x in r["layers"]] == [False, True, True, False]
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(str(tmp_path / "out" / "image.boot"), mnt, f"registry:{registry.host}/idx/e:v1")
        assert_same_tree(ref, mnt, check_nlink=True)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_cache_limit_evicts_zran_blobs_only_when_unused(tmp_path, registry):  # noqa: F811
    """--cache-size below one zran image: its blobs in use are never evicted while it is
    read (and read again: exact), and go once it is unmounted; the image mounted again
    reads exact from the registry."""
    import time

    import helpers
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    l1, l2, l3 = zran_layers()
    l1 = l1 + [E("unique-l", data=os.urandom(5000))]
    tars, lay, m = _image(tmp_path, "l", [l1, l2, l3])
    with registry.client() as c:
        push_from_layout(lay, c, "src/l", "v1")
    _convert(registry, "l", str(tmp_path / "out"), "0x10000", "64K")
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    big = m.layers()[0].digest.split(":")[1]
    d = DaemonProc(str(tmp_path / "d"), extra=("--cache-size", "1M")).start()
    blobs = os.path.join(d.cache_dir, "blobs")
    try:
        mnt = str(tmp_path / "mnt")
        for _round in range(2):
            d.mount(str(tmp_path / "out" / "image.boot"), mnt,
                    f"registry:{registry.host}/idx/l:v1")
            assert_same_tree(ref, mnt, check_nlink=True)
            time.sleep(2.5)                 # evictor rounds pass; the blob is in use
            assert f"{big}.blob" in os.listdir(blobs)
            assert_same_tree(ref, mnt, check_nlink=True)
            d.umount(mnt)
            helpers.wait_until(lambda: f"{big}.blob" not in os.listdir(blobs), 60,
                               "the zran blob evicted once unmounted")
    finally:
        d.cleanup()


@pytest.mark.registry
def test_layer_digest_mismatch_after_a_whole_read_publishes_nothing(tmp_path,  # noqa: F811
                                                                     registry):
    """The registry serves other bytes for a layer: a valid gzip of the same tar and
    size (only the header's MTIME differs), so indexing succeeds to the end and only
    the digest check can tell. convert fails naming the layer; DST gets no manifest."""
    from erofs_tools.errors import RegistryError
    from erofs_tools.registry import push_from_layout
    l1, l2, _l3 = zran_layers()
    tars, lay, m = _image(tmp_path, "g", [l1, l2])
    with registry.client() as c:
        push_from_layout(lay, c, "src/g", "v1")
    path = registry.blob_data_path(m.layers()[1].digest)
    data = bytearray(open(path, "rb").read())
    assert data[:3] == b"\x1f\x8b\x08"
    data[4:8] = b"\x01\x02\x03\x04"                  # MTIME: same tar, same size
    open(path, "wb").write(bytes(data))
    p = run_cli("convert", "--oci-ref", f"{registry.host}/src/g:v1",
                f"{registry.host}/idx/g:v1", "--insecure", "--zran-span", "64K",
                check=False)
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 1 and last.startswith(b"error: "), p.stderr
    assert m.layers()[1].digest.encode() in last and b"digest" in last, p.stderr
    with registry.client() as c:
        with pytest.raises(RegistryError):
            c.get_manifest("idx/g", "v1")
