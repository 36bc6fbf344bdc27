"""Manifests behind a redirect (registry.k8s.io, cgr.dev): the registry answers every
manifest request with a 307 to another registry, which wants an anonymous Bearer token
of its own. containerd and skopeo follow; so must we, with the registry's credentials
kept at its own origin and the manifest's bytes checked as ever."""

from __future__ import annotations

import hashlib
import json

import pytest
from registry_fixtures import make_tls_cert
from test_registry_hostile import BASIC, _answer, _client, _Server

from erofs_tools.errors import DigestMismatchError
from erofs_tools.registry import mediatypes as mt

pytestmark = pytest.mark.registry

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                       "config": {"mediaType": mt.OCI_CONFIG, "size": 2,
                                  "digest": "sha256:" + "1" * 64},
                       "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
TOKEN = "anon-token-of-the-other-registry"


def _front(upstream):
    """The registry named in the reference: wants our Basic credentials, then answers
    307 to the upstream for every manifest request."""
    def handle(h, _):
        if h.headers.get("Authorization") != BASIC:
            return _answer(h, 401, {"WWW-Authenticate": 'Basic realm="front"'})
        path = h.path.replace("/v2/app/", "/v2/prod/app/")
        _answer(h, 307, {"Location": f"{upstream.url}{path}"})
    return handle


@pytest.fixture
def servers(tmp_path):
    cert = make_tls_cert(str(tmp_path))
    upstream = _tls_upstream(cert)
    front = _Server(_front(upstream), cert)
    yield cert, front, upstream
    front.stop()
    upstream.stop()


def _tls_upstream(cert, body: bytes = MANIFEST):
    """The registry the manifests live on: anonymous pulls with a Bearer token from its
    own realm (as Artifact Registry or ghcr.io answer)."""
    srv: dict = {}

    def handle(h, _):
        if h.path.startswith("/token"):
            return _answer(h, 200, {"Content-Type": "application/json"},
                           json.dumps({"token": TOKEN}).encode())
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = f'{srv["s"].url}/token'
            return _answer(h, 401, {"WWW-Authenticate": f'Bearer realm="{realm}",'
                                    'service="up",scope="repository:prod/app:pull"'})
        if "/manifests/" in h.path:
            return _answer(h, 200, {"Content-Type": mt.OCI_MANIFEST,
                                    "Docker-Content-Digest": DIGEST}, body)
        _answer(h, 404)
    srv["s"] = _Server(handle, cert)
    return srv["s"]


def test_manifest_behind_a_redirect_to_another_registry(servers):
    cert, front, upstream = servers
    c = _client(front.host, insecure=False, cert=cert)
    m = c.get_manifest("app", "v1")
    assert (m.data, m.digest, m.media_type) == (MANIFEST, DIGEST, mt.OCI_MANIFEST)
    assert c.head_manifest("app", "v1") == DIGEST
    assert c.get_manifest("app", DIGEST).data == MANIFEST
    # the front got our credentials; the other registry never did, only its own token
    assert any(hd.get("Authorization") == BASIC for _, _, hd in front.seen)
    auths = [hd.get("Authorization") for _, _, hd in upstream.seen]
    assert BASIC not in auths
    assert set(auths) <= {None, f"Bearer {TOKEN}"} and f"Bearer {TOKEN}" in auths
    assert any(p.startswith("/token") for _, p, _ in upstream.seen)


def test_redirected_manifest_bytes_are_still_checked(tmp_path):
    cert = make_tls_cert(str(tmp_path))
    upstream = _tls_upstream(cert, MANIFEST + b" ")     # not the bytes of DIGEST
    front = _Server(_front(upstream), cert)
    try:
        c = _client(front.host, insecure=False, cert=cert)
        with pytest.raises(DigestMismatchError):
            c.get_manifest("app", DIGEST)
        with pytest.raises(DigestMismatchError):        # Docker-Content-Digest
            c.get_manifest("app", "v1")
    finally:
        front.stop()
        upstream.stop()
