"""`convert`: OCI/Docker images to Nydus RAFS v6 images (ecosystem.md §2).

Every layer tar(.gz|.zst) is streamed from the registry (or an `oci:PATH` layout)
straight into `pack --type tar` (no layer is stored on disk, only the blob it becomes),
the layer bootstraps are merged with the blobs renamed to the sha256 of their files, and
the Nydus image is published (nydus_push.py: layers, config, manifest). If the source
reference is an index, the destination gets an index too, with the Nydus manifest marked
by `artifactType` and the `nydus.remoteimage.v1` OS feature. With merge_platform the
index also lists the source manifest (copied with its blobs, mounted across repositories
of one registry when it allows), so runtimes without Nydus support pick that one.

All work happens in a private temporary directory (inside the output directory when one
is given, so the results move there by rename); the output directory gets each finished
file under its final name at the end, so two converts into one directory never write
the same temporary name.
"""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time

from ..builder.tar_stream import put_while_read, stop_reader
from ..errors import CorruptImageError, ErofsToolsError, InputError, RegistryError
from ..fsutil import atomic_output, fsync_dir
from . import mediatypes as mt
from .client import RegistryClient
from .digest import digest_hex, verify
from .manifest import (
    Descriptor,
    parse_platform,
    platform_variant,
    resolve_index,
    select_platform,
)
from .nydus_push import Destination, file_sha256, publish
from .oci_layout import OciLayout
from .reference import LayoutReference, default_insecure, parse_reference

MAX_CONFIG = 16 << 20
STREAM_PIECE = 8 << 20
LAYER_TYPES = {mt.OCI_LAYER_TAR, mt.OCI_LAYER_TAR_GZIP, mt.OCI_LAYER_TAR_ZSTD,
               mt.DOCKER_LAYER_TAR_GZIP, "application/vnd.docker.image.rootfs.diff.tar",
               "application/vnd.oci.image.layer.nondistributable.v1.tar",
               "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}


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


class _Stopped(Exception):
    """The reader closed: the fetch thread stops."""


class _RegistryBlobReader(_VerifyingReader):
    """The layer read on a background thread (one piece ahead)."""

    def __init__(self, client, repo, desc, piece=STREAM_PIECE):
        super().__init__(desc, f"layer {desc.digest}")
        self.q = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._fetch, args=(client, repo, desc, piece),
                                  name="erofs-layer-fetch", daemon=True)
        self.t.start()

    def _fetch(self, client, repo, desc, piece):
        # One GET for the whole layer (resumed with Range if the connection breaks), as
        # containerd pulls a layer, handed on in pieces. Range reads of one piece each
        # made a server that ignores Range (a cold pull-through mirror answers 200 with
        # the whole blob) send the layer from its start again for every piece: a 1 GiB
        # layer in 8 MiB pieces was 64 GiB on the wire.
        held = []
        size = 0

        def sink(chunk):
            nonlocal size
            if self.stop.is_set():
                raise _Stopped
            held.append(chunk)
            size += len(chunk)
            if size >= piece:
                self._put(b"".join(held))
                held.clear()
                size = 0
        try:
            client.read_blob(repo, desc.digest, sink, max_size=desc.size)
            if held:
                self._put(b"".join(held))
            self._put(b"")
        except _Stopped:
            pass
        except BaseException as e:          # handed to the reading thread
            self._put(e)

    def _put(self, item):
        put_while_read(self.q, item, self.stop)

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
        stop_reader(self.q, self.stop, self.t, timeout=5)


class SourceImage:
    """An image to convert: manifest, config, and a way to stream each layer."""

    def __init__(self, ref_text, *, insecure=None, platform=None, client_kw=None):
        self.ref = parse_reference(ref_text)
        os_name, arch = parse_platform(platform)
        variant = platform_variant(platform)
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
                layout = self.layout
                self.index_entry, m = resolve_index(
                    m, lambda i: select_platform(i, os_name, arch, nydus=False,
                                                 variant=variant),
                    layout.get_manifest, lambda c: layout.read_blob(c.digest, MAX_CONFIG),
                    (os_name, arch, variant))
            self.manifest = m
            cd = m.config()
            self.config = self.layout.read_blob(cd.digest, MAX_CONFIG)
        else:
            self.layout = None
            self.client = RegistryClient.for_reference(
                self.ref, insecure=default_insecure(self.ref.api_host, insecure),
                                                       **(client_kw or {}))
            repo = self.ref.repository
            m = self.client.get_manifest(repo, self.ref.ref)
            if m.is_index:
                self.index = m
                client = self.client
                self.index_entry, m = resolve_index(
                    m, lambda i: select_platform(i, os_name, arch, nydus=False,
                                                 variant=variant),
                    lambda digest: client.get_manifest(repo, digest),
                    lambda c: client.get_blob(repo, c.digest, max_size=MAX_CONFIG),
                    (os_name, arch, variant))
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


# --- convert ---------------------------------------------------------------------------

def place_blob(src, dest, d, work_dir) -> str:
    """Make the destination hold blob `d` of the source unchanged: -> how ("exists",
    "mounted": cross-repository mount on the same registry, "copied")."""
    if dest.has(d.digest):
        return "exists"
    if dest.client is not None and src.client is not None and \
            src.ref.api_host == dest.ref.api_host and \
            dest.client.mount_blob(dest.ref.repository, d.digest, src.ref.repository):
        return "mounted"
    if src.layout is not None:
        dest.push_blob(src.layout.blob_path(d.digest), d.digest, d.media_type)
        return "copied"
    # work_dir is this run's private directory: pull_blob writes there atomically.
    tmp = os.path.join(work_dir, "copy-" + digest_hex(d.digest))
    try:
        src.client.pull_blob(src.ref.repository, d.digest, tmp, max_size=d.size)
        dest.push_blob(tmp, d.digest, d.media_type)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return "copied"


def copy_source_image(src, dest, work_dir):
    """Put the source manifest and its blobs into the destination (for an index that
    lists both); -> the manifest's index entry."""
    for d in src.manifest.blobs():
        place_blob(src, dest, d, work_dir)
    dest.put_manifest(src.manifest, by_digest=True)
    plat = dict(src.index_entry.platform) if src.index_entry is not None and \
        src.index_entry.platform else dict(src.platform)
    return Descriptor(src.manifest.media_type, src.manifest.digest, len(src.manifest.data),
                      platform=plat)


def convert(src_ref, dst_ref, *, insecure=None, chunk_dicts=(), platform=None,
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
    try:
        # Reach the destination before the work, not after it.
        dest = Destination(dst_ref, insecure=insecure, client_kw=client_kw)
        if dest.client is not None:
            dest.client.ping()
    except BaseException:
        src.close()
        if dest is not None:
            dest.close()
        raise
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    # Private to this run; inside the output directory unless told otherwise, so that
    # finished blobs move there by rename.
    tmp = tempfile.mkdtemp(prefix=".erofs-convert-", dir=work_dir or output_dir or None)
    try:
        blob_dir = os.path.join(tmp, "blobs")
        os.mkdir(blob_dir)
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
                digest, _ = file_sha256(path)
                hexd = digest_hex(digest)
                os.replace(path, os.path.join(blob_dir, hexd))
                id_map[r["blob_id"]] = hexd
                info["blob"] = hexd
            layers.append(info)
            if log:
                log(f"layer {i + 1}/{len(src.layers)} {desc.digest[:19]}: "
                    f"{r['tar_bytes']} tar bytes, blob {info['blob'] or '-'}")
        merged = os.path.join(tmp, "image.boot")
        m = merge(boots, merged, blob_ids=id_map)
        from erofs_tools.builder.chunk_dict import BootstrapTables
        blobs = BootstrapTables.read(merged).blobs
        convert_seconds = time.monotonic() - t0
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
                   bootstrap=None)
        if output_dir:
            res["bootstrap"] = deliver(merged, blob_dir, [b.blob_id for b in blobs],
                                       output_dir)
        return res
    finally:
        src.close()
        if dest is not None:
            dest.close()
        shutil.rmtree(tmp, ignore_errors=True)




def deliver(bootstrap: str, blob_dir: str, blob_ids: list[str], out_dir: str) -> str:
    """Put the finished bootstrap (as image.boot) and the blobs made by this run into
    OUT_DIR under their final names: each complete and fsynced before its name appears,
    never through a temporary name another run could share. -> the bootstrap's path."""
    same_fs = os.stat(blob_dir).st_dev == os.stat(out_dir).st_dev
    for blob_id in blob_ids:
        src = os.path.join(blob_dir, blob_id)
        if not os.path.exists(src):
            continue                        # in the destination already (chunk dicts)
        dst = os.path.join(out_dir, blob_id)
        if same_fs:
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src, dst)
        else:
            _copy_atomic(src, dst)
    if same_fs:
        fsync_dir(out_dir)
    path = os.path.join(out_dir, "image.boot")
    _copy_atomic(bootstrap, path)
    return path


def _copy_atomic(src: str, dst: str) -> None:
    with open(src, "rb") as f, atomic_output(dst, mode=0o644) as out:
        shutil.copyfileobj(f, out, 1 << 20)
