"""Against the real docker-registry (distribution 2.8) with Bearer-token auth:

- the OAuth2 refresh-token grant (docker config.json ``identitytoken``): the client POSTs
  the grant to the token realm, gets an access token the registry accepts, never sends
  a password; a refused refresh token is a one-line AuthError;
- blob GETs the registry itself redirects to another host (distribution's redirect
  storage middleware pointing at a storage server on 127.0.0.2): the bytes arrive,
  whole and by range, and the registry's Authorization never reaches the other host.
"""
import os

import pytest
from registry_fixtures import StorageServer, sha256, start_registry

from erofs_tools.errors import ErofsToolsError
from erofs_tools.registry import Credentials

pytestmark = pytest.mark.registry

DATA = os.urandom(300_000)


@pytest.fixture
def token_registry(tmp_path):
    server = start_registry(str(tmp_path / "reg"), auth="token")
    yield server
    server.stop()


def _push(server, repo="real/auth"):
    client = server.client()
    try:
        digest = client.push_blob(repo, DATA).digest
    finally:
        client.close()
    assert digest == sha256(DATA)
    return digest


def test_refresh_token_grant_against_real_registry(token_registry):
    server = token_registry
    digest = _push(server)
    server.issuer.refresh_tokens["RT-" + "a" * 20] = server.username
    before, grants_before = len(server.issuer.methods), len(server.issuer.grants)
    client = server.client(credentials=Credentials("<token>", "", "RT-" + "a" * 20))
    try:
        assert client.get_blob("real/auth", digest) == DATA
        assert client.read_blob_range("real/auth", digest, 1000, 500) == DATA[1000:1500]
    finally:
        client.close()
    grants = server.issuer.grants[grants_before:]
    assert grants and all(g["grant_type"] == "refresh_token" for g in grants), grants
    assert grants[0]["refresh_token"] == "RT-" + "a" * 20
    assert "repository:real/auth:pull" in grants[0]["scope"].split()
    # the identity token replaced the password flow entirely: POSTs only, no password
    assert server.issuer.methods[before:] == ["POST"] * len(grants)
    assert all("password" not in g for g in grants)


def test_refused_refresh_token_is_a_one_line_auth_error(token_registry):
    server = token_registry
    digest = _push(server)
    client = server.client(credentials=Credentials("<token>", "", "RT-unknown"))
    try:
        with pytest.raises(ErofsToolsError) as e:
            client.get_blob("real/auth", digest)
    finally:
        client.close()
    msg = str(e.value)
    assert "\n" not in msg and "RT-unknown" not in msg, msg
    assert server.issuer.grants[-1]["refresh_token"] == "RT-unknown"


def test_blob_redirected_to_another_host(tmp_path):
    try:
        store = StorageServer(str(tmp_path / "reg" / "storage"))
    except OSError as e:
        raise AssertionError(f"cannot bind 127.0.0.2 (loopback /8): {e}") from None
    os.makedirs(tmp_path / "reg" / "storage", exist_ok=True)
    server = start_registry(str(tmp_path / "reg"), auth="token", redirect_to=store.url)
    try:
        digest = _push(server, "real/redirect")
        client = server.client()
        try:
            assert client.get_blob("real/redirect", digest) == DATA
            assert client.read_blob_range("real/redirect", digest, 12345, 4096) == \
                DATA[12345:12345 + 4096]
        finally:
            client.close()
        gets = [r for r in store.requests if r[0] == "GET"]
        assert gets, "the registry did not redirect to the storage host"
        assert all(r[1].endswith(f"/{digest.split(':')[1]}/data") for r in gets), gets
        assert all(r[2] is None for r in store.requests), \
            "the registry's Authorization was sent to the storage host"
        assert any(r[3] for r in gets), "the range read did not reach the storage host"
    finally:
        server.stop()
        store.stop()
