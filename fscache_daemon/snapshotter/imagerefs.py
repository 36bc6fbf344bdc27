"""Which of containerd's images stand on a snapshot chain now: the registry references a
Nydus image's lazy mount may read its blobs through.

Images of the same layers share containerd's snapshot chain (the keys are chain ids): a
second image of them (another tag, a copy in another repository) is unpacked by no
Prepare at all, so the bootstrap snapshot only ever saw the first puller's reference.
Once that image is gone from the node, and its tag or repository from the registry, a
lazy mount made with that reference fails (404) although the node still has an image
of those layers. The reference is therefore taken, when the image is mounted, from an
image that uses the chain then, found through containerd's labels (what its garbage
collector follows):

    config    containerd.io/gc.ref.snapshot.<snapshotter> = the image's top chain id
    manifest  containerd.io/gc.ref.content.config         = the config's digest
    index     containerd.io/gc.ref.content.m.<i>           = a manifest's digest
    image     target                                       = a manifest's or an index's

Two calls (content List, images List) in the snapshot's namespace, with a short
deadline; containerd out of reach means the reference recorded at the pull is used, as
before.

Which one when several images stand on the chain: the pull's own reference while an
image of that name is there (snapshots.py); else the repository whose image
containerd's store changed last (`updated_at`: created, moved to the chain or
relabelled), what a user pulled or tagged most recently being what they mean to run and
what most likely still exists in the registry. One pull makes several names at once
(CRI: `repo:tag`, `repo@sha256:<manifest>` and the config digest): the names of one
repository and target are taken together, at the time of the latest of them, and among
them the tags first (what the user named; the digest name only pins the same manifest),
the later first, then by name; names left tied are taken in sorted order, so that the
choice does not depend on the order containerd lists them in. (Sorted names alone made
`a-old/app` win over the `prod/app` just pulled.)
"""

from __future__ import annotations

import logging
import os

import grpc

from erofs_tools.errors import ErofsToolsError
from erofs_tools.registry.reference import parse_registry_reference
from fscache_daemon.snapshotter.proto import (
    content_pb2,
    content_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)

log = logging.getLogger(__name__)

GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_MANIFEST = "containerd.io/gc.ref.content.m."
TIMEOUT = 10.0


def names_on_chain(labels: dict[str, dict[str, str]], images: list[tuple[str, str]],
                   chain_id: str) -> list[str]:
    """Names of the images (name, target digest) whose config keeps snapshot `chain_id`,
    given every content item's labels (digest -> labels)."""
    configs = {d for d, lb in labels.items()
               if any(k.startswith(GC_SNAPSHOT) and v == chain_id for k, v in lb.items())}
    manifests = {d for d, lb in labels.items() if lb.get(GC_CONFIG) in configs}
    indexes = {d for d, lb in labels.items()
               if any(k.startswith(GC_MANIFEST) and v in manifests for k, v in lb.items())}
    return [name for name, target in images if target in manifests | indexes]


def registry_refs(names: list[str], updated: dict[str, float] | None = None,
                  targets: dict[str, str] | None = None) -> list[str]:
    """The names that are registry references (CRI also names an image by its config
    digest, `sha256:...`), in the order of the module's doc (`updated`: name -> seconds
    of its last change, `targets`: name -> its target's digest; without them, sorted)."""
    when, target = updated or {}, targets or {}
    refs: dict[str, tuple[str, bool]] = {}      # name -> (repository, a digest name)
    for name in names:
        if name.startswith("sha256:"):
            continue
        try:
            ref = parse_registry_reference(name)
        except ErofsToolsError:
            continue
        refs[name] = (f"{ref.host}/{ref.repository}", ref.digest is not None)
    group: dict[tuple[str, str], float] = {}
    for name, (repo, _) in refs.items():
        key = (repo, target.get(name, ""))
        group[key] = max(group.get(key, 0.0), when.get(name, 0.0))

    def order(name: str) -> tuple:
        repo, by_digest = refs[name]
        key = (repo, target.get(name, ""))
        return (-group[key], key, by_digest, -when.get(name, 0.0), name)
    return sorted(refs, key=order)


def refs_on_chain(address: str, namespace: str, chain_id: str,
                  timeout: float = TIMEOUT) -> list[str] | None:
    """The registry references of containerd's images (at `address`, in `namespace`)
    standing on snapshot chain `chain_id`; None if containerd cannot be asked."""
    if not os.path.exists(address):
        return None
    md = [("containerd-namespace", namespace)]
    channel = grpc.insecure_channel(f"unix:{os.path.abspath(address)}")
    try:
        content = content_pb2_grpc.ContentStub(channel)
        labels = {i.digest: dict(i.labels)
                  for reply in content.List(content_pb2.ListContentRequest(),
                                            metadata=md, timeout=timeout)
                  for i in reply.info}
        images = images_pb2_grpc.ImagesStub(channel).List(
            images_pb2.ListImagesRequest(), metadata=md, timeout=timeout).images
    except grpc.RpcError as e:
        log.warning("containerd at %s: cannot list images of namespace %s: %s", address,
                    namespace, " ".join(str(e.details() if hasattr(e, "details") else e)
                                        .split()))
        return None
    finally:
        channel.close()
    updated = {i.name: _seconds(i.updated_at) or _seconds(i.created_at) for i in images}
    targets = {i.name: i.target.digest for i in images}
    return registry_refs(names_on_chain(labels, list(targets.items()), chain_id), updated,
                         targets)


def _seconds(ts) -> float:
    """A protobuf Timestamp in seconds (0 when unset)."""
    return ts.seconds + ts.nanos / 1e9
