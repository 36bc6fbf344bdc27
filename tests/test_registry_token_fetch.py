"""The Bearer token fetch as containerd 1.6/1.7's docker authorizer makes it
(remotes/docker/authorizer.go doBearerAuth, auth/fetch.go), against the real
docker-registry (distribution 2.8) and the fixtures' token issuer:

- with credentials, the OAuth2 POST first: a ``password`` grant (username, password,
  client_id, scope, service), or ``refresh_token`` with an identity token; when the
  realm answers 404, 400 or 401 (405 too for a password grant) the GET with Basic
  credentials; any other refusal is an error;
- without a secret (no credentials, or a user with an empty password), a GET without
  Authorization;
- several scopes in one request, sorted (a cross-repository mount: the source's pull
  beside the destination's pull,push);
- the answer: ``access_token`` before ``token`` from the GET, only ``access_token`` from
  the POST; a ``refresh_token`` in it is the next POST's grant at that realm and service,
  and dropped when refused.

Each test failed before the client POSTed grants with passwords (every token came from
the GET, the identity token's POST had no fallback, an empty password went as Basic,
``token`` won over ``access_token``).
"""
import base64
import os

import pytest
from registry_fixtures import SERVICE, sha256, start_registry

from erofs_tools.errors import AuthError, RegistryError
from erofs_tools.registry import Credentials

pytestmark = pytest.mark.registry

DATA = os.urandom(40_000)
REPO = "fetch/app"
RT = "RT-identity-" + "d" * 16


@pytest.fixture
def server(tmp_path):
    srv = start_registry(str(tmp_path / "reg"), auth="token")
    yield srv
    srv.stop()


def _push_and_read(server, repo=REPO, **kw) -> str:
    client = server.client(**kw)
    try:
        digest = client.push_blob(repo, DATA).digest
        assert client.get_blob(repo, digest) == DATA
        return digest
    finally:
        client.close()


def _gets(issuer) -> list:
    return [a for m, a in zip(issuer.methods, issuer.authorizations) if m == "GET"]


def test_password_grant_is_posted_first(server):
    _push_and_read(server)
    issuer = server.issuer
    assert issuer.methods and set(issuer.methods) == {"POST"}, issuer.methods
    for g in issuer.grants:
        assert g["grant_type"] == "password" and g["client_id"] == "erofs-tools"
        assert (g["username"], g["password"]) == (server.username, server.password)
        assert g["service"] == SERVICE and g["scope"].startswith("repository:fetch/app:")
        assert "refresh_token" not in g
    # the password is in the form only, never also in an Authorization header
    assert all(a is None for a in issuer.authorizations)


@pytest.mark.parametrize("status", [404, 405, 400, 401])
def test_password_grant_refused_falls_back_to_get(server, status):
    server.issuer.refuse_post = status
    _push_and_read(server)
    issuer = server.issuer
    # every token: the POST, refused, then the GET with Basic credentials
    assert issuer.methods[::2] == ["POST"] * (len(issuer.methods) // 2)
    assert issuer.methods[1::2] == ["GET"] * (len(issuer.methods) // 2)
    assert _gets(issuer) and all(a == server.credentials.basic_header()
                                 for a in _gets(issuer))


@pytest.mark.parametrize("status", [403, 500])
def test_password_grant_other_refusals_are_errors(server, status):
    """No GET after them (a 500 is retried first, as every request is)."""
    server.issuer.refuse_post = status
    client = server.client()
    try:
        with pytest.raises((AuthError, RegistryError)) as e:
            client.blob_exists(REPO, sha256(DATA))
    finally:
        client.close()
    assert set(server.issuer.methods) == {"POST"}
    assert server.password not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("status", [404, 400, 401])
def test_identity_token_refused_post_falls_back_to_get(server, status):
    """containerd's CRI gives an identity token without a user: the GET carries it as
    Basic ":TOKEN"."""
    digest = _push_and_read(server)
    issuer = server.issuer
    issuer.refresh_tokens[RT] = server.username
    issuer.refuse_post = status
    n = len(issuer.methods)
    client = server.client(credentials=Credentials("<token>", "", RT))
    try:
        assert client.get_blob(REPO, digest) == DATA
    finally:
        client.close()
    assert issuer.methods[n:] == ["POST", "GET"]
    assert issuer.grants[-1]["grant_type"] == "refresh_token"
    assert issuer.grants[-1]["refresh_token"] == RT
    assert "username" not in issuer.grants[-1]
    assert issuer.authorizations[-1] == "Basic " + base64.b64encode(f":{RT}".encode()).decode()


def test_identity_token_post_answered_405_is_an_error(server):
    """405 sends a grant without a user to the GET in no containerd version."""
    server.issuer.refresh_tokens[RT] = server.username
    server.issuer.refuse_post = 405
    client = server.client(credentials=Credentials("<token>", "", RT))
    try:
        with pytest.raises(AuthError, match="HTTP 405") as e:
            client.blob_exists(REPO, sha256(DATA))
    finally:
        client.close()
    assert server.issuer.methods == ["POST"] and RT not in str(e.value)


def test_anonymous_and_empty_password_get_without_authorization(server):
    digest = _push_and_read(server)
    issuer = server.issuer
    issuer.anonymous = True
    for creds in (None, Credentials(server.username, "")):
        n = len(issuer.methods)
        client = server.client(credentials=creds)
        try:
            assert client.get_blob(REPO, digest) == DATA
        finally:
            client.close()
        assert issuer.methods[n:] == ["GET"]
        assert issuer.authorizations[n:] == [None]


def test_mount_scopes_in_one_request(server):
    """The mount's token: the source's pull beside the destination's pull,push in one
    request, sorted (containerd's GetTokenScopes): one form field in the POST, repeated
    scope parameters in the GET."""
    _push_and_read(server, "fetch/src")
    client = server.client()
    try:
        assert client.push_blob("fetch/dst", DATA, mount_from="fetch/src").how == "mounted"
    finally:
        client.close()
    want = "repository:fetch/dst:pull,push repository:fetch/src:pull"
    scopes = [g["scope"] for g in server.issuer.grants]
    assert want in scopes, scopes
    server.issuer.refuse_post = 404
    client = server.client()
    try:
        assert client.push_blob("fetch/dst2", DATA, mount_from="fetch/src").how == "mounted"
    finally:
        client.close()
    got = [scopes for m, (_, scopes) in zip(server.issuer.methods, server.issuer.requests)
           if m == "GET"]
    assert ["repository:fetch/dst2:pull,push", "repository:fetch/src:pull"] in got, got


def test_get_answer_access_token_before_token(server):
    """Both in the GET's answer: access_token (containerd canonicalizes to it); the
    "token" here is not one the registry takes."""
    server.issuer.refuse_post = 404
    server.issuer.get_key = "access_token"
    server.issuer.reply_extra = {"token": "not.a-token.the-registry-takes"}
    _push_and_read(server)
    server.issuer.reply_extra = {}
    _push_and_read(server, "fetch/only-access")     # access_token alone


def test_post_answer_needs_access_token(server):
    """containerd's OAuth2 answer has no "token" field: a POST answered with only
    "token" is an error, as there (the GET is for realms refusing the POST)."""
    server.issuer.post_key = "token"
    client = server.client()
    try:
        with pytest.raises(AuthError, match="without an access_token"):
            client.blob_exists(REPO, sha256(DATA))
    finally:
        client.close()
    assert server.issuer.methods == ["POST"]


def test_refresh_token_in_answer_is_the_next_grant(server):
    """A refresh_token in the answer replaces the password in the next POST to the same
    realm and service; the password goes once."""
    issuer = server.issuer
    issuer.issue_refresh = True
    client = server.client()
    try:
        digest = client.push_blob(REPO, DATA).digest
        assert client.get_blob("fetch/app", digest) == DATA
        assert client.mount_blob("fetch/other", digest, REPO)
    finally:
        client.close()
    grants = issuer.grants
    assert len(grants) >= 2 and grants[0]["grant_type"] == "password"
    for before, g in zip(issuer.issued_refresh, grants[1:]):
        assert g["grant_type"] == "refresh_token" and g["refresh_token"] == before
        assert "password" not in g and "username" not in g
    assert len(issuer.grants) == len(issuer.issued_refresh)


def test_refused_refresh_token_is_dropped(server):
    """The realm no longer takes the refresh token it handed out (400 invalid_grant):
    the GET with Basic credentials this time, the password grant the next."""
    issuer = server.issuer
    issuer.issue_refresh = True
    client = server.client()
    try:
        digest = client.push_blob(REPO, DATA).digest
        issuer.refresh_tokens.clear()           # revoked
        issuer.issue_refresh = False
        n = len(issuer.methods)
        assert client.mount_blob("fetch/next", digest, REPO)
        assert issuer.methods[n:n + 2] == ["POST", "GET"]
        assert issuer.grants[-1]["grant_type"] == "refresh_token"
        assert _gets(issuer)[-1] == server.credentials.basic_header()
        n = len(issuer.methods)
        assert not client.blob_exists("fetch/third", digest)    # a new scope
        assert issuer.methods[n:] == ["POST"]
        assert issuer.grants[-1]["grant_type"] == "password"
    finally:
        client.close()
