"""Data of extra devices (blobs): where the reader finds the bytes behind chunk indexes.

A device is served either from a Nydus data blob (compressed chunks located through the
blob's CI table, every chunk decoded and digest-checked) or from a raw, uncompressed
device file (the kernel's view: a blob cache file, or a mkfs.erofs --blobdev image).
"""
from __future__ import annotations

import os
from collections import OrderedDict

from erofs_tools.errors import CorruptImageError, InputError
from erofs_tools.format import rafs
from erofs_tools.reader.blob import BlobMeta, decode_chunk, file_reader, read_zran_chunk
from erofs_tools.reader.zran import open_meta as open_zran_meta


class _RawDevice:
    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.f = open(self.path, "rb")
        except OSError as e:
            raise InputError(f"{self.path}: cannot open ({e.strerror})") from None
        self.size = os.fstat(self.f.fileno()).st_size
        self.read_at = file_reader(self.f)
        self.meta = None

    def read(self, offset, length):
        if offset < 0 or offset + length > self.size:
            raise CorruptImageError(
                f"{self.path}: range [{offset}, {offset + length}) outside the device "
                f"({self.size} bytes)")
        return self.read_at(offset, length)

    def close(self):
        self.f.close()


class _NydusDevice:
    CACHE = 8

    def __init__(self, path, meta: BlobMeta, f, verify=True):
        self.path = os.fspath(path)
        self.meta = meta
        self.f = f
        self.read_at = file_reader(f)
        self.verify = verify
        self._cache: OrderedDict[int, bytes] = OrderedDict()     # CI index -> chunk data

    def chunk_data(self, c):
        d = self._cache.get(c.index)
        if d is not None:
            self._cache.move_to_end(c.index)
            return d
        if self.meta.zran is not None:
            d = read_zran_chunk(self.meta, c, self.read_at, self.verify)
        else:
            raw = self.read_at(c.compressed_offset, c.compressed_size)
            d = decode_chunk(self.meta, c, raw, self.verify)
        self._cache[c.index] = d
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return d

    def read(self, offset, length):
        """Bytes [offset, offset+length) of the uncompressed (cache-file) view."""
        m = self.meta
        if offset < 0 or offset + length > m.uncompressed_size:
            raise CorruptImageError(
                f"blob {m.blob_id}: range [{offset}, {offset + length}) outside its "
                f"uncompressed size {m.uncompressed_size}")
        out = bytearray(length)
        for c in m.chunks_for_range(offset, length):
            data = self.chunk_data(c)
            a = max(offset, c.uncompressed_offset)
            b = min(offset + length, c.uncompressed_offset + c.uncompressed_size)
            if b > a:
                out[a - offset:b - offset] = data[a - c.uncompressed_offset:b - c.uncompressed_offset]
        return bytes(out)

    def close(self):
        self.f.close()


def open_nydus_blob(path, image=None, blob_index=None, blob_id=None):
    """(BlobMeta, open file) of a Nydus data blob, using the bootstrap's blob entry and
    chunk-info digests when `image` is given."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    try:
        size = os.fstat(f.fileno()).st_size
        entry = None
        digests = None
        if image is not None and blob_index is not None and blob_index < len(image.blob_entries):
            entry = image.blob_entries[blob_index]
            digests = image.blob_digests(blob_index)
        if entry is not None and entry.features & rafs.BLOB_FEATURE_ZRAN:
            # the layer itself; its index is in the meta blob beside it (reader/zran.py)
            if size != entry.compressed_size:
                raise CorruptImageError(f"{path}: {size} bytes, the blob table says "
                                        f"{entry.compressed_size}")
            meta = open_zran_meta(os.path.dirname(os.path.abspath(path)), entry,
                                  blob_id or entry.blob_id.decode("ascii", "replace"),
                                  digests)
            return meta, f
        meta = BlobMeta.from_blob(file_reader(f), size, blob_id, entry, digests=digests)
        if digests:
            # the bootstrap's digests must agree with the blob's own
            for c in meta.chunks:
                d = digests.get(c.index)
                if d is not None and c.digest is not None and d != c.digest:
                    raise CorruptImageError(
                        f"blob {meta.blob_id}: chunk {c.index} digest differs between the "
                        "blob and the bootstrap's chunk info table")
            meta = meta.with_digests(digests) if any(c.digest is None for c in meta.chunks) else meta
        return meta, f
    except BaseException:
        f.close()
        raise


class BlobSource:
    """Serves extra devices of one image.

    `devices`: raw device files in device order (device 1 first) or {device: path};
    `blob_dir`: a directory holding blobs named by their device tag / blob id (Nydus blobs
    for RAFS images, raw device files for plain EROFS images).
    """

    def __init__(self, image, blob_dir=None, devices=None, verify=True, blob_files=None):
        self.image = image
        self.blob_files = dict(blob_files or {})    # device -> path of a Nydus blob
        self.blob_dir = os.fspath(blob_dir) if blob_dir is not None else None
        if isinstance(devices, dict):
            self.device_paths = dict(devices)
        else:
            self.device_paths = {i + 1: p for i, p in enumerate(devices or [])}
        self.verify = verify
        self._open = {}

    def path_of(self, device):
        if device in self.device_paths:
            return self.device_paths[device], "raw"
        if device in self.blob_files:
            return self.blob_files[device], "nydus"
        if self.blob_dir is None:
            return None, None
        tag = self.image.blob_id(device)
        if not tag or "/" in tag or tag in (".", ".."):
            return None, None
        p = os.path.join(self.blob_dir, tag)
        if os.path.exists(p):
            return p, "nydus" if self.image.is_rafs else "raw"
        return None, None

    def device(self, device):
        d = self._open.get(device)
        if d is not None:
            return d
        path, kind = self.path_of(device)
        if path is None:
            tag = self.image.blob_id(device) if 1 <= device <= len(self.image.devices) else "?"
            where = f" in {self.blob_dir}" if self.blob_dir else ""
            raise InputError(f"{self.image.name}: blob {tag or '(no tag)'} (device {device}) "
                             f"not found{where}")
        if kind == "raw":
            d = _RawDevice(path)
        else:
            bid = self.image.blob_id(device)
            if device in self.blob_files:
                bid = None      # a blob given by path (e.g. one carrying its own bootstrap)
            meta, f = open_nydus_blob(path, self.image, device - 1, bid)
            d = _NydusDevice(path, meta, f, self.verify)
        self._open[device] = d
        return d

    def meta(self, device):
        """BlobMeta of a Nydus blob device, or None for a raw device."""
        return self.device(device).meta

    def read(self, image, device, offset, length):
        return self.device(device).read(offset, length)

    def close(self):
        for d in self._open.values():
            d.close()
        self._open.clear()
