"""Nydus images in a destination: the bootstrap layer, the image config, publishing a
bootstrap and its blobs to a registry repository or an OCI layout, and `push`.

Blob ids: a blob is stored in the registry under the sha256 of its file, and the pushed
bootstrap names every blob by that digest (hex), as nydus does (rafs-v6.md §11): the
daemon's registry backend then fetches `/v2/<repo>/blobs/sha256:<blob id>` directly, and
a pulled blob directory is laid out by blob id. Our blob writer's own id (sha256 of the
blob without its digest array) differs, so convert and push rename the blobs in the
bootstrap they push (merge with a blob id map / a rewrite of the device and blob tables
through the format layer's records); the local files are renamed to match.

Layers: each Nydus blob layer has media type `application/vnd.oci.image.layer.nydus.blob.v1`
and the annotation `containerd.io/snapshot/nydus-blob: "true"`; the last layer is the
bootstrap layer, a gzip tar holding `image/image.boot` (mode 0444), annotated
`containerd.io/snapshot/nydus-bootstrap: "true"` and `nydus-fs-version: "6"`. The config
is the source config with `rootfs.diff_ids` = blob digests + the sha256 of the
uncompressed bootstrap tar, and a history entry for the bootstrap layer.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

from ..errors import CorruptImageError, ErofsToolsError, InputError
from ..fsutil import atomic_write_bytes
from . import mediatypes as mt
from .client import RegistryClient
from .digest import digest_hex, file_digest
from .manifest import Descriptor, build_index, build_manifest, parse_platform
from .oci_layout import OciLayout
from .reference import LayoutReference, default_insecure, parse_reference

BOOTSTRAP_NAME = "image/image.boot"


# --- the image's pieces ------------------------------------------------------------

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
    # a Nydus source (optimize) already has one: the bootstrap layer is replaced
    hist = [h for h in hist if not (isinstance(h, dict) and
                                    h.get("created_by") == "Nydus Bootstrap Layer")]
    hist.append({"created_by": "Nydus Bootstrap Layer", "comment": "erofs-tools convert"})
    cfg["history"] = hist
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def rewrite_blob_ids(src, dst, mapping):
    """Copy bootstrap SRC to DST with blob ids renamed (device slot tags and blob table
    entries, then the superblock checksum if the image has one)."""
    from erofs_tools._native_sums import sb_checksum
    from erofs_tools.builder.chunk_dict import BootstrapTables
    from erofs_tools.format import erofs as E
    from erofs_tools.format import rafs as R
    t = BootstrapTables.read(src)
    with open(src, "rb") as f:
        buf = bytearray(f.read())
    for i, b in enumerate(t.blobs):
        new = mapping.get(b.blob_id, b.blob_id).encode()
        if len(new) != R.BLOB_ID_LEN:
            raise InputError(f"blob id {new!r} is not {R.BLOB_ID_LEN} characters")
        _patch(buf, E.DeviceSlot, R.DEVT_OFFSET + E.DeviceSlot.SIZE * i, tag=new)
        _patch(buf, R.BlobEntry, t.ext.s_blob_table_offset + R.BlobEntry.SIZE * i,
               blob_id=new)
    if t.sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM:
        _patch(buf, E.SuperBlock, E.SUPER_OFFSET, checksum=sb_checksum(buf[:E.BLKSZ]))
    atomic_write_bytes(dst, bytes(buf))


def _patch(buf: bytearray, record, offset: int, **fields) -> None:
    """Set fields of the record at ``offset`` in place."""
    r = record.decode(buf, offset)
    for k, v in fields.items():
        setattr(r, k, v)
    buf[offset:offset + record.SIZE] = r.encode()


def file_sha256(path):
    with open(path, "rb") as f:
        return file_digest(f)


# --- destinations ----------------------------------------------------------------------

class Destination:
    """Where a Nydus image goes: a registry repository or an OCI layout."""

    def __init__(self, ref_text, *, insecure=None, client_kw=None):
        self.ref = parse_reference(ref_text)
        self.client = None
        self.layout = None
        if isinstance(self.ref, LayoutReference):
            self.layout = OciLayout(self.ref.path, create=True)
        else:
            self.client = RegistryClient.for_reference(
                self.ref, insecure=default_insecure(self.ref.api_host, insecure),
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
            if dest.size_of(digest) is None:
                raise InputError(f"blob {b.blob_id} is neither in {blob_dir} nor in "
                                 f"{dest.ref}")
            # the bootstrap's size, which the digest pins: not the HEAD's Content-Length
            # (a wrong one made a manifest whose layer no runtime can pull)
            size = b.compressed_size
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




# --- push ----------------------------------------------------------------------

def push_nydus(bootstrap, blob_dir, dst_ref, *, insecure=None, platform=None,
               client_kw=None, work_dir=None, config=None):
    """Push BOOTSTRAP and its blobs from BLOB_DIR as a Nydus image at DST_REF (with
    `config`, the bytes of a source image config, its settings kept: command, env...).

    Blobs are pushed under the sha256 of their files; a bootstrap naming a blob
    otherwise (our pack's own id) is pushed with the ids rewritten."""
    from erofs_tools.builder.cache import find_blob
    from erofs_tools.builder.chunk_dict import BootstrapTables
    os_name, arch = parse_platform(platform)
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
            digest, size = file_sha256(path)
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
        res = publish(dest, boot, blobs, links, config=config,
                      platform={"os": os_name, "architecture": arch})
        res["blob_ids"] = mapping
        return res
    finally:
        dest.close()
        shutil.rmtree(tmp, ignore_errors=True)


