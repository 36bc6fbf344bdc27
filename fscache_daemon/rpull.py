"""`fscache-daemon rpull REF`: pull an image into containerd without downloading its
Nydus data-blob layers, so that a stock `ctr run --snapshotter NAME REF` starts it on
the daemon's lazy mount (what nydus's `ctr-remote image rpull` does for nydus-snapshotter).

It plays containerd's client-side pull and unpack through containerd's gRPC API, under
a lease so that containerd's garbage collector sees nothing half-made (a layer's
snapshot joins the lease before rpull looks whether it is present: one another image
holds may lose that holder meanwhile):

  1. the manifest (a Nydus one when REF names an index) and the config, from the
     registry; the layers' chain ids from the config's `rootfs.diff_ids`;
  2. per layer, bottom up, Prepare of an extraction snapshot through containerd's
     snapshots service with the labels containerd's CRI plugin would pass (the layer's
     `containerd.io/snapshot/` annotations, `containerd.io/snapshot.ref` = chain id,
     `cri.image-ref`, `cri.layer-digest`, `cri.manifest-digest`, `cri.image-layers`):
     * a data-blob layer: our snapshotter commits it at once and answers AlreadyExists
       (snapshotter/nydus.py); nothing is downloaded;
     * any other layer (the small bootstrap layer; every layer of a plain image): its
       blob goes into containerd's content store, containerd's diff service applies it
       onto the snapshot's mounts, the diff id is checked, the snapshot is committed
       as the chain id, and the blob gets `containerd.io/uncompressed`;
  3. the config (labelled `containerd.io/gc.ref.snapshot.NAME` = top chain id, which
     keeps the snapshot chain alive) and the manifest (`containerd.io/gc.ref.content.*`
     for the config and the layers) into the content store;
  4. the image record NAME -> manifest; then the lease goes.

A failure anywhere deletes the lease synchronously: containerd's garbage collection then
removes whatever the pull had created (content and snapshots, through the snapshotter).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import tempfile
import time
from typing import Any

from erofs_tools.errors import CorruptImageError, InputError
from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.client import RegistryClient
from erofs_tools.registry.cri_config import load_cri_config
from erofs_tools.registry.manifest import (
    CONFIG_LIMIT,
    Descriptor,
    Manifest,
    host_platform,
    resolve_index,
)
from erofs_tools.registry.nydus_pull import nydus_entry
from erofs_tools.registry.reference import default_insecure, parse_registry_reference
from fscache_daemon.containerd import ContainerdClient, ContainerdError, descriptor
from fscache_daemon.snapshotter import nydus

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER = "erofs"
INHERITED_PREFIX = "containerd.io/snapshot/"
MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER = "containerd.io/gc.ref.content.l."
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
# containerd refuses a label whose key and value exceed this together
MAX_LABEL = 4096
MAX_CONFIG = 8 << 20
# a layer rpull downloads (a bootstrap layer; plain layers): bounded by its descriptor
MAX_LAYER = 64 << 30
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# labels that carry rpull's options to our snapshotter, never taken from a layer
OWN_LABELS = frozenset({nydus.PLAIN_HTTP_LABEL, nydus.MOUNT_EARLY_LABEL})


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's (OCI's) chain ids: the first layer's diff id, then
    sha256("<parent chain id> <diff id>")."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def extraction_key(chain_id: str) -> str:
    """containerd's unpack key format, "extract-<unique> <chain id>", with a unique
    part that tells our snapshotter the Prepare is rpull's (nydus.RPULL_KEY_PREFIX:
    only then does it take rpull's option labels; a key is the client's choice, never
    an image's)."""
    return f"{nydus.RPULL_KEY_PREFIX}{time.time_ns()}-{secrets.token_hex(6)} {chain_id}"


def _image_layers(layers: list[Descriptor]) -> str:
    """Digests of a layer and those above it, comma-separated, cut to fit a label (as
    containerd's CRI plugin does: skipping some only costs the snapshotter speed)."""
    out = ""
    for d in layers:
        item = d.digest if not out else "," + d.digest
        if len(IMAGE_LAYERS_LABEL) + len(out) + len(item) > MAX_LABEL:
            break
        out += item
    return out


def _diff_ids(config: bytes, n_layers: int, what: str) -> list[str]:
    try:
        doc = json.loads(config)
        ids = doc["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise CorruptImageError(f"{what}: no rootfs.diff_ids in the image config") from None
    if not isinstance(ids, list) or not all(isinstance(x, str) and _DIGEST.match(x)
                                            for x in ids):
        raise CorruptImageError(f"{what}: bad rootfs.diff_ids in the image config")
    if len(ids) != n_layers:
        raise CorruptImageError(f"{what}: {n_layers} layers but {len(ids)} diff ids")
    return ids


class _Puller:
    def __init__(self, ctd: ContainerdClient, registry: RegistryClient, repo: str,
                 name: str, snapshotter: str, mount_early: bool = True,
                 plain_http: bool = False) -> None:
        self.ctd, self.registry, self.repo = ctd, registry, repo
        self.name, self.snapshotter = name, snapshotter
        self.mount_early = mount_early
        self.plain_http = plain_http
        self.bytes_fetched = 0
        self.lazy_layers = 0
        self.unpacked_layers = 0
        self.present_layers = 0

    def manifest(self, ref: str) -> Manifest:
        def get(digest: str) -> Manifest:
            m = self.registry.get_manifest(self.repo, digest)
            self.bytes_fetched += len(m.data)
            return m

        def config(d: Descriptor) -> bytes:
            self.bytes_fetched += d.size
            return self.registry.get_blob(self.repo, d.digest, max_size=CONFIG_LIMIT)

        # the node's platform, as containerd's own pull picks (linux/amd64 was taken on
        # every node: an arm64 node got the amd64 image); an index may hold another
        node = host_platform()
        m = resolve_index(get(ref), lambda i: nydus_entry(i, *node), get, config, node)[1]
        if m.media_type not in mt.MANIFEST_TYPES:
            raise InputError(f"{self.name}: unsupported manifest type {m.media_type}")
        return m

    def unpack(self, i: int, layer: Descriptor, layers: list[Descriptor], manifest: str,
               chain: list[str], diff_ids: list[str]) -> None:
        sn, ctd = self.snapshotter, self.ctd
        cid = chain[i]
        parent = chain[i - 1] if i else ""
        blob = layer.annotations.get(mt.ANNOTATION_NYDUS_BLOB) == "true"
        # leased before it is looked at: a chain found present (another image's) was
        # kept only by that image, and a collection after its removal took it before
        # our config's gc.ref.snapshot label held it: the image was recorded on a chain
        # gone (containerd's own unpack has that gap; ours must not)
        ctd.lease_snapshot(sn, cid)
        if ctd.stat(sn, cid):
            self.present_layers += 1
            return
        # the layer's annotations are the image author's: the snapshotter's own options
        # among them are dropped, else an image would choose plain HTTP (with the
        # registry's credentials) for its own lazy reads; only our flags set them
        labels = {k: str(v) for k, v in layer.annotations.items()
                  if k.startswith(INHERITED_PREFIX) and k not in OWN_LABELS}
        labels.update({nydus.TARGET_LABEL: cid, nydus.IMAGE_REF_LABEL: self.name,
                       nydus.LAYER_LABEL: layer.digest, MANIFEST_LABEL: manifest,
                       IMAGE_LAYERS_LABEL: _image_layers(layers[i:])})
        if self.plain_http:
            labels[nydus.PLAIN_HTTP_LABEL] = "true"
        if self.mount_early and not blob:
            # our snapshotter mounts a bootstrap layer at its commit (others ignore it)
            labels[nydus.MOUNT_EARLY_LABEL] = "true"
        key = extraction_key(cid)
        try:
            mounts = ctd.prepare(sn, key, parent, labels)
        except ContainerdError as e:
            if e.code == "ALREADY_EXISTS" and ctd.stat(sn, cid):
                # a Nydus blob layer, committed by the snapshotter without a download
                self.lazy_layers += blob
                self.present_layers += not blob
                return
            raise
        try:
            if blob:
                raise ContainerdError(
                    f"snapshotter {sn!r} does not serve Nydus blob layers lazily (layer "
                    f"{layer.digest}): use fscache-daemon's snapshotter, run with its "
                    "daemon API")
            self._ensure_content(layer)
            applied = ctd.apply(descriptor(layer.media_type, layer.digest, layer.size),
                                mounts)
            if applied != diff_ids[i]:
                raise CorruptImageError(f"layer {layer.digest}: diff id {applied}, the "
                                        f"config says {diff_ids[i]}")
            try:
                ctd.commit(sn, cid, key, labels)
            except ContainerdError as e:
                if e.code != "ALREADY_EXISTS":
                    raise
                # committed by a concurrent pull meanwhile: ours goes, theirs serves
                with contextlib.suppress(ContainerdError):
                    ctd.remove(sn, key)
        except BaseException:
            with contextlib.suppress(ContainerdError):
                ctd.remove(sn, key)
            raise
        ctd.set_content_labels(layer.digest, {UNCOMPRESSED_LABEL: applied})
        self.unpacked_layers += 1
        log.info("layer %s applied as %s", layer.digest, cid)

    def _ensure_content(self, layer: Descriptor) -> None:
        """The layer's blob in containerd's content store (downloaded only if absent)."""
        if self.ctd.content_info(layer.digest) is not None and \
                self.ctd.lease_existing(layer.digest, layer.size):
            return  # there already (and now in our lease)
        if layer.size > MAX_LAYER:
            raise CorruptImageError(f"layer {layer.digest}: {layer.size} bytes")
        with tempfile.TemporaryFile(prefix="fscache-rpull-") as f:
            n = self.registry.stream_blob(self.repo, layer.digest, f, max_size=layer.size)
            if n != layer.size:
                raise CorruptImageError(f"layer {layer.digest}: {n} bytes, the manifest "
                                        f"says {layer.size}")
            self.bytes_fetched += n
            f.seek(0)
            self.ctd.write_content(layer.digest, layer.size, f, {})


def rpull(ref_text: str, address: str, namespace: str,
          snapshotter: str = DEFAULT_SNAPSHOTTER, insecure: bool | None = None,
          containerd_config: str | None = None, mount_early: bool = True) -> dict:
    """Pull `ref_text` into containerd (see the module doc); -> what was done. The
    registry's credentials: its entry in containerd's config file `containerd_config`
    (the CRI plugin's registry configs) if it has one, else the docker config's.
    `mount_early`: the bootstrap layer's Prepare asks our snapshotter to mount the image
    as soon as the layer is committed (its prefetch starts while the pull ends)."""
    t0 = time.monotonic()
    ref = parse_registry_reference(ref_text)
    name = str(ref)
    credentials = None
    if containerd_config:
        credentials = load_cri_config(containerd_config).credentials(ref.api_host)
    with ContainerdClient(address, namespace) as ctd:   # unreachable: fail before fetching
        registry = RegistryClient.for_reference(
            ref, insecure=default_insecure(ref.api_host, insecure), credentials=credentials)
        with contextlib.closing(registry):
            # --insecure given: the snapshotter's lazy reads of this image use plain HTTP
            # too (a label on its layers), as the user asked for this registry
            p = _Puller(ctd, registry, ref.repository, name, snapshotter, mount_early,
                        plain_http=insecure is True)
            m = p.manifest(ref.ref)
            cdesc = m.config()
            layers = m.layers()
            if not layers:
                raise InputError(f"{name}: the manifest has no layers")
            if cdesc.size > MAX_CONFIG:
                raise CorruptImageError(f"{name}: image config of {cdesc.size} bytes")
            config = registry.get_blob(ref.repository, cdesc.digest, max_size=cdesc.size)
            p.bytes_fetched += len(config)
            diff_ids = _diff_ids(config, len(layers), name)
            chain = chain_ids(diff_ids)
            with ctd.lease():
                for i, layer in enumerate(layers):
                    p.unpack(i, layer, layers, m.digest, chain, diff_ids)
                ctd.write_content(cdesc.digest, len(config), config,
                                  {GC_SNAPSHOT + snapshotter: chain[-1]})
                refs = {GC_CONFIG: cdesc.digest}
                refs.update({f"{GC_LAYER}{i}": d.digest for i, d in enumerate(layers)})
                ctd.write_content(m.digest, len(m.data), m.data, refs)
                ctd.put_image(name, descriptor(m.media_type, m.digest, len(m.data)))
    res: dict[str, Any] = {
        "image": name, "manifest": m.digest, "namespace": namespace,
        "snapshotter": snapshotter, "chain_id": chain[-1], "layers": len(layers),
        "lazy_layers": p.lazy_layers, "unpacked_layers": p.unpacked_layers,
        "present_layers": p.present_layers, "bytes_fetched": p.bytes_fetched,
        "seconds": round(time.monotonic() - t0, 3)}
    log.info("rpull %s: %s", name, res)
    return res
