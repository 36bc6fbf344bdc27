"""Authentication against real registries: htpasswd Basic auth and Bearer tokens from the
fixtures' token issuer; credentials never show up in errors."""

import base64
import json
import logging
import time
import urllib.request

import pytest
from registry_fixtures import SERVICE, registry_basic, registry_token, sha256  # noqa: F401

from erofs_tools.errors import AuthError
from erofs_tools.registry import Credentials, RegistryClient

pytestmark = pytest.mark.registry

BLOB = b"authenticated blob " * 100


def _no_secret(exc, server):
    text = str(exc) + repr(exc)
    assert server.password not in text
    assert base64.b64encode(f"{server.username}:{server.password}".encode()).decode() not in text
    assert "\n" not in str(exc)


def test_basic_auth_success(registry_basic):
    c = registry_basic.client()
    c.ping()
    d = c.push_blob("secure/app", BLOB).digest
    assert c.get_blob("secure/app", d) == BLOB
    assert c.read_blob_range("secure/app", d, 5, 10) == BLOB[5:15]


def test_basic_auth_wrong_password(registry_basic, caplog):
    caplog.set_level(logging.DEBUG)
    c = registry_basic.client(credentials=Credentials(registry_basic.username, "wrong-pw"))
    with pytest.raises(AuthError, match="rejected the credentials") as e:
        c.ping()
    assert "wrong-pw" not in str(e.value)
    assert "wrong-pw" not in caplog.text


def test_basic_auth_no_credentials(registry_basic):
    c = registry_basic.client(credentials=None)
    with pytest.raises(AuthError, match="no credentials were found"):
        c.blob_exists("secure/app", sha256(b"x"))


def test_credentials_from_docker_config(registry_basic, tmp_path, monkeypatch):
    auth = base64.b64encode(f"{registry_basic.username}:{registry_basic.password}".encode())
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {registry_basic.host: {"auth": auth.decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    c = RegistryClient(registry_basic.host, insecure=True)
    c.ping()
    assert c.push_blob("secure/cfg", BLOB).how == "uploaded"
    # Nothing that holds the credentials shows them.
    _no_secret(Exception(repr(c) + repr(c.auth) + repr(c.auth.credentials)), registry_basic)


def test_token_flow(registry_token, caplog):
    caplog.set_level(logging.DEBUG)
    c = registry_token.client()
    c.ping()
    d = c.push_blob("tok/app", BLOB).digest
    assert c.get_blob("tok/app", d) == BLOB
    assert c.push_blob("tok/other", BLOB, mount_from="tok/app").how == "mounted"
    scopes = [s for _, ss in registry_token.issuer.requests for s in ss]
    assert "repository:tok/app:pull,push" in scopes
    assert "repository:tok/app:pull" in scopes
    assert "repository:tok/other:pull,push" in scopes     # the mount needs both repos
    # Tokens are cached: more requests on the same scopes ask the issuer nothing new.
    before = len(registry_token.issuer.requests)
    for _ in range(3):
        assert c.read_blob_range("tok/app", d, 0, 4) == BLOB[:4]
    assert len(registry_token.issuer.requests) == before
    assert registry_token.password not in caplog.text


def _expired_token(issuer, scope):
    issuer.expire_next = 1
    url = f"{issuer.url}/token?service={SERVICE}&scope={scope}"
    req = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(
        f"{issuer.username}:{issuer.password}".encode()).decode()})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["token"]


def test_token_refresh_after_registry_rejects_it(registry_token):
    """A cached token expires mid-run (or the clocks disagree): the registry's 401
    makes the client fetch a new token and the read goes on."""
    issuer = registry_token.issuer
    c = registry_token.client()
    d = c.push_blob("tok/r", BLOB).digest
    assert c.read_blob_range("tok/r", d, 0, 10) == BLOB[:10]
    stale = _expired_token(issuer, "repository:tok/r:pull")
    for tok in c.auth._tokens.values():         # every cached token goes stale
        tok.value = stale
    n = len(issuer.requests)
    assert c.read_blob_range("tok/r", d, 10, 10) == BLOB[10:20]
    assert len(issuer.requests) == n + 1        # one replacement token
    assert c.get_blob("tok/r", d) == BLOB
    assert len(issuer.requests) == n + 1        # and it is cached again
    # Expired on arrival: a fresh client recovers the same way.
    issuer.expire_next = 1
    assert registry_token.client().get_blob("tok/r", d) == BLOB


def test_token_renewed_when_lifetime_ends(registry_token):
    issuer = registry_token.issuer
    issuer.expires_in = 1
    c = registry_token.client()
    # the client's clock, moved by hand: on the wall clock a token good for 0.8 s could
    # also expire between two requests of a loaded run (a second renewal). The
    # registry's own check allows 60 s of skew: the token is still good there.
    now = [time.monotonic()]
    c.auth._clock = lambda: now[0]
    d = c.push_blob("tok/short", BLOB).digest
    assert c.get_blob("tok/short", d) == BLOB
    n = len(issuer.requests)
    assert c.get_blob("tok/short", d) == BLOB
    assert len(issuer.requests) == n         # still good: used again
    now[0] += 1.1                            # the 1 s lifetime is over
    assert c.get_blob("tok/short", d) == BLOB
    assert len(issuer.requests) == n + 1     # renewed before use, no 401 round trip


@pytest.mark.parametrize("claim", [-5, float("nan"), float("inf")])
def test_token_lifetime_nonsense_is_the_default(registry_token, claim):
    """expires_in negative or not a number: the default lifetime (60 s), not a token
    that is expired on arrival and fetched again for every request."""
    issuer = registry_token.issuer
    issuer.expires_in = claim
    c = registry_token.client()
    d = c.push_blob("tok/odd", BLOB).digest
    n = len(issuer.requests)
    for _ in range(3):
        assert c.read_blob_range("tok/odd", d, 0, 4) == BLOB[:4]
    assert len(issuer.requests) <= n + 1
    tok = next(iter(c.auth._tokens.values()))
    assert 30 < tok.expires_at - time.monotonic() <= 60


def test_token_wrong_credentials(registry_token):
    c = registry_token.client(credentials=Credentials(registry_token.username, "bad-secret"))
    with pytest.raises(AuthError, match="refused the credentials") as e:
        c.get_blob("tok/x", sha256(b"x"))
    assert "bad-secret" not in str(e.value)


def test_token_without_credentials(registry_token):
    c = registry_token.client(credentials=None)
    with pytest.raises(AuthError, match="requires credentials"):
        c.ping()


def test_token_insufficient_scope(registry_token):
    registry_token.issuer.actions = {"pull"}
    c = registry_token.client()
    with pytest.raises(AuthError, match="access denied") as e:
        c.push_blob("tok/ro", BLOB)
    _no_secret(e.value, registry_token)


def test_threads_share_one_client(registry_token):
    """The daemon's workers share a client: concurrent range reads with one token."""
    from concurrent.futures import ThreadPoolExecutor

    data = bytes(range(256)) * 400
    c = registry_token.client(pool_size=4)
    d = c.push_blob("tok/threads", data).digest
    before = len(registry_token.issuer.requests)
    reader = registry_token.client(pool_size=4)

    def read(i):
        off = (i * 977) % (len(data) - 100)
        return reader.read_blob_range("tok/threads", d, off, 100) == data[off:off + 100]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, range(64)))
    # Racing discovery 401s share the first token fetched for the scope.
    assert len(registry_token.issuer.requests) - before == 1
