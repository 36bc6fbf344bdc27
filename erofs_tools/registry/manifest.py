"""Descriptors, image manifests and indexes (OCI and Docker schema 2) as plain data.

A manifest's identity is the sha256 of its exact bytes, so we keep the bytes we fetched
or built next to the parsed JSON and never re-serialize a manifest we did not write.
Everything parsed here came from a registry or a layout directory: it is checked before
use (types, digests, sizes) and a bad one raises CorruptImageError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import CorruptImageError, InputError
from . import mediatypes as mt
from .digest import check_digest, sha256_digest

MAX_MANIFEST_SIZE = 4 << 20     # the size OCI registries must accept; refuse bigger


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)
    platform: dict | None = None
    artifact_type: str | None = None

    def to_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d

    @classmethod
    def from_json(cls, obj, what: str = "descriptor") -> Descriptor:
        try:
            media_type, digest, size = obj["mediaType"], obj["digest"], obj["size"]
            if not isinstance(media_type, str) or type(size) is not int or size < 0:
                raise TypeError
            check_digest(digest)
            annotations = obj.get("annotations") or {}
            platform = obj.get("platform")
            if not isinstance(annotations, dict) or not (platform is None
                                                         or isinstance(platform, dict)):
                raise TypeError
        except (KeyError, TypeError, InputError):
            raise CorruptImageError(f"{what}: invalid descriptor") from None
        return cls(media_type, digest, size, annotations, platform, obj.get("artifactType"))


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as fetched: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: str

    @property
    def json(self) -> dict:
        return parse_json(self.data, self.digest)

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEX_TYPES

    def config(self) -> Descriptor:
        return Descriptor.from_json(self.json.get("config"), f"manifest {self.digest} config")

    def layers(self) -> list[Descriptor]:
        return self._descriptors("layers", "manifest", "layer")

    def manifests(self) -> list[Descriptor]:
        return self._descriptors("manifests", "index", "manifest")

    def _descriptors(self, key: str, kind: str, item: str) -> list[Descriptor]:
        entries = self.json.get(key)
        if not isinstance(entries, list):
            raise CorruptImageError(f"{kind} {self.digest}: no {item} list")
        return [Descriptor.from_json(x, f"{kind} {self.digest} {item} {i}")
                for i, x in enumerate(entries)]

    def blobs(self) -> list[Descriptor]:
        """Config then layers: what a pull must fetch besides the manifest."""
        return [self.config(), *self.layers()]


def parse_json(data: bytes, what: str) -> dict:
    if len(data) > MAX_MANIFEST_SIZE:
        raise CorruptImageError(f"{what}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CorruptImageError(f"{what}: manifest is not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
        raise CorruptImageError(f"{what}: not a schema 2 manifest or index")
    return obj


def media_type_of(data: bytes, header_type: str | None, what: str) -> str:
    """The manifest's media type: its own mediaType field, else the Content-Type, else
    guessed from its shape (OCI manifests may omit mediaType)."""
    obj = parse_json(data, what)
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header_type and header_type.split(";")[0].strip() in mt.ALL_MANIFEST_TYPES:
        return header_type.split(";")[0].strip()
    return mt.OCI_INDEX if "manifests" in obj else mt.OCI_MANIFEST


def encode(obj: dict) -> bytes:
    """Canonical bytes for a manifest we write (stable, compact, sorted keys)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_manifest(config: Descriptor, layers: list[Descriptor], *,
                   media_type: str = mt.OCI_MANIFEST, annotations: dict | None = None,
                   artifact_type: str | None = None) -> Manifest:
    obj: dict = {"schemaVersion": 2, "mediaType": media_type, "config": config.to_json(),
                 "layers": [x.to_json() for x in layers]}
    if annotations:
        obj["annotations"] = dict(annotations)
    if artifact_type:
        obj["artifactType"] = artifact_type
    data = encode(obj)
    return Manifest(data, media_type, sha256_digest(data))


def build_index(manifests: list[Descriptor], *, media_type: str = mt.OCI_INDEX,
                annotations: dict | None = None) -> Manifest:
    obj: dict = {"schemaVersion": 2, "mediaType": media_type,
                 "manifests": [x.to_json() for x in manifests]}
    if annotations:
        obj["annotations"] = dict(annotations)
    data = encode(obj)
    return Manifest(data, media_type, sha256_digest(data))


# containerd's normalization: an entry without a variant is of its architecture's default
DEFAULT_VARIANT = {"arm": "v7", "arm64": "v8", "amd64": "v1"}


def select_platform(index: Manifest, os: str = "linux", arch: str = "amd64",
                    nydus: bool | None = None, variant: str | None = None) -> Descriptor:
    """Pick the index entry for a platform; ``nydus=True`` wants the Nydus manifest
    (artifactType or the old os.features marker), False the other one, None either."""
    def is_nydus(d: Descriptor) -> bool:
        features = (d.platform or {}).get("os.features") or []
        return d.artifact_type == mt.NYDUS_MANIFEST_ARTIFACT or mt.NYDUS_OS_FEATURE in features

    matches = []
    for d in index.manifests():
        p = d.platform or {}
        if p.get("os", os) == os and p.get("architecture", arch) == arch \
                and (nydus is None or is_nydus(d) == nydus):
            matches.append(d)
    # The variant counts, as containerd's platform matcher has it: the first entry in
    # index order was taken whatever its variant, so --platform linux/arm/v6 got the
    # arm/v7 image where an index lists v7 first (binaries a v6 CPU cannot run), and
    # linux/amd64 an amd64/v3 one listed before the baseline. An entry of the asked
    # variant (a missing one read as the architecture's default) comes first; another
    # variant only where the index has none of it.
    want = variant or DEFAULT_VARIANT.get(arch)
    exact = [d for d in matches
             if ((d.platform or {}).get("variant") or DEFAULT_VARIANT.get(arch)) == want]
    if exact or matches:
        return (exact or matches)[0]
    raise CorruptImageError(f"index {index.digest}: no manifest for {os}/{arch}"
                            + ("" if nydus is None else " (nydus)" if nydus else " (non-nydus)"))


# platform.machine() -> (GOARCH, variant), the names OCI platforms use
_MACHINES = {"x86_64": ("amd64", None), "amd64": ("amd64", None),
             "aarch64": ("arm64", None), "arm64": ("arm64", None),
             "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
             "i386": ("386", None), "i686": ("386", None), "ppc64le": ("ppc64le", None),
             "s390x": ("s390x", None), "riscv64": ("riscv64", None)}


def host_platform() -> tuple[str, str, str | None]:
    """(os, arch, variant) of this machine, as containerd picks an index entry for the
    node it runs on; linux/amd64 for a machine it does not know."""
    import platform
    arch, variant = _MACHINES.get(platform.machine().lower(), ("amd64", None))
    return "linux", arch, variant


def platform_variant(text: str | None) -> str | None:
    """The VARIANT of ``OS/ARCH/VARIANT`` (None without one)."""
    parse_platform(text)
    parts = (text or "").split("/")
    return parts[2] if len(parts) == 3 else None


def parse_platform(text: str | None) -> tuple[str, str]:
    """``OS/ARCH[/VARIANT]`` (default linux/amd64) -> (os, arch)."""
    parts = (text or "linux/amd64").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"--platform {text!r}: expected OS/ARCH[/VARIANT]")
    return parts[0], parts[1]
