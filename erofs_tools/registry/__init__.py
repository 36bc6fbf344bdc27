"""OCI distribution client: references, auth, blobs, manifests, OCI layouts.

API overview::

    from erofs_tools.registry import RegistryClient, parse_reference

    ref = parse_reference("127.0.0.1:5000/app:v1")          # Reference | LayoutReference
    with RegistryClient.for_reference(ref, insecure=True) as c:   # insecure: plain HTTP
        # push an image: blobs first (skipped if present, or mounted), manifest last
        m = push_image(c, ref.repository, ref.tag, config=BlobSource(cfg, OCI_CONFIG),
                       layers=[BlobSource("/tmp/blob", NYDUS_BLOB, {...})])
        # pull a manifest (index -> platform entry) and its verified blobs
        m = pull_image(c, ref.repository, ref.ref, "/tmp/out")
        # the daemon's lazy reads: a byte range of a blob (storage redirects cached)
        data = c.read_blob_range(ref.repository, digest, offset, length)

RegistryClient(host, *, insecure=False, credentials=None, docker_config=None,
timeout=30, connect_timeout=10, retries=5, backoff=0.5, max_backoff=30, proxy=None,
proxy_headers=None, pool_size=8, ca_certs=None, chunk_size=16 MiB) methods:

- ``ping()``; ``stat_blob(repo, digest) -> int | None``; ``blob_exists(repo, digest)``
- ``get_blob(repo, digest, max_size=None) -> bytes`` and
  ``pull_blob(repo, digest, path, max_size=None) -> size``: whole blobs, sha256-verified,
  written atomically (a broken connection resumes with Range)
- ``read_blob_range(repo, digest, offset, length) -> bytes`` (unverified; chunk digests
  are the caller's)
- ``get_manifest(repo, ref) -> Manifest``, ``head_manifest(repo, ref) -> digest | None``,
  ``put_manifest(repo, ref, Manifest) -> digest``, ``delete_manifest``, ``list_tags``
- ``push_blob(repo, source, *, digest=None, size=None, mount_from=None, chunk_size=None)
  -> PushResult(digest, size, how)`` (how: "exists", "mounted", "uploaded");
  ``mount_blob(repo, digest, from_repo) -> bool``; ``delete_blob``

Blob GETs follow redirects to storage and uploads follow their session locations under
one rule (session.py): never the registry's Authorization to another host, never from
HTTPS to plain HTTP; blob GETs remember the storage URL per blob for later range reads.
A server that ignores Range (a cold pull-through mirror) gets the asked range taken out
of its whole answer. ``proxy`` (an HTTP proxy such as Dragonfly's dfdaemon or squid)
carries blob GETs only, falling back to direct connections when it fails: no connection,
or an answer that is the proxy's own error (transport.proxy_failed: dfdaemon's and
squid's marked errors, 407, unmarked 502/503/504), never the registry's answer passed
on. It sees the registry credentials of plain-HTTP registries, so it must be trusted (a
local dfdaemon needs them to fetch from the registry anyway).
Transient failures (429/5xx, broken connections) are retried with exponential backoff
and jitter, honouring Retry-After; uploads that fail restart in a fresh session.

Credentials come from the ``credentials`` argument or docker's config.json
(``$DOCKER_CONFIG`` or ``~/.docker``: ``auths`` entries, identity tokens, credential
helpers); Basic and Bearer (token) auth follow the registry's
WWW-Authenticate challenge, tokens are cached and renewed. Failures raise RegistryError
(AuthError for credentials), DigestMismatchError for bad content; messages never carry
credentials, tokens or URL query strings.
"""

from .auth import Credentials, load_credentials
from .client import RegistryClient
from .digest import check_digest, digest_hex, sha256_digest
from .image import (
    BlobSource,
    pull_image,
    pull_to_layout,
    push_from_layout,
    push_image,
    resolve_manifest,
)
from .manifest import Descriptor, Manifest, build_index, build_manifest, select_platform
from .mediatypes import *  # noqa: F401,F403  (media type and annotation constants)
from .oci_layout import OciLayout
from .reference import LayoutReference, Reference, parse_reference
from .upload import PushResult

__all__ = [
    "RegistryClient", "Credentials", "load_credentials", "Reference", "LayoutReference",
    "parse_reference", "Descriptor", "Manifest", "build_manifest", "build_index",
    "select_platform", "BlobSource", "push_image", "pull_image", "resolve_manifest",
    "push_from_layout", "pull_to_layout", "OciLayout", "PushResult", "check_digest",
    "digest_hex", "sha256_digest",
]
