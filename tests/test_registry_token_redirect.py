"""A token realm that answers with a redirect, against the real docker-registry
(distribution 2.8) with Bearer tokens from the fixtures' issuer.

containerd fetches tokens with Go's http.Client, which follows a realm's redirects (at
most 10). The client does too, with the credentials kept to the realm's origin: the
Basic credentials (or an OAuth2 refresh token in a POST body) meant for the realm never
reach another host a redirect names, and a redirect loop ends in a one-line AuthError.
Each test failed before the client followed realm redirects (HTTP 307 was an error).
"""
import os

import pytest
from registry_fixtures import Redirector, sha256, start_registry

from erofs_tools.errors import AuthError
from erofs_tools.registry import Credentials

pytestmark = pytest.mark.registry

DATA = os.urandom(50_000)
REPO = "realm/redirect"


@pytest.fixture
def redirector():
    red = Redirector()
    yield red
    red.stop()


def _push_and_read(server, **kw) -> None:
    client = server.client(**kw)
    try:
        digest = client.push_blob(REPO, DATA).digest
        assert digest == sha256(DATA)
        assert client.get_blob(REPO, digest) == DATA
    finally:
        client.close()


def test_realm_moved_on_its_own_host_keeps_the_credentials(tmp_path):
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=lambda issuer: issuer + "/old-token")
    try:
        server.issuer.moved["/old-token"] = "/token"
        _push_and_read(server)
        sent = server.issuer.authorizations
        assert sent and all(a == server.credentials.basic_header() for a in sent), sent
        assert all(user == server.username for user, _ in server.issuer.requests)
    finally:
        server.stop()


def test_realm_moved_on_its_own_host_keeps_the_oauth2_grant(tmp_path):
    """A 307 resends the POST (the refresh token in its body) to the same origin."""
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=lambda issuer: issuer + "/old-token")
    try:
        server.issuer.moved["/old-token"] = "/token"
        server.issuer.refresh_tokens["RT-" + "b" * 20] = server.username
        _push_and_read(server, credentials=Credentials("<token>", "", "RT-" + "b" * 20))
        grants = server.issuer.grants
        assert grants and all(g["refresh_token"] == "RT-" + "b" * 20 for g in grants)
        assert server.issuer.requests == []     # no GET: every token from the grant
    finally:
        server.stop()


def test_realm_redirect_to_another_host_drops_the_credentials(tmp_path, redirector):
    """The realm (127.0.0.2) gets the credentials, as containerd sends them; the host it
    redirects to (the issuer on 127.0.0.1) does not: there the request is anonymous."""
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=redirector.url + "/token")
    try:
        redirector.target = server.issuer.url
        server.issuer.anonymous = True
        _push_and_read(server)
        assert redirector.requests
        assert all(a == server.credentials.basic_header() for _, _, a, _ in
                   redirector.requests)
        assert all(path.startswith("/token?") for _, path, _, _ in redirector.requests)
        assert server.issuer.authorizations and \
            all(a is None for a in server.issuer.authorizations)
    finally:
        server.stop()


def test_oauth2_grant_is_not_resent_to_another_host(tmp_path, redirector):
    """A 307 would resend the refresh token in the POST body to another host: refused,
    and the issuer there never sees the grant."""
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=redirector.url + "/token")
    try:
        redirector.target = server.issuer.url
        client = server.client(credentials=Credentials("<token>", "", "RT-" + "c" * 20))
        try:
            with pytest.raises(AuthError) as e:
                client.blob_exists(REPO, sha256(DATA))
        finally:
            client.close()
        msg = str(e.value)
        assert "another host" in msg and "\n" not in msg and "RT-" not in msg
        assert server.issuer.grants == [] and server.issuer.authorizations == []
        assert [m for m, _, _, _ in redirector.requests] == ["POST"]
    finally:
        server.stop()


def test_realm_redirect_loop_is_bounded(tmp_path, redirector):
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=redirector.url + "/token")
    try:
        redirector.target = redirector.url + "/again"
        client = server.client()
        try:
            with pytest.raises(AuthError) as e:
                client.blob_exists(REPO, sha256(DATA))
        finally:
            client.close()
        assert "more than 10 redirects" in str(e.value)
        assert len(redirector.requests) == 11       # the realm, then 10 hops
        assert server.issuer.requests == []
    finally:
        server.stop()
