"""`convert --oci-ref`: index a gzip OCI image where it is (docs/zran.md).

Each gzip layer of SRC is streamed once (registry range reads or an `oci:` layout, its
digest verified at the end) through builder/zran.py, which writes the layer's bootstrap
and its zran meta blob; the layer bootstraps are merged. DST gets a small image whose
layers are SRC's gzip layers, by digest (already there, mounted across repositories of
one registry, or copied only when DST is elsewhere), then each layer's meta blob (a Nydus
blob layer, annotated as zran meta: the daemon's backends fetch it by digest like any
blob), then the bootstrap layer (`image/image.boot`). SRC is only read.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from ..errors import InputError
from . import mediatypes as mt
from .convert import SourceImage, place_blob
from .manifest import Descriptor, build_manifest
from .nydus_push import Destination, bootstrap_layer, nydus_config

GZIP_LAYER_TYPES = {mt.OCI_LAYER_TAR_GZIP, mt.DOCKER_LAYER_TAR_GZIP,
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}
ANNOTATION_ZRAN = "org.erofs-tools.zran"
ANNOTATION_ZRAN_META = "org.erofs-tools.zran-meta"


def convert_oci_ref(src_ref: str, dst_ref: str, *, insecure: bool | None = None,
                    platform: str | None = None, chunk_size: int = 1 << 20,
                    span: int | None = None, digester: str = "blake3",
                    output_dir: str | None = None, work_dir: str | None = None,
                    client_kw: dict[str, Any] | None = None, log: Any = None
                    ) -> dict[str, Any]:
    """Index SRC_REF's gzip layers and publish the index image at DST_REF; -> summary.
    output_dir keeps image.boot and the meta blobs (named by sha256)."""
    from erofs_tools.builder.merge import merge
    from erofs_tools.builder.zran import SPAN_DEFAULT, check_span, pack_zran_layer
    t0 = time.monotonic()
    span = span or SPAN_DEFAULT
    check_span(span, chunk_size)
    src = SourceImage(src_ref, insecure=insecure, platform=platform, client_kw=client_kw)
    dest = None
    try:
        for d in src.layers:
            if d.media_type not in GZIP_LAYER_TYPES:
                raise InputError(f"{src.ref}: layer {d.digest} is {d.media_type}, not gzip: "
                                 "--oci-ref indexes gzip layers only")
        dest = Destination(dst_ref, insecure=insecure, client_kw=client_kw)
        if dest.client is not None:
            dest.client.ping()
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".erofs-zran-", dir=work_dir or output_dir or None)
        try:
            return _run(src, dest, tmp, t0, chunk_size, span, digester, output_dir, log,
                        merge, pack_zran_layer)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        src.close()
        if dest is not None:
            dest.close()


def _run(src: SourceImage, dest: Destination, tmp: str, t0: float, chunk_size: int,
         span: int, digester: str, output_dir: str | None, log: Any, merge: Any,
         pack_zran_layer: Any) -> dict[str, Any]:
    meta_dir = os.path.join(tmp, "meta")
    os.mkdir(meta_dir)
    boots, layers, metas = [], [], []
    for i, desc in enumerate(src.layers):
        boot = os.path.join(tmp, f"layer{i}.boot")
        stream = src.open_layer(desc)
        try:
            r = pack_zran_layer(stream, desc.digest, desc.size, boot, meta_dir,
                                chunk_size=chunk_size, span=span, digester=digester)
            stream.finish()               # the whole layer was read: verify its digest
        finally:
            stream.close()
        boots.append(boot)
        if r["meta_blob"]:
            metas.append(os.path.join(meta_dir, r["meta_blob"]))
        layers.append({"digest": desc.digest, "size": desc.size, "tar_bytes": r["tar_bytes"],
                       "entries": r["entries"], "chunks": r["chunks_new"],
                       "contexts": r["contexts"], "meta_blob": r["meta_blob"],
                       "meta_size": r["meta_size"]})
        if log:
            log(f"layer {i + 1}/{len(src.layers)} {desc.digest[:19]}: {r['tar_bytes']} tar "
                f"bytes, {r['contexts']} access points, meta {r['meta_size']} bytes")
    merged = os.path.join(tmp, "image.boot")
    m = merge(boots, merged)
    index_seconds = time.monotonic() - t0
    placed = [place_blob(src, dest, d, tmp) for d in src.layers]
    meta_descs = [dest.push_blob(p, "sha256:" + os.path.basename(p), mt.NYDUS_BLOB,
                                 {mt.ANNOTATION_NYDUS_BLOB: "true", ANNOTATION_ZRAN_META: "true"})
                  for p in metas]
    boot_gz, boot_diff = bootstrap_layer(merged)
    # the gzip layers' diff_ids are their own digests, as any Nydus data blob's, not
    # SRC's uncompressed digests: containerd commits them as empty data-blob snapshots
    # under the chain IDs the diff_ids make, and with SRC's it took those empty
    # snapshots for SRC's unpacked layers (SRC pulled after DST ran on an empty rootfs)
    diff_ids = [d.digest for d in src.layers] + [d.digest for d in meta_descs]
    cfg = nydus_config(src.config, diff_ids, boot_diff, src.platform)
    cfg_desc = dest.push_blob(cfg, "sha256:" + hashlib.sha256(cfg).hexdigest(), mt.OCI_CONFIG)
    boot_desc = dest.push_blob(boot_gz, "sha256:" + hashlib.sha256(boot_gz).hexdigest(),
                               mt.OCI_LAYER_TAR_GZIP,
                               {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true",
                                mt.ANNOTATION_NYDUS_FS_VERSION: "6", ANNOTATION_ZRAN: "true"})
    # the layers as they are; annotated as data blobs of the Nydus image (the snapshotter
    # then commits them without a download and serves them lazily)
    layer_descs = [Descriptor(d.media_type, d.digest, d.size,
                              {**d.annotations, mt.ANNOTATION_NYDUS_BLOB: "true",
                               ANNOTATION_ZRAN: "true"}) for d in src.layers]
    manifest = build_manifest(cfg_desc, layer_descs + meta_descs + [boot_desc],
                              media_type=mt.OCI_MANIFEST)
    dest.put_manifest(manifest, src.platform)
    res: dict[str, Any] = {
        "source": str(src.ref), "destination": str(dest.ref), "manifest": manifest.digest,
        "bootstrap_layer": boot_desc.digest, "bootstrap_layer_size": len(boot_gz),
        "layers": layers, "layers_placed": placed, "inodes": m["inodes"],
        "compressed_layer_bytes": sum(d.size for d in src.layers),
        "meta_bytes": sum(x["meta_size"] for x in layers),
        "index_seconds": round(index_seconds, 3),
        "seconds": round(time.monotonic() - t0, 3), "bootstrap": None}
    if output_dir:
        from .convert import deliver
        res["bootstrap"] = deliver(merged, meta_dir, [os.path.basename(p) for p in metas],
                                   output_dir)
    return res

