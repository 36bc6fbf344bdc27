"""Shared helpers for the storage/daemon tests: synthetic RAFS blobs and counting
backends. (No tests here.)"""

import os
import random
import shutil
import threading
import time

import blake3
import zstandard
from helpers import NYDUS_VECTORS

from erofs_tools.builder.blob import BlobWriter
from fscache_daemon.storage.backends import LocalFsBackend

NYDUS = str(NYDUS_VECTORS)
NYDUS_BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
NYDUS_BLOB = os.path.join(NYDUS, "blobs", NYDUS_BLOB_ID)
NYDUS_BOOT = os.path.join(NYDUS, "rafs-v6-2.2.boot")


def chunk_bytes(rng, size):
    # half compressible text, half random, so zstd does something but not everything
    words = [b"erofs", b"chunk", b"fscache", b"daemon", b"lazy", b"\n"]
    out = bytearray()
    while len(out) < size // 2:
        out += rng.choice(words)
    out += rng.randbytes(size - len(out)) if size > len(out) else b""
    return bytes(out[:size])


def make_blob(directory, nchunks, chunk_size=65536, compressor="zstd", seed=1,
              last_size=None):
    """A RAFS v6 data blob in `directory`; -> (blob_id, [chunk data])."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    w = BlobWriter(directory, chunk_size, compressor=compressor)
    datas = []
    cctx = zstandard.ZstdCompressor(level=3)
    for i in range(nchunks):
        size = chunk_size if i < nchunks - 1 else (last_size or chunk_size // 2 + 123)
        data = chunk_bytes(rng, size)
        stored = data
        if compressor == "zstd":
            z = cctx.compress(data)
            if len(z) < len(data):
                stored = z
        w.add_chunk(stored, len(data), blake3.blake3(data).digest())
        datas.append(data)
    info = w.finish()
    return info.blob_id, datas


def copy_backend_dir(src_blob, directory):
    os.makedirs(directory, exist_ok=True)
    dst = os.path.join(directory, os.path.basename(src_blob))
    shutil.copyfile(src_blob, dst)
    return dst


def corrupt(path, offset, nbytes=1):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


class CountingBackend(LocalFsBackend):
    """localfs that records every read and can be slowed down or made to fail."""

    def __init__(self, directory, delay=0.0):
        super().__init__(directory)
        self.delay = delay
        self.reads = []
        self.fail = None
        self._rl = threading.Lock()

    def read(self, blob_id, offset, length):
        with self._rl:
            self.reads.append((blob_id, offset, length))
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return super().read(blob_id, offset, length)

    @property
    def bytes_read(self):
        return sum(r[2] for r in self.reads)
