"""Hostile images and output directories for `erofs-tools pull` (issue 19 items 5, 8, 9).

Each attack is built here: symlinks planted in the output directory, bootstrap layers
made to blow up a tar reader, manifests and bootstraps claiming absurd blob sizes with a
registry that sends an endless body. Bombs run `erofs-tools` in a child process whose
peak RSS and wall time are measured (resource.getrusage on a wrapper's only child)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from registry_fixtures import registry  # noqa: F401  (fixture)
from test_registry_hostile import _answer, _Server

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.registry import Descriptor, build_manifest
from erofs_tools.registry import mediatypes as mt

pytestmark = pytest.mark.registry

TOOL = os.path.join(os.path.dirname(sys.executable), "erofs-tools")
MAX_RSS_KB = 200 * 1024
MAX_SECONDS = 10.0
PRECIOUS = b"precious, must not change\n"

_MEASURE = """
import resource, subprocess, sys, time, json
t = time.monotonic()
p = subprocess.run(sys.argv[1:], capture_output=True)
print(json.dumps({"rc": p.returncode, "err": p.stderr.decode(errors="replace"),
                  "out": p.stdout.decode(errors="replace"),
                  "rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": time.monotonic() - t}))
"""


def run_measured(*args: str) -> dict:
    """Run erofs-tools ARGS in a wrapper whose only child it is: exit status, stderr,
    the child's peak RSS (KiB) and wall time."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, TOOL, *args], check=True,
                         capture_output=True, timeout=120)
    return json.loads(out.stdout)


def assert_bounded_failure(r: dict, match: str) -> None:
    assert r["rc"] == 1, r
    lines = r["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["err"]
    assert match in lines[0], lines[0]
    assert r["rss_kb"] < MAX_RSS_KB, f"{r['rss_kb']} KiB peak RSS"
    assert r["seconds"] < MAX_SECONDS, f"{r['seconds']:.1f} s"


@pytest.fixture
def nydus_image(registry, tmp_path):  # noqa: F811
    """A small Nydus image packed from a tree and pushed (no --insecure: loopback is
    plain HTTP by the one rule): (reference, blob id as pushed, blob bytes)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(3):
        (src / "d" / f"f{i}").write_bytes(os.urandom(50_000 + i))
    boot, blobs = tmp_path / "boot", tmp_path / "blobs"
    subprocess.run([TOOL, "pack", str(src), "-B", str(boot), "-D", str(blobs)], check=True)
    ref = f"{registry.host}/hostile/app:v1"
    out = subprocess.run([TOOL, "push", str(boot), ref, "-D", str(blobs), "--json"],
                         check=True, capture_output=True)
    (blob_id,) = json.loads(out.stdout)["blob_ids"].values()
    (path,) = [p for p in blobs.iterdir()]
    return ref, blob_id, path.read_bytes()


def _victim(tmp_path):
    v = tmp_path / "victim"
    v.write_bytes(PRECIOUS)
    return v


def _only(d, *names):
    assert sorted(os.listdir(d)) == sorted(names), os.listdir(d)


# --- item 5: planted symlinks -----------------------------------------------------------

def test_pull_never_writes_through_planted_symlinks(nydus_image, tmp_path):
    ref, blob_id, blob = nydus_image
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("image.boot.tmp", "image.boot", f"{blob_id}.tmp", blob_id):
        (out / name).symlink_to(victim)
    r = subprocess.run([TOOL, "pull", ref, "-o", str(out), "--blobs"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == PRECIOUS
    assert not (out / "image.boot").is_symlink() and not (out / blob_id).is_symlink()
    assert (out / blob_id).read_bytes() == blob
    assert [b.blob_id for b in BootstrapTables.read(str(out / "image.boot")).blobs] == [blob_id]
    # The planted temporary names are left alone, and nothing else is left behind.
    _only(out, "image.boot", "image.boot.tmp", blob_id, f"{blob_id}.tmp")


def test_pull_blobs_from_layout_never_writes_through_symlinks(nydus_image, tmp_path):
    ref, blob_id, blob = nydus_image
    layout = tmp_path / "layout"
    subprocess.run([TOOL, "pull", ref, "-o", str(tmp_path / "p"), "--blobs", "-q"], check=True)
    subprocess.run([TOOL, "push", str(tmp_path / "p" / "image.boot"), f"oci:{layout}:v1",
                    "-D", str(tmp_path / "p"), "-q"], check=True)
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in (f"{blob_id}.tmp", blob_id, "image.boot.tmp"):
        (out / name).symlink_to(victim)
    r = subprocess.run([TOOL, "pull", f"oci:{layout}:v1", "-o", str(out), "--blobs"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == PRECIOUS
    assert (out / blob_id).read_bytes() == blob and not (out / blob_id).is_symlink()
    _only(out, "image.boot", "image.boot.tmp", blob_id, f"{blob_id}.tmp")


# --- item 8: bootstrap layers built against tar readers ---------------------------------

def _tar_header(name: bytes, typeflag: bytes, size: int) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> bytes:
    return bytes(-n % 512)


def _pax_bomb_stream(records_bytes: int, headers: int = 1):
    """Tar bytes: ``headers`` PAX 'x' headers of tiny records, then image/image.boot."""
    rec = b"6 a=b\n"
    body = rec * (records_bytes // len(rec))
    for _ in range(headers):
        yield _tar_header(b"PaxHeaders/x", b"x", len(body)) + body + _pad(len(body))
    yield _tar_header(b"image/image.boot", b"0", 4096) + bytes(4096)
    yield bytes(1024)


def _declared_huge_pax() -> bytes:
    """A PAX header declaring 1.5 GB that a whole-header reader allocates."""
    return _tar_header(b"PaxHeaders/x", b"x", 1_500_000_000) + b"9 a=bbbb\n" * 100_000


def _zero_bootstrap(size: int):
    yield _tar_header(b"image/image.boot", b"0", size)
    zero = bytes(1 << 20)
    for _ in range(size >> 20):
        yield zero
    yield bytes(1024)


def _gzip(parts) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as g:
        for p in parts:
            g.write(p)
    return buf.getvalue()


def _push_nydus_manifest(client, repo, tag, boot_layer: bytes, extra_layers=()):
    cfg = b"{}"
    cd = Descriptor(mt.OCI_CONFIG, client.push_blob(repo, cfg).digest, len(cfg))
    bd = Descriptor(mt.OCI_LAYER_TAR_GZIP, client.push_blob(repo, boot_layer).digest,
                    len(boot_layer), {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true"})
    m = build_manifest(cd, [*extra_layers, bd])
    client.put_manifest(repo, tag, m)
    return m


BOMBS = {
    "pax-16MB-of-tiny-records": lambda: _gzip(_pax_bomb_stream(16_000_000)),
    "stacked-pax-headers": lambda: _gzip(_pax_bomb_stream(900_000, headers=200)),
    "pax-declared-1.5GB": lambda: _gzip([_declared_huge_pax()]),
    "300MB-zero-bootstrap": lambda: _gzip(_zero_bootstrap(300 << 20)),
    "not-gzip-not-tar": lambda: os.urandom(100_000),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_bootstrap_layer_bombs_are_bounded(registry, tmp_path, bomb):  # noqa: F811
    layer = BOMBS[bomb]()
    assert len(layer) < 2_000_000                    # small on the wire
    _push_nydus_manifest(registry.client(), "bomb/app", "v1", layer)
    out = tmp_path / "out"
    r = run_measured("pull", f"{registry.host}/bomb/app:v1", "-o", str(out))
    print(f"{bomb}: {len(layer)} bytes, rc {r['rc']}, {r['rss_kb'] // 1024} MiB peak RSS, "
          f"{r['seconds']:.2f} s")
    assert_bounded_failure(r, "bootstrap layer")
    _only(out)                                       # no image.boot, 0-byte or other


# --- item 9: sizes the manifest or the bootstrap make up -------------------------------

class _EndlessRegistry:
    """Serves a fixed set of blobs and manifests, and an endless body for one blob;
    records how many bytes of it were sent."""

    def __init__(self, blobs: dict[str, bytes], manifests: dict[str, tuple[str, bytes]],
                 endless: str):
        self.sent = 0

        def handle(h, body):
            path = h.path.split("?")[0]
            if path == "/v2/":
                return _answer(h, 200)
            kind, _, ref = path.rpartition("/")
            if kind.endswith("/manifests") and ref in manifests:
                mtype, data = manifests[ref]
                return _answer(h, 200, {"Content-Type": mtype, "Docker-Content-Digest":
                                        "sha256:" + hashlib.sha256(data).hexdigest()}, data)
            if kind.endswith("/blobs") and ref == endless:
                h.send_response(200)
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                piece = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
                try:
                    while self.sent < 4 << 30:
                        h.wfile.write(piece)
                        self.sent += 1 << 16
                except OSError:
                    pass
                h.close_connection = True
                return None
            if kind.endswith("/blobs") and ref in blobs:
                return _answer(h, 200, {}, blobs[ref])
            return _answer(h, 404)

        self.server = _Server(handle)
        self.host = self.server.host


def _real_bootstrap_layer(nydus_image_ref, tmp_path):
    out = tmp_path / "real"
    subprocess.run([TOOL, "pull", nydus_image_ref, "-o", str(out), "-q"], check=True)
    return out / "image.boot"


def _boot_layer(boot: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("image/image.boot")
        ti.size = len(boot)
        tf.addfile(ti, io.BytesIO(boot))
    return gzip.compress(raw.getvalue(), mtime=0)


def _with_blob_size(boot_path, size: int) -> bytes:
    """The bootstrap with its blob's compressed size set to ``size`` (a hostile
    bootstrap; the format layer's record, no offsets here)."""
    from erofs_tools.format import rafs as R
    from erofs_tools.registry.nydus_push import _patch
    t = BootstrapTables.read(str(boot_path))
    buf = bytearray(boot_path.read_bytes())
    _patch(buf, R.BlobEntry, t.ext.s_blob_table_offset, compressed_size=size)
    return bytes(buf)


@pytest.mark.parametrize("case", ["manifest-says-1e15", "sizes-agree-body-endless",
                                  "bootstrap-says-1e15"])
def test_pull_blobs_bounded_by_bootstrap_and_free_space(nydus_image, tmp_path, case):
    ref, blob_id, blob = nydus_image
    boot_path = _real_bootstrap_layer(ref, tmp_path)
    digest = "sha256:" + blob_id
    if case == "bootstrap-says-1e15":
        boot = _with_blob_size(boot_path, 10 ** 15)
        layer_size = 10 ** 15
    else:
        boot = boot_path.read_bytes()
        layer_size = 10 ** 15 if case == "manifest-says-1e15" else len(blob)
    layer = _boot_layer(boot)
    bdigest = "sha256:" + hashlib.sha256(layer).hexdigest()
    cfg = b"{}"
    cdigest = "sha256:" + hashlib.sha256(cfg).hexdigest()
    m = build_manifest(Descriptor(mt.OCI_CONFIG, cdigest, len(cfg)), [
        Descriptor(mt.NYDUS_BLOB, digest, layer_size, {mt.ANNOTATION_NYDUS_BLOB: "true"}),
        Descriptor(mt.OCI_LAYER_TAR_GZIP, bdigest, len(layer),
                   {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true"})])
    reg = _EndlessRegistry({bdigest: layer, cdigest: cfg}, {"v1": (m.media_type, m.data)},
                           endless=digest)
    try:
        out = tmp_path / "out"
        r = run_measured("pull", f"{reg.host}/evil/app:v1", "-o", str(out), "--blobs")
        expected = {"manifest-says-1e15": "in the manifest",
                    "sizes-agree-body-endless": f"larger than {len(blob)} bytes",
                    "bootstrap-says-1e15": "bytes free"}[case]
        print(f"{case}: rc {r['rc']}, {r['rss_kb'] // 1024} MiB peak RSS, "
              f"{r['seconds']:.2f} s, {reg.sent} bytes sent")
        assert_bounded_failure(r, expected)
        assert reg.sent <= len(blob) + (8 << 20)      # stopped at the bootstrap's size
        if case != "sizes-agree-body-endless":
            assert reg.sent == 0                      # refused before asking
        _only(out, "image.boot")                      # the bootstrap was fine
    finally:
        reg.server.stop()
