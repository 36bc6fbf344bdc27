"""Descriptors, image manifests and indexes (OCI and Docker schema 2) as plain data.

A manifest's identity is the sha256 of its exact bytes, so we keep the bytes we fetched
or built next to the parsed JSON and never re-serialize a manifest we did not write.
Everything parsed here came from a registry or a layout directory: it is checked before
use (types, digests, sizes) and a bad one raises CorruptImageError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
# arm64 variants (containerd's table): each runs the ones below it, and arm's v8 down
_ARM64_MINOR = {"v8": 9, "v9": 5}
# a nested index deeper than this is refused (an index naming itself, or a chain)
MAX_INDEX_DEPTH = 4
# an image config read to check an entry without a platform
CONFIG_LIMIT = 16 << 20


def normalize_platform(os: str, arch: str, variant: str | None) -> tuple[str, str, str]:
    """(os, arch, variant) as containerd's platforms.Normalize has them (x86_64 is amd64,
    aarch64 arm64, armhf arm/v7, ...), the variant spelled out as DEFAULT_VARIANT's."""
    os, arch, variant = os.lower(), arch.lower(), (variant or "").lower()
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64"):
        arch = "amd64"
    elif arch == "aarch64":
        arch = "arm64"
    elif arch in ("armhf", "armel"):
        arch, variant = "arm", "v7" if arch == "armhf" else "v6"
    if arch == "arm64" and variant in ("8", "v8.0"):
        variant = "v8"
    elif arch == "arm64" and variant in ("9", "9.0", "v9.0"):
        variant = "v9"
    elif arch == "arm" and variant in ("5", "6", "7", "8"):
        variant = "v" + variant
    return os, arch, variant or DEFAULT_VARIANT.get(arch, "")


def platform_vector(os: str, arch: str, variant: str | None) -> list[tuple[str, str, str]]:
    """The platforms a node of this one runs, best first: containerd's platforms.Only
    (amd64/v3: v3, v2, v1, then 386; arm/v7: v7, v6, v5; arm64: arm64, then arm/v8 down
    to v5). An image of a higher variant is never among them: its binaries may use
    instructions the CPU lacks."""
    os, arch, variant = normalize_platform(os, arch, variant)
    vector = [(os, arch, variant)]
    level = variant[1:] if variant.startswith("v") else ""
    if arch == "amd64":
        if level.isdigit():
            vector += [(os, arch, f"v{n}") for n in range(int(level) - 1, 0, -1)]
        vector.append((os, "386", ""))
    elif arch == "arm" and level.isdigit():
        vector += [(os, arch, f"v{n}") for n in range(int(level) - 1, 4, -1)]
    elif arch == "arm64":
        major, _, minor = level.partition(".")
        if major in ("8", "9") and (minor.isdigit() or not minor):
            top = int(minor) if minor else 0
            for m in ([9, 8] if major == "9" else [8]):
                first = top if m == int(major) else min(top + 5, _ARM64_MINOR["v8"])
                vector += [(os, arch, f"v{m}.{n}" if n else f"v{m}")
                           for n in range(first, -1, -1)]
            vector = list(dict.fromkeys(vector))
            vector += platform_vector(os, "arm", "v8")
    return vector


def _entry_rank(d: Descriptor, vector: list[tuple[str, str, str]],
                nydus: bool | None) -> int | None:
    """Where an index entry stands in ``vector`` (None: not a match). The os.version is
    not compared (containerd compares it on Windows only); os.features beyond Nydus's
    marker make no match, as containerd's matcher (a node asks for none)."""
    p = d.platform or {}
    features = p.get("os.features") or []
    if not isinstance(features, list):
        return None
    nydus_entry = d.artifact_type == mt.NYDUS_MANIFEST_ARTIFACT or mt.NYDUS_OS_FEATURE in features
    if (nydus is not None and nydus_entry != nydus) \
            or any(f != mt.NYDUS_OS_FEATURE for f in features):
        return None
    os_, arch, variant = (p.get(k) for k in ("os", "architecture", "variant"))
    if not all(isinstance(x, str) for x in (os_, arch)) or not isinstance(variant, str | None):
        return None
    key = normalize_platform(str(os_), str(arch), variant)
    return vector.index(key) if key in vector else None


def select_platform(index: Manifest, os: str = "linux", arch: str = "amd64",
                    nydus: bool | None = None, variant: str | None = None) -> Descriptor:
    """Pick the index entry for a platform as containerd's pull does; ``nydus=True``
    wants the Nydus manifest (artifactType or the old os.features marker), False the
    other one, None either.

    Entries the node can run (platform_vector) are ranked by how well they fit, index
    order breaking ties: an exact match first, a lower variant of the architecture next,
    never a higher one (an arm/v7 image for an arm/v6 CPU). An entry without a platform
    comes after every one with a matching platform (containerd sorts them last): taken
    only when nothing else fits, and then its config must name the platform
    (config_matches). An entry may itself be an index (see resolve_index)."""
    vector = platform_vector(os, arch, variant)
    ranked = []
    unplaced = []
    for i, d in enumerate(index.manifests()):
        if d.platform is None:
            if nydus is None or (d.artifact_type == mt.NYDUS_MANIFEST_ARTIFACT) == nydus:
                unplaced.append(d)
            continue
        rank = _entry_rank(d, vector, nydus)
        if rank is not None:
            ranked.append((rank, i, d))
    if ranked:
        return min(ranked, key=lambda t: t[:2])[2]
    if unplaced:
        return unplaced[0]
    raise CorruptImageError(f"index {index.digest}: no manifest for {os}/{arch}"
                            + (f"/{variant}" if variant else "")
                            + ("" if nydus is None else " (nydus)" if nydus else " (non-nydus)"))


def config_matches(config: bytes, os: str, arch: str, variant: str | None) -> bool:
    """Whether an image config's os/architecture/variant is one ``os/arch/variant`` runs
    (for an index entry without a platform, as containerd checks it)."""
    try:
        obj = json.loads(config)
        key = normalize_platform(str(obj["os"]), str(obj["architecture"]),
                                 obj.get("variant") if isinstance(obj.get("variant"), str)
                                 else None)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return False
    return key in platform_vector(os, arch, variant)


def resolve_index(m: Manifest, pick: Callable[[Manifest], Descriptor],
                  get_manifest: Callable[[str], Manifest],
                  get_config: Callable[[Descriptor], bytes],
                  platform: tuple[str, str, str | None]) -> tuple[Descriptor | None, Manifest]:
    """From ``m`` down to an image manifest: each index's entry chosen by ``pick`` (an
    index may hold another, as containerd walks them), an entry without a platform taken
    only if its config names the platform. Returns (the last index entry or None,
    the manifest)."""
    entry = None
    for _ in range(MAX_INDEX_DEPTH + 1):
        if not m.is_index:
            if entry is not None and entry.platform is None \
                    and not config_matches(get_config(m.config()), *platform):
                raise CorruptImageError(f"manifest {m.digest}: its config is not of "
                                        f"{'/'.join(p for p in platform if p)}")
            return entry, m
        entry = pick(m)
        m = get_manifest(entry.digest)
    raise CorruptImageError(f"index {m.digest}: indexes nested deeper than {MAX_INDEX_DEPTH}")


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
