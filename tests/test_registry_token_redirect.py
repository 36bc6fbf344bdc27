"""A token realm that answers with a redirect, against the real docker-registry
(distribution 2.8) with Bearer tokens from the fixtures' issuer.

containerd fetches tokens with Go's http.Client, which follows a realm's redirects (at
most 10). The client does too, with the credentials kept to the realm's origin: the
Basic credentials (or an OAuth2 grant's password or refresh token in a POST body) meant
for the realm never reach another host a redirect names (a grant that would is not sent
and the token comes from the GET), and a redirect loop ends in a one-line AuthError.
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


@pytest.mark.parametrize("refuse_post", [None, 404])
def test_realm_moved_on_its_own_host_keeps_the_credentials(tmp_path, refuse_post):
    """The password grant POSTed (and, when the realm refuses POST, the GET with Basic
    credentials) follows a 307 on the realm's own origin with its credentials."""
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=lambda issuer: issuer + "/old-token")
    try:
        server.issuer.moved["/old-token"] = "/token"
        server.issuer.refuse_post = refuse_post
        _push_and_read(server)
        issuer = server.issuer
        assert issuer.grants and all(g["grant_type"] == "password" and
                                     g["username"] == server.username and
                                     g["password"] == server.password
                                     for g in issuer.grants)
        gets = [a for m, a in zip(issuer.methods, issuer.authorizations) if m == "GET"]
        assert all(a == server.credentials.basic_header() for a in gets), gets
        assert bool(gets) == bool(refuse_post)
        assert all(user == server.username for user, _ in issuer.requests)
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
        assert set(server.issuer.methods) == {"POST"}   # every token from the grant
    finally:
        server.stop()


def test_realm_redirect_to_another_host_drops_the_credentials(tmp_path, redirector):
    """The realm (127.0.0.2) gets the credentials, as containerd sends them; the host it
    redirects to (the issuer on 127.0.0.1) does not. The password grant's 307 is not
    followed there (the body would go along): the realm is taken for one without the
    POST endpoint and the token comes from the GET, whose Basic credentials are dropped
    at the other host: there the request is anonymous."""
    server = start_registry(str(tmp_path / "reg"), auth="token",
                            realm=redirector.url + "/token")
    try:
        redirector.target = server.issuer.url
        server.issuer.anonymous = True
        _push_and_read(server)
        posts = [r for r in redirector.requests if r[0] == "POST"]
        gets = [r for r in redirector.requests if r[0] == "GET"]
        assert posts and gets
        assert all(b"grant_type=password" in body for _, _, _, body in posts)
        assert all(a == server.credentials.basic_header() for _, _, a, _ in gets)
        assert all(path.startswith("/token?") for _, path, _, _ in gets)
        issuer = server.issuer
        assert issuer.grants == [] and set(issuer.methods) == {"GET"}
        assert issuer.authorizations and all(a is None for a in issuer.authorizations)
    finally:
        server.stop()


def test_oauth2_grant_is_not_resent_to_another_host(tmp_path, redirector):
    """A 307 would resend the refresh token in the POST body to another host: not
    followed, and the issuer there never sees the grant. The GET that follows (Basic
    with the identity token, as containerd sends it) reaches the other host without
    Authorization; that issuer wants credentials: a one-line AuthError."""
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
        assert "\n" not in msg and "RT-" not in msg
        assert server.issuer.grants == [] and server.issuer.methods == ["GET"]
        assert server.issuer.authorizations == [None]
        assert [m for m, _, _, _ in redirector.requests] == ["POST", "GET"]
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
