"""OCI image-layout directories (``oci:PATH`` references): ``oci-layout``, ``index.json``
and content-addressed ``blobs/sha256/<hex>``.

Writes are atomic per file (fsutil: an O_EXCL temporary file in the same directory,
then rename), and every blob or manifest read back is verified against its digest: a
layout directory is input we do not trust any more than a registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import BinaryIO

from ..errors import CorruptImageError, InputError
from ..fsutil import atomic_write_bytes, create_exclusive
from . import mediatypes as mt
from .digest import READ_SIZE, check_digest, digest_hex, verify
from .manifest import MAX_MANIFEST_SIZE, Descriptor, Manifest, build_index, media_type_of

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"


class OciLayout:
    """An OCI image-layout directory. ``OciLayout(path, create=True)`` makes one."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = os.fspath(path)
        marker = os.path.join(self.path, LAYOUT_FILE)
        if create and not os.path.exists(marker):
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
            atomic_write_bytes(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
            atomic_write_bytes(self._index_path, build_index([]).data)
        try:
            with open(marker, "rb") as f:
                version = json.load(f).get("imageLayoutVersion")
        except FileNotFoundError:
            raise InputError(f"{self.path}: not an OCI image layout (no {LAYOUT_FILE})") \
                from None
        except (OSError, ValueError, AttributeError):
            raise CorruptImageError(f"{marker}: unreadable") from None
        if version != LAYOUT_VERSION:
            raise CorruptImageError(f"{marker}: unsupported layout version {version!r}")

    def __repr__(self) -> str:
        return f"OciLayout({self.path!r})"

    @property
    def _index_path(self) -> str:
        return os.path.join(self.path, "index.json")

    # --- blobs ----------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.path, "blobs", "sha256", digest_hex(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for reading (unverified; read_blob/copy_blob verify)."""
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise InputError(f"{self.path}: blob {digest} not in layout") from None

    def read_blob(self, digest: str, max_size: int | None = None) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read() if max_size is None else f.read(max_size + 1)
        if max_size is not None and len(data) > max_size:
            raise CorruptImageError(f"{self.path}: blob {digest} larger than {max_size}")
        verify(digest, "sha256:" + hashlib.sha256(data).hexdigest(),
               f"{self.path}: blob {digest}")
        return data

    def write_blob(self, source, digest: str | None = None) -> Descriptor:
        """Store bytes, a file path or a binary stream; returns an octet-stream
        descriptor (callers set the media type). A given digest is verified."""
        if digest is not None and self.has_blob(check_digest(digest)):
            return Descriptor("application/octet-stream", digest,
                              os.path.getsize(self.blob_path(digest)))
        blobs = os.path.join(self.path, "blobs", "sha256")
        os.makedirs(blobs, exist_ok=True)
        # The name follows from the content: written under a fresh O_EXCL name, renamed
        # once the digest is known.
        fd, tmp = create_exclusive(blobs, ".blob-")
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in _iter_source(source):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            got = "sha256:" + h.hexdigest()
            if digest is not None:
                verify(digest, got, f"{self.path}: writing blob")
            os.replace(tmp, self.blob_path(got))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return Descriptor("application/octet-stream", got, size)

    # --- manifests and the index -------------------------------------------------------

    def index(self) -> Manifest:
        try:
            with open(self._index_path, "rb") as f:
                data = f.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            raise CorruptImageError(f"{self.path}: no index.json") from None
        what = f"{self._index_path}"
        return Manifest(data, media_type_of(data, mt.OCI_INDEX, what),
                        "sha256:" + hashlib.sha256(data).hexdigest())

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The index entry named ``tag`` (ref.name annotation); without a tag, the only
        entry (or the one tagged ``latest``)."""
        entries = self.index().manifests()
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            tag = "latest"
        for d in entries:
            if d.annotations.get(REF_NAME) == tag:
                return d
        raise InputError(f"{self.path}: no image tagged {tag!r}")

    def get_manifest(self, digest: str) -> Manifest:
        data = self.read_blob(digest, MAX_MANIFEST_SIZE)
        return Manifest(data, media_type_of(data, None, f"{self.path}: manifest {digest}"),
                        digest)

    def put_manifest(self, manifest: Manifest, tag: str | None = None,
                     platform: dict | None = None) -> Descriptor:
        """Store a manifest blob and list it in index.json (replacing an entry with the
        same tag)."""
        self.write_blob(manifest.data, manifest.digest)
        desc = Descriptor(manifest.media_type, manifest.digest, len(manifest.data),
                          {REF_NAME: tag} if tag else {}, platform)
        index = self.index()
        entries = [d for d in index.manifests()
                   if not (tag and d.annotations.get(REF_NAME) == tag)
                   and not (not tag and d.digest == manifest.digest and not d.annotations)]
        annotations = index.json.get("annotations")
        atomic_write_bytes(self._index_path,
                      build_index(entries + [desc], annotations=annotations).data)
        return desc


def _iter_source(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            while chunk := f.read(READ_SIZE):
                yield chunk
    else:
        while chunk := source.read(READ_SIZE):
            yield chunk
