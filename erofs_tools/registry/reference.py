"""Image references: ``host[:port]/repo[:tag][@sha256:...]`` and ``oci:PATH[:tag]``.

Parsing follows the docker/OCI conventions users type every day: a first path component
is a registry host only if it looks like one (has a dot or a port, or is ``localhost``);
otherwise the reference names Docker Hub, where one-word repositories live under
``library/``. The tag defaults to ``latest`` unless a digest pins the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from .digest import check_digest

DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"
# docker.io is a name, not an API endpoint; the distribution API lives here.
DOCKER_HUB_API = "registry-1.docker.io"

# Grammar from the distribution reference spec, kept deliberately simple: lowercase path
# components separated by '.', '_', '__' or '-' runs; tags up to 128 word characters.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Reference:
    """A parsed registry reference. ``host`` is what the user named (``docker.io`` for
    Docker Hub); ``api_host`` is where the distribution API answers."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def ref(self) -> str:
        """What goes into ``/v2/<name>/manifests/<ref>``: the digest wins over the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, check_digest(digest))

    def __str__(self) -> str:
        s = f"{self.host}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


@dataclass(frozen=True)
class LayoutReference:
    """``oci:PATH[:TAG]``: an OCI image-layout directory (see oci_layout.py)."""

    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


def check_repository(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise InputError (it is
    pasted into URL paths)."""
    if not isinstance(name, str) or len(name) > 255 or not _REPO_RE.match(name):
        raise InputError(f"invalid repository name {str(name)[:100]!r}")
    return name


def check_ref(ref: str) -> str:
    """Return ``ref`` if it is a valid tag or sha256 digest, else raise InputError."""
    if isinstance(ref, str) and ref.startswith("sha256:"):
        return check_digest(ref)
    if not isinstance(ref, str) or not _TAG_RE.match(ref):
        raise InputError(f"invalid tag or digest {str(ref)[:100]!r}")
    return ref


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" \
        or component.startswith("[")


def parse_reference(text: str) -> Reference | LayoutReference:
    """Parse an image reference; raise InputError naming it when it is malformed."""
    if text.startswith("oci:"):
        return _parse_layout(text)
    return parse_registry_reference(text)


def _parse_layout(text: str) -> LayoutReference:
    rest = text[len("oci:"):]
    path, tag = rest, None
    # A trailing ':tag' is only a tag if it cannot be part of the path (no '/').
    head, sep, tail = rest.rpartition(":")
    if sep and head and "/" not in tail and _TAG_RE.match(tail):
        path, tag = head, tail
    if not path:
        raise InputError(f"invalid image reference {text!r}: empty OCI layout path")
    return LayoutReference(path, tag)


def parse_registry_reference(text: str) -> Reference:
    """Parse ``[host[:port]/]repo[:tag][@digest]`` into a Reference (tag defaults to
    ``latest`` unless a digest is given)."""
    def bad(why: str) -> InputError:
        return InputError(f"invalid image reference {text!r}: {why}")

    if not text or text != text.strip():
        raise bad("empty or surrounded by spaces")
    name, digest = text, None
    if "@" in text:
        name, _, digest = text.partition("@")
        try:
            check_digest(digest)
        except InputError as e:
            raise bad(str(e)) from None
    first, slash, remainder = name.partition("/")
    if slash and _looks_like_host(first):
        if not _HOST_RE.match(first):
            raise bad(f"bad registry host {first!r}")
        host, path = first, remainder
    else:
        host, path = DOCKER_HUB, name
    tag = None
    # The tag separator is the last ':' after the last '/' (a port lives in the host).
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise bad(f"bad tag {tag!r}")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPO_RE.match(path) or len(path) > 255:
        raise bad(f"bad repository name {path!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host, path, tag, digest)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` (or ``[v6]:port``) names this machine."""
    name = host.split("]")[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    return name.lower() in LOOPBACK_HOSTS


def default_insecure(host: str, insecure: bool | None = None) -> bool:
    """The one rule for plain HTTP, for every command and the daemon: as asked, else
    plain HTTP for a loopback registry (test and local registries) and HTTPS with
    certificate verification for every other host."""
    return is_loopback(host) if insecure is None else insecure
