"""Convert OCI/Docker images to Nydus RAFS v6 images; push and pull Nydus images.

    convert(SRC, DST)    every layer tar(.gz|.zst) is streamed from the registry (or an
                         `oci:PATH` layout) straight into `pack --type tar` (no layer is
                         stored on disk, only the blob it becomes), the layer bootstraps
                         are merged, and the Nydus image is pushed (ecosystem.md §2)
    push_nydus(BOOT, DIR, REF)   an existing bootstrap and its blobs
    pull_nydus(REF, DIR)         DIR/image.boot, and with blobs=True DIR/<blob id>

Blob ids: a blob is stored in the registry under the sha256 of its file, and the pushed
bootstrap names every blob by that digest (hex), as nydus does (rafs-v6.md §11): the
daemon's registry backend then fetches `/v2/<repo>/blobs/sha256:<blob id>` directly, and
a pulled blob directory is laid out by blob id. Our blob writer's own id (sha256 of the
blob without its digest array) differs, so convert and push rename the blobs in the
bootstrap they push (merge with a blob id map / a byte patch of the device and blob
tables); the local files are renamed to match.

Layers: each Nydus blob layer has media type `application/vnd.oci.image.layer.nydus.blob.v1`
and the annotation `containerd.io/snapshot/nydus-blob: "true"`; the last layer is the
bootstrap layer, a gzip tar holding `image/image.boot` (mode 0444), annotated
`containerd.io/snapshot/nydus-bootstrap: "true"` and `nydus-fs-version: "6"`. The config
is the source config with `rootfs.diff_ids` = blob digests + the sha256 of the
uncompressed bootstrap tar, and a history entry for the bootstrap layer. If the source
reference is an index, the destination gets an index too, with the Nydus manifest marked
by `artifactType` and the `nydus.remoteimage.v1` OS feature. With merge_platform the
index also lists the source manifest (copied with its blobs, mounted across repositories
of one registry when it allows), so runtimes without Nydus support pick that one.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time

from ..errors import CorruptImageError, ErofsToolsError, InputError, RegistryError
from . import mediatypes as mt
from .client import RegistryClient
from .digest import digest_hex, file_digest, verify
from .manifest import Descriptor, build_index, build_manifest, select_platform
from .oci_layout import OciLayout
from .reference import LayoutReference, parse_reference

BOOTSTRAP_NAME = "image/image.boot"
MAX_BOOTSTRAP = 1 << 30
MAX_CONFIG = 16 << 20
STREAM_PIECE = 8 << 20
LAYER_TYPES = {mt.OCI_LAYER_TAR, mt.OCI_LAYER_TAR_GZIP, mt.OCI_LAYER_TAR_ZSTD,
               mt.DOCKER_LAYER_TAR_GZIP, "application/vnd.docker.image.rootfs.diff.tar",
               "application/vnd.oci.image.layer.nondistributable.v1.tar",
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}


def _platform(text):
    parts = (text or "linux/amd64").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"--platform {text!r}: expected OS/ARCH[/VARIANT]")
    return parts[0], parts[1]


# --- reading images ------------------------------------------------------------------

class _VerifyingReader:
    """read(n) over a source of pieces, hashing everything for a final digest check."""

    def __init__(self, desc, what):
        self.desc = desc
        self.what = what
        self.h = hashlib.sha256()
        self.n = 0
        self._buf = b""

    def _piece(self):           # -> bytes, b"" at the end
        raise NotImplementedError

    def read(self, n=-1):
        if not self._buf:
            self._buf = self._piece()
            if not self._buf:
                return b""
            self.n += len(self._buf)
            if self.n > self.desc.size:
                raise CorruptImageError(f"{self.what}: larger than its descriptor's "
                                        f"{self.desc.size} bytes")
            self.h.update(self._buf)
        if n is None or n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def finish(self):
        """Read what the tar parser left (gzip trailer, padding) and verify."""
        while self.read(1 << 20):
            pass
        if self.n != self.desc.size:
            raise CorruptImageError(f"{self.what}: {self.n} bytes, descriptor says "
                                    f"{self.desc.size}")
        verify(self.desc.digest, "sha256:" + self.h.hexdigest(), self.what)

    def close(self):
        pass


class _LayoutBlobReader(_VerifyingReader):
    def __init__(self, layout, desc):
        super().__init__(desc, f"layer {desc.digest}")
        self.f = layout.open_blob(desc.digest)

    def _piece(self):
        return self.f.read(1 << 20)

    def close(self):
        self.f.close()


class _RegistryBlobReader(_VerifyingReader):
    """Sequential range reads on a background thread (one piece ahead)."""

    def __init__(self, client, repo, desc, piece=STREAM_PIECE):
        super().__init__(desc, f"layer {desc.digest}")
        self.q = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._fetch, args=(client, repo, desc, piece),
                                  name="erofs-layer-fetch", daemon=True)
        self.t.start()

    def _fetch(self, client, repo, desc, piece):
        off = 0
        try:
            while off < desc.size and not self.stop.is_set():
                data = client.read_blob_range(repo, desc.digest, off,
                                              min(piece, desc.size - off))
                if not data:
                    break
                off += len(data)
                self._put(data)
            self._put(b"")
        except BaseException as e:          # handed to the reading thread
            self._put(e)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _piece(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            if isinstance(item, ErofsToolsError):
                raise type(item)(f"{self.what}: {item}")
            raise RegistryError(f"{self.what}: {type(item).__name__}: {item}")
        if item == b"":
            self.q.put(b"")       # stay at the end
        return item

    def close(self):
        self.stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.t.join(timeout=5)


class SourceImage:
    """An image to convert: manifest, config, and a way to stream each layer."""

    def __init__(self, ref_text, *, insecure=False, platform=None, client_kw=None):
        self.ref = parse_reference(ref_text)
        os_name, arch = _platform(platform)
        self.platform = {"os": os_name, "architecture": arch}
        self.index = None
        self.index_entry = None
        self.client = None
        if isinstance(self.ref, LayoutReference):
            self.layout = OciLayout(self.ref.path)
            d = self.layout.resolve(self.ref.tag)
            m = self.layout.get_manifest(d.digest)
            if m.is_index:
                self.index = m
                self.index_entry = select_platform(m, os_name, arch, nydus=False)
                m = self.layout.get_manifest(self.index_entry.digest)
            self.manifest = m
            cd = m.config()
            self.config = self.layout.read_blob(cd.digest, MAX_CONFIG)
        else:
            self.layout = None
            self.client = RegistryClient.for_reference(self.ref, insecure=insecure,
                                                       **(client_kw or {}))
            repo = self.ref.repository
            m = self.client.get_manifest(repo, self.ref.ref)
            if m.is_index:
                self.index = m
                self.index_entry = select_platform(m, os_name, arch, nydus=False)
                m = self.client.get_manifest(repo, self.index_entry.digest)
                if m.is_index:
                    raise InputError(f"{self.ref}: nested index is not supported")
            self.manifest = m
            cd = m.config()
            if cd.size > MAX_CONFIG:
                raise CorruptImageError(f"{self.ref}: config of {cd.size} bytes is too large")
            self.config = self.client.get_blob(repo, cd.digest, max_size=cd.size)
        self.config_desc = self.manifest.config()
        self.layers = self.manifest.layers()
        for d in self.layers:
            if d.annotations.get(mt.ANNOTATION_NYDUS_BOOTSTRAP) == "true" or \
                    d.media_type == mt.NYDUS_BLOB:
                raise InputError(f"{self.ref}: already a Nydus image")
            if d.media_type not in LAYER_TYPES:
                raise InputError(f"{self.ref}: layer {d.digest} has unsupported media type "
                                 f"{d.media_type}")

    def open_layer(self, desc):
        if self.layout is not None:
            return _LayoutBlobReader(self.layout, desc)
        return _RegistryBlobReader(self.client, self.ref.repository, desc)

    def close(self):
        if self.client is not None:
            self.client.close()


# --- Nydus image pieces ---------------------------------------------------------------

def bootstrap_layer(bootstrap_path):
    """-> (gzip bytes, uncompressed tar digest) of the bootstrap layer (reproducible)."""
    with open(bootstrap_path, "rb") as f:
        boot = f.read()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        ti = tarfile.TarInfo(BOOTSTRAP_NAME)
        ti.size, ti.mode, ti.mtime = len(boot), 0o444, 0
        tf.addfile(ti, io.BytesIO(boot))
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(tar)
    return gz.getvalue(), "sha256:" + hashlib.sha256(tar).hexdigest()


def extract_bootstrap(layer_bytes, what="bootstrap layer"):
    """The image/image.boot member of a bootstrap layer (bounded)."""
    try:
        tf = tarfile.open(fileobj=io.BytesIO(layer_bytes), mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptImageError(f"{what}: not a tar archive ({e})") from None
    with tf:
        try:
            for m in tf:
                if m.name.lstrip("./") == BOOTSTRAP_NAME and m.isfile():
                    if m.size > MAX_BOOTSTRAP:
                        raise CorruptImageError(f"{what}: bootstrap larger than "
                                                f"{MAX_BOOTSTRAP} bytes")
                    f = tf.extractfile(m)
                    data = f.read(m.size)
                    if len(data) != m.size:
                        raise CorruptImageError(f"{what}: bootstrap truncated")
                    return data
        except (tarfile.TarError, OSError, EOFError, zlib_error()) as e:
            raise CorruptImageError(f"{what}: {e}") from None
    raise CorruptImageError(f"{what}: no {BOOTSTRAP_NAME}")


def zlib_error():
    import zlib
    return zlib.error


def nydus_config(source_config, blob_digests, bootstrap_diff_id, platform=None):
    """The image config: source config with diff_ids rewritten (ecosystem.md §2)."""
    if source_config is None:
        cfg = {"architecture": (platform or {}).get("architecture", "amd64"),
               "os": (platform or {}).get("os", "linux"), "config": {}}
    else:
        try:
            cfg = json.loads(source_config)
            if not isinstance(cfg, dict):
                raise ValueError
        except ValueError:
            raise CorruptImageError("source image config is not a JSON object") from None
    cfg["rootfs"] = {"type": "layers", "diff_ids": list(blob_digests) + [bootstrap_diff_id]}
    hist = cfg.get("history")
    if not isinstance(hist, list):
        hist = []
    hist.append({"created_by": "Nydus Bootstrap Layer", "comment": "erofs-tools convert"})
    cfg["history"] = hist
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def rewrite_blob_ids(src, dst, mapping):
    """Copy bootstrap SRC to DST with blob ids renamed (device tags + blob table)."""
    from erofs_tools.builder.chunk_dict import BootstrapTables
    from erofs_tools.format import erofs as E
    from erofs_tools.format import rafs as R
    t = BootstrapTables.read(src)
    with open(src, "rb") as f:
        buf = bytearray(f.read())
    for i, b in enumerate(t.blobs):
        new = mapping.get(b.blob_id, b.blob_id).encode()
        if len(new) != 64:
            raise InputError(f"blob id {new!r} is not 64 characters")
        buf[R.DEVT_OFFSET + 128 * i:R.DEVT_OFFSET + 128 * i + 64] = new
        off = t.ext.s_blob_table_offset + 256 * i
        buf[off:off + 64] = new
    if t.sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM:
        from erofs_tools._native import sb_checksum
        buf[E.SUPER_OFFSET + 4:E.SUPER_OFFSET + 8] = bytes(4)
        buf[E.SUPER_OFFSET + 4:E.SUPER_OFFSET + 8] = \
            sb_checksum(bytes(buf[:4096])).to_bytes(4, "little")
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf)
    os.replace(tmp, dst)


def _file_sha256(path):
    with open(path, "rb") as f:
        return file_digest(f)


# --- destinations ----------------------------------------------------------------------

class Destination:
    """Where a Nydus image goes: a registry repository or an OCI layout."""

    def __init__(self, ref_text, *, insecure=False, client_kw=None):
        self.ref = parse_reference(ref_text)
        self.client = None
        self.layout = None
        if isinstance(self.ref, LayoutReference):
            self.layout = OciLayout(self.ref.path, create=True)
        else:
            self.client = RegistryClient.for_reference(self.ref, insecure=insecure,
                                                       **(client_kw or {}))
        self.pushed = []

    def has(self, digest):
        if self.layout is not None:
            return self.layout.has_blob(digest)
        return self.client.blob_exists(self.ref.repository, digest)

    def size_of(self, digest):
        if self.layout is not None:
            p = self.layout.blob_path(digest)
            return os.path.getsize(p) if os.path.exists(p) else None
        return self.client.stat_blob(self.ref.repository, digest)

    def push_blob(self, source, digest, media_type, annotations=None):
        if self.layout is not None:
            had = self.layout.has_blob(digest)
            d = self.layout.write_blob(source, digest)
            how, size = ("exists" if had else "uploaded"), d.size
        else:
            r = self.client.push_blob(self.ref.repository, source, digest=digest)
            how, size = r.how, r.size
            if size is None or size < 0:
                size = self.client.stat_blob(self.ref.repository, digest)
        self.pushed.append({"digest": digest, "size": size, "how": how,
                            "media_type": media_type})
        return Descriptor(media_type, digest, size, dict(annotations or {}))

    def put_manifest(self, manifest, platform=None, by_digest=False):
        if self.layout is not None:
            return self.layout.put_manifest(manifest, None if by_digest else
                                            (self.ref.tag or "latest"), platform)
        ref = manifest.digest if by_digest else (self.ref.tag or self.ref.digest or "latest")
        self.client.put_manifest(self.ref.repository, ref, manifest)

    def close(self):
        if self.client is not None:
            self.client.close()


def publish(dest, bootstrap, blobs, blob_dir, config=None, platform=None, as_index=False,
            index_platform=None, extra_entries=()):
    """Push blobs (local files in blob_dir named by blob id = digest hex, or already in
    the destination), config, the bootstrap layer and the manifest; -> summary."""
    layer_descs = []
    for b in blobs:
        digest = "sha256:" + b.blob_id
        path = os.path.join(blob_dir, b.blob_id) if blob_dir else None
        if path and os.path.exists(path):
            d = dest.push_blob(path, digest, mt.NYDUS_BLOB, {mt.ANNOTATION_NYDUS_BLOB: "true"})
        else:
            size = dest.size_of(digest)
            if size is None:
                raise InputError(f"blob {b.blob_id} is neither in {blob_dir} nor in "
                                 f"{dest.ref}")
            d = Descriptor(mt.NYDUS_BLOB, digest, size, {mt.ANNOTATION_NYDUS_BLOB: "true"})
            dest.pushed.append({"digest": digest, "size": size, "how": "exists",
                                "media_type": mt.NYDUS_BLOB})
        layer_descs.append(d)
    boot_gz, boot_diff = bootstrap_layer(bootstrap)
    cfg = nydus_config(config, [d.digest for d in layer_descs], boot_diff, platform)
    cfg_desc = dest.push_blob(cfg, "sha256:" + hashlib.sha256(cfg).hexdigest(),
                              mt.OCI_CONFIG)
    boot_desc = dest.push_blob(boot_gz, "sha256:" + hashlib.sha256(boot_gz).hexdigest(),
                               mt.OCI_LAYER_TAR_GZIP,
                               {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true",
                                mt.ANNOTATION_NYDUS_FS_VERSION: "6"})
    manifest = build_manifest(cfg_desc, layer_descs + [boot_desc], media_type=mt.OCI_MANIFEST)
    out = {"manifest": manifest.digest, "config": cfg_desc.digest,
           "bootstrap_layer": boot_desc.digest, "bootstrap_diff_id": boot_diff,
           "blob_layers": [d.digest for d in layer_descs], "pushed": dest.pushed}
    if as_index:
        p = dict(index_platform or platform or {"os": "linux", "architecture": "amd64"})
        p["os.features"] = [mt.NYDUS_OS_FEATURE]
        dest.put_manifest(manifest, by_digest=True)
        entry = Descriptor(mt.OCI_MANIFEST, manifest.digest, len(manifest.data),
                           platform=p, artifact_type=mt.NYDUS_MANIFEST_ARTIFACT)
        index = build_index(list(extra_entries) + [entry])
        dest.put_manifest(index)
        out["index"] = index.digest
    else:
        dest.put_manifest(manifest, platform)
    return out


# --- convert ---------------------------------------------------------------------------

def copy_source_image(src, dest, work_dir):
    """Put the source manifest and its blobs into the destination (for an index that
    lists both); -> the manifest's index entry."""
    repo = dest.ref.repository if dest.client is not None else None
    for d in src.manifest.blobs():
        if dest.has(d.digest):
            continue
        if dest.client is not None and src.client is not None and \
                src.ref.api_host == dest.ref.api_host and \
                dest.client.mount_blob(repo, d.digest, src.ref.repository):
            continue
        if src.layout is not None:
            dest.push_blob(src.layout.blob_path(d.digest), d.digest, d.media_type)
            continue
        fd, tmp = tempfile.mkstemp(prefix=".copy-", dir=work_dir)
        os.close(fd)
        try:
            src.client.pull_blob(src.ref.repository, d.digest, tmp, max_size=d.size)
            dest.push_blob(tmp, d.digest, d.media_type)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dest.put_manifest(src.manifest, by_digest=True)
    plat = dict(src.index_entry.platform) if src.index_entry is not None and \
        src.index_entry.platform else dict(src.platform)
    return Descriptor(src.manifest.media_type, src.manifest.digest, len(src.manifest.data),
                      platform=plat)


def convert(src_ref, dst_ref, *, insecure=False, chunk_dicts=(), platform=None,
            pack_options=None, output_dir=None, work_dir=None, client_kw=None,
            log=None, merge_platform=False):
    """Convert SRC_REF to a Nydus image at DST_REF; -> summary dict.

    output_dir keeps the merged bootstrap (image.boot) and the blobs (named by blob id);
    otherwise they live in a temporary directory removed at the end."""
    from erofs_tools.builder import rafs as RP
    from erofs_tools.builder.merge import merge
    from erofs_tools.builder.tar_source import pack_tar
    t0 = time.monotonic()
    opts = pack_options or RP.PackOptions()
    opts.chunk_dicts = list(chunk_dicts)
    src = SourceImage(src_ref, insecure=insecure, platform=platform, client_kw=client_kw)
    dest = None
    tmp = tempfile.mkdtemp(prefix="erofs-convert-", dir=work_dir)
    try:
        out = output_dir or os.path.join(tmp, "out")
        os.makedirs(out, exist_ok=True)
        blob_dir = out
        boots, id_map, layers = [], {}, []
        tar_bytes = comp_bytes = 0
        for i, desc in enumerate(src.layers):
            boot = os.path.join(tmp, f"layer{i}.boot")
            stream = src.open_layer(desc)
            try:
                r = pack_tar(stream, boot, blob_dir, opts, source_type="auto",
                             whiteout_spec="oci", mark_implied=True)
                stream.finish()
            finally:
                stream.close()
            tar_bytes += r["tar_bytes"]
            comp_bytes += desc.size
            boots.append(boot)
            info = {"source": desc.digest, "size": desc.size, "tar_bytes": r["tar_bytes"],
                    "entries": r["entries"], "blob": None}
            if r["blob_id"]:
                path = os.path.join(blob_dir, r["blob_id"])
                digest, _ = _file_sha256(path)
                hexd = digest_hex(digest)
                os.replace(path, os.path.join(blob_dir, hexd))
                id_map[r["blob_id"]] = hexd
                info["blob"] = hexd
            layers.append(info)
            if log:
                log(f"layer {i + 1}/{len(src.layers)} {desc.digest[:19]}: "
                    f"{r['tar_bytes']} tar bytes, blob {info['blob'] or '-'}")
        merged = os.path.join(out, "image.boot")
        m = merge(boots, merged, blob_ids=id_map)
        from erofs_tools.builder.chunk_dict import BootstrapTables
        blobs = BootstrapTables.read(merged).blobs
        convert_seconds = time.monotonic() - t0
        dest = Destination(dst_ref, insecure=insecure, client_kw=client_kw)
        index_platform = None
        if src.index_entry is not None and src.index_entry.platform:
            index_platform = {k: v for k, v in src.index_entry.platform.items()
                              if k != "os.features"}
        extra = [copy_source_image(src, dest, tmp)] if merge_platform else []
        res = publish(dest, merged, blobs, blob_dir, config=src.config,
                      platform=src.platform,
                      as_index=src.index is not None or merge_platform,
                      index_platform=index_platform, extra_entries=extra)
        res.update(source=str(src.ref), destination=str(dest.ref), layers=layers,
                   blobs=[b.blob_id for b in blobs], inodes=m["inodes"],
                   tar_bytes=tar_bytes, compressed_layer_bytes=comp_bytes,
                   convert_seconds=round(convert_seconds, 3),
                   seconds=round(time.monotonic() - t0, 3),
                   bootstrap=merged if output_dir else None)
        return res
    finally:
        src.close()
        if dest is not None:
            dest.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- push / pull --------------------------------------------------------------------------

def push_nydus(bootstrap, blob_dir, dst_ref, *, insecure=False, platform=None,
               client_kw=None, work_dir=None):
    """Push BOOTSTRAP and its blobs from BLOB_DIR as a Nydus image at DST_REF.

    Blobs are pushed under the sha256 of their files; a bootstrap naming a blob
    otherwise (our pack's own id) is pushed with the ids rewritten."""
    from erofs_tools.builder.cache import find_blob
    from erofs_tools.builder.chunk_dict import BootstrapTables
    os_name, arch = _platform(platform)
    t = BootstrapTables.read(bootstrap)
    tmp = tempfile.mkdtemp(prefix="erofs-push-", dir=work_dir)
    dest = Destination(dst_ref, insecure=insecure, client_kw=client_kw)
    try:
        mapping, links = {}, os.path.join(tmp, "blobs")
        os.makedirs(links)
        for b in t.blobs:
            try:
                path = find_blob(blob_dir, b.blob_id)
            except ErofsToolsError:
                path = None
            if path is None or not os.path.exists(path):
                continue           # must already be in the destination (publish checks)
            digest, size = _file_sha256(path)
            if size != b.compressed_size:
                raise CorruptImageError(f"blob {path}: {size} bytes, the bootstrap says "
                                        f"{b.compressed_size}")
            hexd = digest_hex(digest)
            mapping[b.blob_id] = hexd
            os.symlink(os.path.abspath(path), os.path.join(links, hexd))
        boot = bootstrap
        if any(k != v for k, v in mapping.items()):
            boot = os.path.join(tmp, "image.boot")
            rewrite_blob_ids(bootstrap, boot, mapping)
        blobs = BootstrapTables.read(boot).blobs
        res = publish(dest, boot, blobs, links, config=None,
                      platform={"os": os_name, "architecture": arch})
        res["blob_ids"] = mapping
        return res
    finally:
        dest.close()
        shutil.rmtree(tmp, ignore_errors=True)


def pull_nydus(src_ref, out_dir, *, blobs=False, insecure=False, platform=None,
               client_kw=None):
    """Fetch a Nydus image's bootstrap into OUT_DIR/image.boot (and its blobs into
    OUT_DIR/<blob id> with blobs=True, verified, skipping ones already there)."""
    from erofs_tools.builder.chunk_dict import BootstrapTables
    os_name, arch = _platform(platform)
    ref = parse_reference(src_ref)
    os.makedirs(out_dir, exist_ok=True)
    client = layout = None
    if isinstance(ref, LayoutReference):
        layout = OciLayout(ref.path)
        m = layout.get_manifest(layout.resolve(ref.tag).digest)
        if m.is_index:
            m = layout.get_manifest(_nydus_entry(m, os_name, arch).digest)
    else:
        client = RegistryClient.for_reference(ref, insecure=insecure, **(client_kw or {}))
    try:
        if client is not None:
            m = client.get_manifest(ref.repository, ref.ref)
            if m.is_index:
                m = client.get_manifest(ref.repository, _nydus_entry(m, os_name, arch).digest)
            if m.is_index:
                raise InputError(f"{ref}: nested index is not supported")
        layers = m.layers()
        boots = [d for d in layers
                 if d.annotations.get(mt.ANNOTATION_NYDUS_BOOTSTRAP) == "true"]
        if len(boots) != 1:
            raise InputError(f"{ref}: not a Nydus image (no bootstrap layer)")
        bd = boots[0]
        if bd.size > MAX_BOOTSTRAP:
            raise CorruptImageError(f"{ref}: bootstrap layer of {bd.size} bytes is too large")
        if client is not None:
            data = client.get_blob(ref.repository, bd.digest, max_size=bd.size)
        else:
            data = layout.read_blob(bd.digest, bd.size)
        boot = extract_bootstrap(data, f"{ref} bootstrap layer")
        path = os.path.join(out_dir, "image.boot")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(boot)
        os.replace(tmp, path)
        t = BootstrapTables.read(path)
        blob_layers = {d.digest: d for d in layers if d.media_type == mt.NYDUS_BLOB}
        fetched = []
        if blobs:
            for b in t.blobs:
                digest = "sha256:" + b.blob_id
                d = blob_layers.get(digest)
                size = d.size if d is not None else b.compressed_size
                dst = os.path.join(out_dir, b.blob_id)
                if os.path.exists(dst) and os.path.getsize(dst) == size and \
                        _file_sha256(dst)[0] == digest:
                    fetched.append({"blob_id": b.blob_id, "how": "exists"})
                    continue
                if client is not None:
                    client.pull_blob(ref.repository, digest, dst, max_size=size)
                else:
                    with layout.open_blob(digest) as f, open(dst + ".tmp", "wb") as o:
                        shutil.copyfileobj(f, o)
                    if _file_sha256(dst + ".tmp")[0] != digest:
                        os.unlink(dst + ".tmp")
                        raise CorruptImageError(f"{ref}: blob {digest} digest mismatch")
                    os.replace(dst + ".tmp", dst)
                fetched.append({"blob_id": b.blob_id, "how": "pulled"})
        return {"manifest": m.digest, "bootstrap": path,
                "blobs": [b.blob_id for b in t.blobs], "fetched": fetched}
    finally:
        if client is not None:
            client.close()


def _nydus_entry(index, os_name, arch):
    try:
        return select_platform(index, os_name, arch, nydus=True)
    except CorruptImageError:
        return select_platform(index, os_name, arch)
