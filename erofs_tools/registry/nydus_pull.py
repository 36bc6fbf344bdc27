"""`pull`: a Nydus image's bootstrap (and with blobs=True its blobs) into a directory.

Everything a registry or an OCI layout sends is untrusted, and the output directory may
hold names someone else planted:

- every file is written through fsutil (a fresh O_EXCL temporary file beside the target,
  renamed over it when complete), so a symlink at a final or temporary name is never
  written through, and a failure leaves nothing at the final name;
- the bootstrap layer is downloaded to a temporary file (bounded by its descriptor's size
  and checked against its digest), then read with the project's streaming tar parser under
  a small budget for everything besides the bootstrap's own bytes (PAX records, other
  entries), so a layer built to blow up a tar reader costs bounded memory and time;
- `image.boot` appears only once the extracted bootstrap has been read back as a RAFS v6
  bootstrap;
- a blob's size comes from the bootstrap (whose blob table the kernel will use), not from
  the manifest; a manifest that disagrees is refused, and nothing is fetched that the
  file system cannot hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import CorruptImageError, ErofsToolsError, InputError
from ..fsutil import atomic_output, create_exclusive
from . import mediatypes as mt
from .client import RegistryClient
from .digest import verify
from .manifest import (
    Descriptor,
    Manifest,
    parse_platform,
    platform_variant,
    resolve_index,
    select_platform,
)
from .oci_layout import OciLayout
from .reference import LayoutReference, default_insecure, parse_reference

BOOTSTRAP_NAME = b"image/image.boot"
MAX_BOOTSTRAP = 1 << 30
MAX_CONFIG = 4 << 20           # an image config (JSON) read at most
# Tar bytes besides the bootstrap's data: headers, PAX records, other entries. A real
# bootstrap layer has two headers (image/ and image/image.boot).
META_BUDGET = 1 << 20
# Kept free on the output file system besides what a pull writes.
FREE_SPACE_MARGIN = 64 << 20
PIECE = 1 << 20
_REGULAR = (b"0", b"\0", b"7")


def pull_nydus(src_ref: str, out_dir: str, *, blobs: bool = False,
               insecure: bool | None = None, platform: str | None = None,
               client_kw: dict | None = None, only_blobs=None,
               with_config: bool = False) -> dict:
    """Fetch a Nydus image's bootstrap into OUT_DIR/image.boot (and its blobs into
    OUT_DIR/<blob id> with blobs=True, verified, skipping ones already there; with
    `only_blobs`, a set of blob ids, only those; with `with_config`, the image config's
    bytes under "config")."""
    from erofs_tools.builder.chunk_dict import BootstrapTables
    os_name, arch = parse_platform(platform)
    ref = parse_reference(src_ref)
    os.makedirs(out_dir, exist_ok=True)
    source: _Source
    if isinstance(ref, LayoutReference):
        source = _LayoutSource(OciLayout(ref.path), ref.tag)
    else:
        source = _RegistrySource(RegistryClient.for_reference(
            ref, insecure=default_insecure(ref.api_host, insecure), **(client_kw or {})),
            ref.repository, ref.ref)
    with contextlib.closing(source):
        m = source.manifest(os_name, arch, platform_variant(platform))
        layers = m.layers()
        boots = [d for d in layers
                 if d.annotations.get(mt.ANNOTATION_NYDUS_BOOTSTRAP) == "true"]
        if len(boots) != 1:
            raise InputError(f"{ref}: not a Nydus image (no bootstrap layer)")
        bd = boots[0]
        if bd.size > MAX_BOOTSTRAP:
            raise CorruptImageError(f"{ref}: bootstrap layer of {bd.size} bytes is too large")
        path = os.path.join(out_dir, "image.boot")
        what = f"{ref} bootstrap layer"
        with _scratch(out_dir, ".image.layer.") as (layer, _):
            check_free_space(out_dir, bd.size)
            source.fetch(bd, layer)
            layer.seek(0)
            with _scratch(out_dir, ".image.boot.") as (boot, boot_path):
                extract_bootstrap(layer, boot, what, out_dir)
                _check_superblock(boot, what)             # cheap, before reading it whole
                t = BootstrapTables.read(boot_path)       # refuses what is no bootstrap
                boot.seek(0)
                with atomic_output(path, mode=0o644) as out:
                    shutil.copyfileobj(boot, out, PIECE)
        wanted = [b for b in t.blobs if only_blobs is None or b.blob_id in only_blobs]
        fetched = _pull_blobs(source, str(ref), wanted, layers, out_dir) if blobs else []
        return {"manifest": m.digest, "bootstrap": path,
                "blobs": [b.blob_id for b in t.blobs], "fetched": fetched,
                "config": _config(source, m, str(ref)) if with_config else None}


def _config(source: _Source, m: Manifest, what: str) -> bytes:
    """The image config's bytes (digest-checked): what a rewritten image keeps of the
    source (entrypoint, command, environment, working directory, ...)."""
    desc = m.config()
    if desc.size > MAX_CONFIG:
        raise CorruptImageError(f"{what}: image config of {desc.size} bytes is too large")
    buf = io.BytesIO()
    source.fetch(desc, buf)
    return buf.getvalue()


def _check_superblock(f: BinaryIO, what: str) -> None:
    from erofs_tools.format import erofs as E
    f.seek(0)
    sb = E.SuperBlock.decode(f.read(E.BLKSZ), E.SUPER_OFFSET, what)
    if sb.magic != E.MAGIC or not sb.feature_compat & E.FEATURE_COMPAT_RAFS_V6:
        raise CorruptImageError(f"{what}: image/image.boot is not a RAFS v6 bootstrap")


def _pull_blobs(source: _Source, ref: str, blob_infos, layers: list[Descriptor],
                out_dir: str) -> list[dict]:
    from erofs_tools.format import rafs as R
    by_digest = {d.digest: d for d in layers if d.media_type == mt.NYDUS_BLOB}
    wanted = []
    for b in blob_infos:
        # what the kernel will read: the bootstrap's size
        wanted.append((b.blob_id, b.compressed_size))
        if b.features & R.BLOB_FEATURE_ZRAN:       # a gzip layer; its index (docs/zran.md)
            wanted.append((b.meta_digest.hex(), b.meta_size))
    fetched = []
    for blob_id, size in wanted:
        digest = "sha256:" + blob_id
        d = by_digest.get(digest)
        if d is not None and d.size != size:
            raise CorruptImageError(f"{ref}: layer {digest} is {d.size} bytes in the "
                                    f"manifest, {size} in the bootstrap")
        dst = os.path.join(out_dir, blob_id)
        if _have(dst, digest, size):
            fetched.append({"blob_id": blob_id, "how": "exists"})
            continue
        check_free_space(out_dir, size)
        with atomic_output(dst, mode=0o644) as f:
            source.fetch(Descriptor(mt.NYDUS_BLOB, digest, size), f)
        fetched.append({"blob_id": blob_id, "how": "pulled"})
    return fetched


def _have(path: str, digest: str, size: int) -> bool:
    """A regular file (not a symlink) at ``path`` with the blob's size and digest."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        h = hashlib.sha256()
        while piece := f.read(PIECE):
            h.update(piece)
        return "sha256:" + h.hexdigest() == digest


def check_free_space(directory: str, need: int) -> None:
    """Refuse to write ``need`` bytes where the file system cannot hold them (plus a
    margin): a hostile size must fail here, not fill the disk."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if need + FREE_SPACE_MARGIN > free:
        raise InputError(f"{directory}: {need} bytes to write, {free} bytes free")


@contextlib.contextmanager
def _scratch(directory: str, prefix: str) -> Iterator[tuple[BinaryIO, str]]:
    """A fresh O_EXCL temporary file in ``directory``, removed on exit."""
    fd, path = create_exclusive(directory, prefix)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f, path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- the bootstrap layer ---------------------------------------------------------------

class _Budget:
    """read(n) over the decompressed tar stream, failing once more than ``limit`` bytes
    have been taken (the parser reads ahead at most one piece past what it needs)."""

    def __init__(self, stream, limit: int, what: str):
        self.stream, self.limit, self.what = stream, limit, what
        self.taken = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.taken += len(data)
        if self.taken > self.limit:
            raise CorruptImageError(f"{self.what}: more than {META_BUDGET} bytes of tar "
                                    "headers and entries besides the bootstrap")
        return data


def extract_bootstrap(layer: BinaryIO, out: BinaryIO, what: str = "bootstrap layer",
                      out_dir: str | None = None) -> int:
    """Copy the image/image.boot member of a bootstrap layer (tar, tar.gz or tar.zst)
    from ``layer`` into ``out`` (on the file system of ``out_dir``, checked for room);
    -> its size. Bounded: see the module docstring."""
    from erofs_tools.builder.tar_source import TarReader, open_stream
    stream = open_stream(layer, "auto")
    budget = _Budget(stream, META_BUDGET, what)
    try:
        tar = TarReader(budget)
        for e in tar:
            if e.name.lstrip(b"./") != BOOTSTRAP_NAME:
                continue
            if e.type not in _REGULAR or e.sparse is not None:
                raise CorruptImageError(f"{what}: {BOOTSTRAP_NAME.decode()} is not a "
                                        "regular file")
            if e.size > MAX_BOOTSTRAP:
                raise CorruptImageError(f"{what}: bootstrap larger than {MAX_BOOTSTRAP} "
                                        "bytes")
            if out_dir is not None:
                check_free_space(out_dir, e.size)
            budget.limit = budget.taken + e.size + META_BUDGET
            left = e.size
            while left:
                piece = tar.read_data(min(left, PIECE))
                out.write(piece)
                left -= len(piece)
            out.flush()
            return e.size
    except CorruptImageError:
        raise
    except ErofsToolsError as e:
        raise CorruptImageError(f"{what}: {e}") from None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    raise CorruptImageError(f"{what}: no {BOOTSTRAP_NAME.decode()}")


# --- where the image comes from ----------------------------------------------------------

class _Source:
    def manifest(self, os_name: str, arch: str, variant: str | None = None) -> Manifest:
        raise NotImplementedError

    def fetch(self, desc: Descriptor, f: BinaryIO) -> None:
        """The whole blob into ``f``: at most desc.size bytes, digest-checked."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _RegistrySource(_Source):
    def __init__(self, client: RegistryClient, repo: str, ref: str):
        self.client, self.repo, self.ref = client, repo, ref

    def manifest(self, os_name, arch, variant=None):
        client, repo = self.client, self.repo
        return resolve_index(client.get_manifest(repo, self.ref),
                             lambda i: nydus_entry(i, os_name, arch, variant),
                             lambda digest: client.get_manifest(repo, digest),
                             lambda c: client.get_blob(repo, c.digest, max_size=MAX_CONFIG),
                             (os_name, arch, variant))[1]

    def fetch(self, desc, f):
        self.client.stream_blob(self.repo, desc.digest, f, max_size=desc.size)

    def close(self):
        self.client.close()


class _LayoutSource(_Source):
    def __init__(self, layout: OciLayout, tag: str | None):
        self.layout, self.tag = layout, tag

    def manifest(self, os_name, arch, variant=None):
        layout = self.layout
        return resolve_index(layout.get_manifest(layout.resolve(self.tag).digest),
                             lambda i: nydus_entry(i, os_name, arch, variant),
                             layout.get_manifest,
                             lambda c: layout.read_blob(c.digest, MAX_CONFIG),
                             (os_name, arch, variant))[1]

    def fetch(self, desc, f):
        h = hashlib.sha256()
        n = 0
        with self.layout.open_blob(desc.digest) as src:
            while piece := src.read(min(PIECE, desc.size + 1 - n)):
                n += len(piece)
                if n > desc.size:
                    raise CorruptImageError(f"blob {desc.digest}: larger than {desc.size} "
                                            "bytes")
                h.update(piece)
                f.write(piece)
        verify(desc.digest, "sha256:" + h.hexdigest(), f"blob {desc.digest}")


def nydus_entry(index: Manifest, os_name: str, arch: str,
                variant: str | None = None) -> Descriptor:
    try:
        return select_platform(index, os_name, arch, nydus=True, variant=variant)
    except CorruptImageError:
        return select_platform(index, os_name, arch, variant=variant)
