"""Whole-image operations on top of RegistryClient: push an image (blobs first, manifest
last, as registries require), pull a manifest and its blobs, and copy an image from an
OCI layout directory into a registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InputError, RegistryError
from . import mediatypes as mt
from .client import RegistryClient
from .digest import digest_hex, file_digest
from .manifest import (
    CONFIG_LIMIT,
    Descriptor,
    Manifest,
    build_manifest,
    resolve_index,
    select_platform,
)
from .oci_layout import OciLayout


@dataclass
class BlobSource:
    """A blob to push: bytes, a path or a binary file, with its descriptor fields."""

    source: object
    media_type: str
    annotations: dict = field(default_factory=dict)
    digest: str | None = None


def push_image(client: RegistryClient, repo: str, tag: str, config: BlobSource,
               layers: list[BlobSource], *, media_type: str = mt.OCI_MANIFEST,
               annotations: dict | None = None, mount_from: str | None = None,
               chunk_size: int | None = None) -> Manifest:
    """Push layers (in order), then the config, then the manifest under ``tag``.
    Blobs the repository already has are not sent again; ``mount_from`` names a
    repository on the same registry to mount missing blobs from."""
    def push(b: BlobSource) -> Descriptor:
        r = client.push_blob(repo, b.source, digest=b.digest, mount_from=mount_from,
                             chunk_size=chunk_size)
        size = r.size if r.size >= 0 else client.stat_blob(repo, r.digest)
        if size is None:        # mounted or already there, yet not found by HEAD
            raise RegistryError(f"{repo}: blob {r.digest} is missing right after its push")
        return Descriptor(b.media_type, r.digest, size, dict(b.annotations))

    layer_descs = [push(b) for b in layers]
    config_desc = push(config)
    manifest = build_manifest(config_desc, layer_descs, media_type=media_type,
                              annotations=annotations)
    client.put_manifest(repo, tag, manifest)
    return manifest


def resolve_manifest(client: RegistryClient, repo: str, ref: str, *, os_name: str = "linux",
                     arch: str = "amd64", nydus: bool | None = None,
                     variant: str | None = None) -> Manifest:
    """Fetch ``ref``; if it is an index, follow the entry for the platform."""
    return resolve_index(client.get_manifest(repo, ref),
                         lambda i: select_platform(i, os_name, arch, nydus, variant),
                         lambda digest: client.get_manifest(repo, digest),
                         lambda d: client.get_blob(repo, d.digest, max_size=CONFIG_LIMIT),
                         (os_name, arch, variant))[1]


def pull_image(client: RegistryClient, repo: str, ref: str, dest_dir: str | None = None,
               **platform) -> Manifest:
    """Fetch the manifest (following an index to the platform's entry) and, if
    ``dest_dir`` is given, every blob it references into ``dest_dir/<digest hex>``,
    verified. Blobs already there with the right digest are not fetched again."""
    m = resolve_manifest(client, repo, ref, **platform)
    if dest_dir is not None:
        os.makedirs(dest_dir, exist_ok=True)
        for d in m.blobs():
            path = os.path.join(dest_dir, digest_hex(d.digest))
            if _has_blob(path, d):
                continue
            client.pull_blob(repo, d.digest, path, max_size=d.size)
    return m


def _has_blob(path: str, d: Descriptor) -> bool:
    try:
        if os.path.getsize(path) != d.size:
            return False
        with open(path, "rb") as f:
            return file_digest(f)[0] == d.digest
    except FileNotFoundError:
        return False


def push_from_layout(layout: OciLayout, client: RegistryClient, repo: str, tag: str,
                     layout_tag: str | None = None) -> Manifest:
    """Copy one image (manifest, config, layers) from a layout directory to a registry."""
    m = layout.get_manifest(layout.resolve(layout_tag).digest)
    if m.is_index:
        raise InputError(f"{layout.path}: pushing an index is not supported, pick a manifest")
    for d in m.blobs():
        client.push_blob(repo, layout.blob_path(d.digest), digest=d.digest)
    client.put_manifest(repo, tag, m)
    return m


def pull_to_layout(client: RegistryClient, repo: str, ref: str, layout: OciLayout,
                   tag: str | None = None, **platform) -> Manifest:
    """Copy one image from a registry into a layout directory (verified blobs)."""
    m = resolve_manifest(client, repo, ref, **platform)
    for d in m.blobs():
        if not layout.has_blob(d.digest):
            client.pull_blob(repo, d.digest, layout.blob_path(d.digest), max_size=d.size)
    layout.put_manifest(m, tag)
    return m
