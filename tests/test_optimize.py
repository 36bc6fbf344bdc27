"""`erofs-tools optimize` (erofs_tools/builder/optimize.py): an image reordered for an
access trace. End to end on the kernel: a trace recorded by fscache-daemon from real
reads, the optimized image mounted (daemon and `erofs-tools mount`), compared with the
source tree, checked by fsck.erofs and the reader; its prefetch table and prefetch blob
hold exactly the traced files and chunks, in first-access order. Without root: the same
with a trace made from the bootstrap, and bad input."""

import json
import os
import random
import shutil
import subprocess
import sys

import helpers
import pytest
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import REPO, DaemonProc, pack, require_lazy_kernel
from test_pack import cli, mount_and_compare, reader_check

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.reader import blob as rblob
from erofs_tools.reader.image import open_image

CHUNK = 0x40000
SIZES = {"a.bin": 1_300_000, "b.bin": 700_000, "c.bin": 3_000_000, "sub/d.bin": 900_000,
         "e.bin": 500_000}


def write_src(root, seed=11):
    r = random.Random(seed)
    os.makedirs(os.path.join(root, "sub", "deeper"))
    for name, size in SIZES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(r.randbytes(size))
    with open(os.path.join(root, "sub", "deeper", "text"), "wb") as f:
        f.write(b"a line of text\n" * 5000)
    os.symlink("a.bin", os.path.join(root, "link"))
    os.link(os.path.join(root, "b.bin"), os.path.join(root, "sub", "b-hardlink"))
    open(os.path.join(root, "empty"), "wb").close()
    os.chmod(os.path.join(root, "e.bin"), 0o600)
    os.utime(os.path.join(root, "sub"), ns=(1_600_000_000_123_456_789,) * 2)
    return root


@pytest.fixture
def image(tmp_path):
    src = write_src(str(tmp_path / "src"))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs, "--chunk-size", hex(CHUNK))
    return {"src": src, "boot": boot, "blobs": blobs, "blob_id": info["blobs"][0]["blob_id"]}


def chunks_of(boot, path):
    """[(blob index, uncompressed offset, file offset)] of a file's chunks, file order."""
    img = open_image(boot)
    try:
        out = []
        for fo, length, device, phys in img.map_data(img.lookup(path)):
            for k in range(0, length, CHUNK):
                out.append((device - 1, phys + k, fo + k))
        return out
    finally:
        img.close()


def synthetic_trace(image, reads):
    """A trace as fscache-daemon writes it: `reads` = [(path, [file chunk numbers])]."""
    entries, t = [], 0.0
    for path, which in reads:
        chunks = chunks_of(image["boot"], path)
        picked = []
        for k in which:
            t += 0.01
            b, uoff, fo = chunks[k]
            picked.append({"blob": b, "uncompressed_offset": uoff, "file_offset": fo,
                           "first_access": t})
        entries.append({"path": path, "inode": 0, "first_access": picked[0]["first_access"],
                        "chunks": picked})
    return {"version": 1, "image": {"blobs": [image["blob_id"]]}, "entries": entries}


def prefetch_paths(boot):
    img = open_image(boot)
    try:
        names: dict = {}
        for p, _d, ino in img.walk():      # a hardlinked file by its smallest path
            names[ino.nid] = min(names.get(ino.nid, os.fsdecode(p)), os.fsdecode(p))
        return [names[n] for n in img.prefetch]
    finally:
        img.close()


def check_layout(image, boot, trace, result):
    """Prefetch table = traced files in order; the new blob = the traced chunks, in
    first-access order, and nothing else; the source blob is referenced unchanged."""
    assert prefetch_paths(boot) == [e["path"] for e in trace["entries"]]
    t = BootstrapTables.read(boot)
    assert [b.blob_id for b in t.blobs] == [image["blob_id"], result["prefetch_blob"]]
    src_meta = rblob.open_blob(os.path.join(image["blobs"], image["blob_id"]),
                               blob_id=image["blob_id"])
    traced = sorted((c["first_access"], c["uncompressed_offset"])
                    for e in trace["entries"] for c in e["chunks"])
    want = [src_meta.chunk_at(off).digest for _, off in traced]
    new = rblob.open_blob(os.path.join(image["blobs"], result["prefetch_blob"]),
                          blob_id=result["prefetch_blob"])
    got = [c.digest for c in sorted(new.chunks, key=lambda c: c.compressed_offset)]
    assert got == want
    # back to back from the start of the blob
    off = 0
    for c in sorted(new.chunks, key=lambda c: c.compressed_offset):
        assert c.compressed_offset == off
        off += c.compressed_size
    assert result["prefetch_chunks"] == len(want)
    assert result["reused_chunks"] + len(want) == len(src_meta.chunks)


def test_optimize_with_a_trace_from_the_bootstrap(image, tmp_path):
    trace = synthetic_trace(image, [("/c.bin", [2, 0]), ("/b.bin", [0, 1, 2]),
                                    ("/sub/d.bin", [3])])
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    before = sorted(os.listdir(image["blobs"]))
    r = cli("optimize", image["boot"], tmp_path / "opt.boot", "--trace", tfile,
            "-D", image["blobs"], "--json")
    res = json.loads(r.stdout)
    assert res["prefetch_files"] == 3 and res["prefetch_chunks"] == 6
    assert sorted(os.listdir(image["blobs"])) == sorted(before + [res["prefetch_blob"]])
    check_layout(image, str(tmp_path / "opt.boot"), trace, res)
    reader_check(tmp_path / "opt.boot", image["blobs"])
    out = tmp_path / "unpacked"
    cli("unpack", tmp_path / "opt.boot", "--blob-dir", image["blobs"], "-o", out)
    helpers.assert_same_tree(image["src"], str(out))
    # the bootstrap is inspected like any other
    j = json.loads(cli("inspect", tmp_path / "opt.boot", "--json").stdout)
    assert len(j["rafs"]["prefetch"]) == 3, j["rafs"]


@pytest.mark.parametrize("case", ["other-image", "not-json", "bad-chunk", "missing-file",
                                  "same-output", "empty", "huge-time", "nan-time",
                                  "surrogate-path", "deep-nesting"])
def test_optimize_bad_input_writes_nothing(image, tmp_path, case):
    """Hostile or stale traces: one line of error, exit 1, nothing written. A time of
    400 digits (OverflowError) and JSON nested 200,000 deep (RecursionError) ended in a
    traceback; NaN was taken as a time and sorted the chunks at random. (A path holding
    a lone surrogate was refused before too, as 'not JSON'.)"""
    trace = synthetic_trace(image, [("/b.bin", [0])])
    out = tmp_path / "opt.boot"
    raw = None
    if case == "huge-time":
        trace["entries"][0]["chunks"][0]["first_access"] = 10 ** 400
    elif case == "nan-time":
        trace["entries"][0]["chunks"][0]["first_access"] = float("nan")
    elif case == "surrogate-path":
        trace["entries"][0]["path"] = "/b.bin\ud800"
    elif case == "deep-nesting":
        raw = '{"version": 1, "entries": ' + "[" * 200_000 + "]" * 200_000 + "}"
    elif case == "other-image":
        trace["image"]["blobs"] = ["ab" * 32]
    elif case == "bad-chunk":
        trace["entries"][0]["chunks"][0]["uncompressed_offset"] = "x"
    elif case == "missing-file":
        trace["entries"][0]["path"] = "/nope"
    elif case == "same-output":
        out = image["boot"]
    elif case == "empty":
        trace["entries"] = []
    tfile = tmp_path / "trace.json"
    tfile.write_text(raw or ("{not json" if case == "not-json" else json.dumps(trace)))
    before = sorted(os.listdir(image["blobs"]))
    boot_bytes = open(image["boot"], "rb").read()
    r = cli("optimize", image["boot"], out, "--trace", tfile, "-D", image["blobs"],
            check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(image["blobs"])) == before
    assert open(image["boot"], "rb").read() == boot_bytes
    if case != "same-output":
        assert not out.exists()


@pytest.mark.root
def test_optimize_duplicates_and_aliases_read_back_identical(tmp_path):
    """What a trace may repeat or name another way is taken once: entries twice, a
    hardlink's other name, a path without its leading '/', a chunk listed twice and a
    chunk two files share (their content is the same). The image mounts (kernel),
    checks and fscks identical to the source; its prefetch table names each file once."""
    src = write_src(str(tmp_path / "src"))
    shutil.copy(os.path.join(src, "a.bin"), os.path.join(src, "sub", "a-copy.bin"))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs, "--chunk-size", hex(CHUNK))
    image = {"src": src, "boot": boot, "blobs": blobs,
             "blob_id": info["blobs"][0]["blob_id"]}
    trace = synthetic_trace(image, [("/c.bin", [2, 0]), ("/b.bin", [0, 1]),
                                    ("/sub/a-copy.bin", [0, 1])])
    e = trace["entries"]
    e.append(dict(e[0]))                                      # the same entry again
    e.append({"path": "sub/b-hardlink", "chunks": e[1]["chunks"] * 2})
    e.append({"path": "/a.bin", "chunks": synthetic_trace(
        image, [("/a.bin", [0, 1])])["entries"][0]["chunks"]})    # a-copy.bin's chunks
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    out = tmp_path / "opt.boot"
    res = json.loads(cli("optimize", boot, out, "--trace", tfile, "-D", blobs,
                         "--json").stdout)
    assert res["prefetch_chunks"] == 6, res
    assert prefetch_paths(str(out)) == ["/c.bin", "/b.bin", "/sub/a-copy.bin", "/a.bin"]
    reader_check(out, blobs)
    mount_and_compare(out, blobs, src, tmp_path)


def test_optimize_trace_bomb_is_refused_before_parsing(image, tmp_path):
    """24 MB of empty JSON objects (a trace bomb: parsed, ~27 bytes of memory per byte,
    ~650 MB here and ~7 GiB at the 256 MiB size limit) is refused from a count of its
    values, without parsing it: one line of error, nothing written, the process stays
    small (its peak RSS, not a time)."""
    from erofs_tools.builder.optimize import MAX_VALUES
    tfile = tmp_path / "bomb.json"
    with open(tfile, "wb") as f:
        f.write(b'{"version": 1, "image": {"blobs": []}, "entries": [' +
                b"{}," * MAX_VALUES + b"{}]}")
    out = tmp_path / "opt.boot"
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
             "capture_output=True); sys.stdout.write(str(r.returncode) + ' ' + "
             "str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) + ' '); "
             "sys.stdout.write(r.stderr.decode())")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "erofs_tools",
                        "optimize", image["boot"], str(out), "--trace", str(tfile), "-D",
                        image["blobs"]], capture_output=True, check=True, cwd=REPO)
    rc, rss_kib, err = r.stdout.decode().split(" ", 2)
    assert rc == "1" and err.startswith("error: ") and err.count("\n") == 1, err
    assert "JSON values" in err, err
    assert int(rss_kib) < 200 * 1024, f"peak RSS {int(rss_kib) >> 10} MiB"
    assert not out.exists()


@pytest.mark.root
def test_optimize_a_recorded_trace_mounts_identical(image, tmp_path):
    """The whole loop on the kernel: record, optimize, mount the result twice (daemon,
    lazily; `erofs-tools mount`, whole cache files) and compare; fsck.erofs 1.9.x."""
    require_lazy_kernel()
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(image["boot"], mnt, f"localfs:{image['blobs']}")
        for name, n in (("b.bin", None), ("a.bin", None), ("c.bin", 100_000)):
            with open(os.path.join(mnt, name), "rb") as f:
                f.read() if n is None else f.read(n)
        st, trace = d.api.request("GET", "/api/v1/trace?mountpoint=" + mnt)
        assert st == 200, trace
        assert [e["path"] for e in trace["entries"]] == ["/b.bin", "/a.bin", "/c.bin"]
        d.umount(mnt)
        tfile = tmp_path / "trace.json"
        tfile.write_text(json.dumps(trace))
        opt = tmp_path / "opt.boot"
        res = json.loads(cli("optimize", image["boot"], opt, "--trace", tfile, "-D",
                             image["blobs"], "--json").stdout)
        check_layout(image, str(opt), trace, res)
        reader_check(opt, image["blobs"])
        # lazily through the daemon: identical to the source
        mnt2 = str(tmp_path / "mnt2")
        d.mount(str(opt), mnt2, f"localfs:{image['blobs']}")
        helpers.assert_same_tree(image["src"], mnt2)
        d.umount(mnt2)
    finally:
        d.cleanup()
    # whole cache files through `erofs-tools mount`, then fsck.erofs on them
    shutil.rmtree(tmp_path / "mnt", ignore_errors=True)
    mount_and_compare(opt, image["blobs"], image["src"], tmp_path)


def test_optimize_oci_layout_uploads_only_the_prefetch_blob(image, tmp_path):
    layout = tmp_path / "layout"
    cli("push", image["boot"], f"oci:{layout}:v1", "-D", image["blobs"])
    pulled = tmp_path / "pulled"
    cli("pull", f"oci:{layout}:v1", "-o", pulled)
    # the trace of the image as published (blob ids are the blob files' digests)
    pub = {"boot": str(pulled / "image.boot"),
           "blob_id": BootstrapTables.read(str(pulled / "image.boot")).blobs[0].blob_id}
    trace = synthetic_trace(pub, [("/b.bin", [2, 1, 0]), ("/c.bin", [0])])
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    blobs_before = set(os.listdir(layout / "blobs" / "sha256"))
    res = json.loads(cli("optimize", f"oci:{layout}:v1", f"oci:{layout}:fast", "--trace",
                         tfile, "--json").stdout)
    assert res["prefetch_files"] == 2 and res["prefetch_chunks"] == 4
    added = set(os.listdir(layout / "blobs" / "sha256")) - blobs_before
    # the prefetch blob, the bootstrap layer, the config and the manifest: no data blob
    # of the source went in again (it was there), and nothing else was copied
    assert res["prefetch_blob"] in added and len(added) == 4, (added, res)
    assert [p["how"] for p in res["pushed"] if p["digest"] == "sha256:" + pub["blob_id"]] \
        == ["exists"]
    out = tmp_path / "fast"
    cli("pull", f"oci:{layout}:fast", "-o", out, "--blobs")
    assert prefetch_paths(str(out / "image.boot")) == ["/b.bin", "/c.bin"]
    reader_check(out / "image.boot", out)
    cli("unpack", out / "image.boot", "--blob-dir", out, "-o", tmp_path / "unpacked")
    helpers.assert_same_tree(image["src"], str(tmp_path / "unpacked"))
    # a trace of another image: one line naming the reference (not the temporary copy
    # of its bootstrap, gone by then), nothing pushed
    trace["image"]["blobs"] = ["ab" * 32]
    tfile.write_text(json.dumps(trace))
    before = set(os.listdir(layout / "blobs" / "sha256"))
    r = cli("optimize", f"oci:{layout}:v1", f"oci:{layout}:bad", "--trace", tfile,
            check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: oci:{layout}:v1: the trace was recorded on another"), err
    assert set(os.listdir(layout / "blobs" / "sha256")) == before
    # into another layout: the source blob is copied there, the result is complete
    trace["image"]["blobs"] = [pub["blob_id"]]
    tfile.write_text(json.dumps(trace))
    other = tmp_path / "other"
    cli("optimize", f"oci:{layout}:v1", f"oci:{other}:fast", "--trace", tfile)
    cli("pull", f"oci:{other}:fast", "-o", tmp_path / "other-pulled", "--blobs")
    reader_check(tmp_path / "other-pulled" / "image.boot", tmp_path / "other-pulled")


def test_optimize_registry_reference(image, tmp_path, registry):  # noqa: F811
    src_ref, dst_ref = f"{registry.host}/app:v1", f"{registry.host}/app:fast"
    cli("push", image["boot"], src_ref, "-D", image["blobs"])
    pulled = tmp_path / "pulled"
    cli("pull", src_ref, "-o", pulled)
    pub = {"boot": str(pulled / "image.boot"),
           "blob_id": BootstrapTables.read(str(pulled / "image.boot")).blobs[0].blob_id}
    trace = synthetic_trace(pub, [("/a.bin", [0, 1]), ("/e.bin", [1])])
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    res = json.loads(cli("optimize", src_ref, dst_ref, "--trace", tfile, "--work-dir",
                         tmp_path, "--json").stdout)
    how = {p["digest"]: p["how"] for p in res["pushed"]}
    assert how["sha256:" + pub["blob_id"]] == "exists"        # never uploaded again
    assert how["sha256:" + res["prefetch_blob"]] == "uploaded"
    out = tmp_path / "fast"
    cli("pull", dst_ref, "-o", out, "--blobs")
    assert prefetch_paths(str(out / "image.boot")) == ["/a.bin", "/e.bin"]
    reader_check(out / "image.boot", out)
    cli("unpack", out / "image.boot", "--blob-dir", out, "-o", tmp_path / "unpacked")
    helpers.assert_same_tree(image["src"], str(tmp_path / "unpacked"))
    # the work directory is cleaned up
    assert not [n for n in os.listdir(tmp_path) if n.startswith("erofs-optimize-")]


def test_optimize_registry_downloads_only_traced_blobs(tmp_path, registry):  # noqa: F811
    """A two-blob image (the second built with --chunk-dict): a trace touching only the
    second blob never downloads the first; the first blob's stored data is corrupted in
    the registry to prove it (a download would fail its digest check)."""
    base = write_src(str(tmp_path / "base"))
    blobs = str(tmp_path / "blobs")
    pack(base, str(tmp_path / "base.boot"), blobs, "--chunk-size", hex(CHUNK))
    src = str(tmp_path / "src")
    shutil.copytree(base, src, symlinks=True)
    with open(os.path.join(src, "new.bin"), "wb") as f:
        f.write(random.Random(3).randbytes(900_000))
    info = pack(src, str(tmp_path / "img.boot"), blobs, "--chunk-size", hex(CHUNK),
                "--chunk-dict", str(tmp_path / "base.boot"))
    assert len(info["blobs"]) == 2
    ref = f"{registry.host}/two/app"
    cli("push", tmp_path / "img.boot", f"{ref}:v1", "-D", blobs)
    pulled = tmp_path / "pulled"
    cli("pull", f"{ref}:v1", "-o", pulled)
    ids = [b.blob_id for b in BootstrapTables.read(str(pulled / "image.boot")).blobs]
    pub = {"boot": str(pulled / "image.boot"), "blob_id": ids[1]}
    trace = synthetic_trace(pub, [("/new.bin", [0, 1])])
    trace["image"]["blobs"] = ids
    for e in trace["entries"]:
        for c in e["chunks"]:
            c["blob"] = 1
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    with open(registry.blob_data_path("sha256:" + ids[0]), "r+b") as f:
        f.seek(100)
        f.write(b"corrupted")
    res = json.loads(cli("optimize", f"{ref}:v1", f"{ref}:fast", "--trace", tfile,
                         "--json").stdout)
    assert res["prefetch_chunks"] == 2
    how = {p["digest"]: p["how"] for p in res["pushed"]}
    assert how["sha256:" + ids[0]] == how["sha256:" + ids[1]] == "exists"
    out = tmp_path / "fast"
    cli("pull", f"{ref}:fast", "-o", out)
    assert prefetch_paths(str(out / "image.boot")) == ["/new.bin"]
    assert [b.blob_id for b in BootstrapTables.read(str(out / "image.boot")).blobs] == \
        ids + [res["prefetch_blob"]]
