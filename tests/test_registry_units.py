"""Registry client pieces that need no server: references, challenges, docker config,
manifests, OCI layouts, retry timing."""

import base64
import json
import os
import sys

import pytest

from erofs_tools.errors import AuthError, CorruptImageError, DigestMismatchError, InputError
from erofs_tools.registry import (
    Credentials,
    Descriptor,
    LayoutReference,
    OciLayout,
    Reference,
    build_index,
    build_manifest,
    load_credentials,
    parse_reference,
    select_platform,
    sha256_digest,
)
from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.auth import Authenticator, parse_challenges
from erofs_tools.registry.transport import RetryPolicy, parse_retry_after, safe_url

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,expected", [
    ("ubuntu", Reference("docker.io", "library/ubuntu", "latest")),
    ("user/app:1.0", Reference("docker.io", "user/app", "1.0")),
    ("127.0.0.1:5000/a/b", Reference("127.0.0.1:5000", "a/b", "latest")),
    ("localhost/x:t", Reference("localhost", "x", "t")),
    ("reg.example.com/app@" + D, Reference("reg.example.com", "app", None, D)),
    ("reg.example.com:443/app:v2@" + D, Reference("reg.example.com:443", "app", "v2", D)),
])
def test_parse_reference(text, expected):
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


def test_reference_properties():
    ref = parse_reference("nginx")
    assert ref.api_host == "registry-1.docker.io" and ref.ref == "latest"
    pinned = parse_reference("h:1/a:t@" + D)
    assert pinned.ref == D and pinned.api_host == "h:1"


@pytest.mark.parametrize("text", ["", "UPPER/case", "a/b:bad tag", "a@sha256:123",
                                  "a@md5:" + "0" * 32, "a//b", "h:1/a:" + "t" * 200])
def test_parse_reference_rejects(text):
    with pytest.raises(InputError, match="invalid image reference"):
        parse_reference(text)


def test_parse_layout_reference():
    assert parse_reference("oci:/tmp/img") == LayoutReference("/tmp/img")
    assert parse_reference("oci:/tmp/img:v1") == LayoutReference("/tmp/img", "v1")
    assert parse_reference("oci:rel/dir") == LayoutReference("rel/dir")


def test_parse_challenges():
    chs = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a:pull repository:b:pull,push",'
                           'error="invalid_token", Basic realm="r"')
    assert [c.scheme for c in chs] == ["bearer", "basic"]
    assert chs[0].params["realm"] == "https://auth.example/token"
    assert chs[0].scopes == ["repository:a:pull", "repository:b:pull,push"]
    assert chs[0].params["error"] == "invalid_token"
    assert parse_challenges('Basic realm="x"')[0].params == {"realm": "x"}
    assert parse_challenges("") == []


def _write_config(tmp_path, auths):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return str(path)


def test_docker_config_credentials(tmp_path, monkeypatch):
    b64 = base64.b64encode(b"alice:s3cr:et").decode()
    path = _write_config(tmp_path, {"reg.example:5000": {"auth": b64},
                                    "https://other.example": {"username": "bob",
                                                              "password": "pw"},
                                    "https://index.docker.io/v1/": {"auth": b64}})
    assert load_credentials("reg.example:5000", path) == Credentials("alice", "s3cr:et")
    assert load_credentials("other.example", path) == Credentials("bob", "pw")
    assert load_credentials("registry-1.docker.io", path) == Credentials("alice", "s3cr:et")
    assert load_credentials("nowhere.example", path) is None
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert load_credentials("reg.example:5000") == Credentials("alice", "s3cr:et")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "missing"))
    assert load_credentials("reg.example:5000") is None


def test_docker_config_credential_helpers(tmp_path, monkeypatch):
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text(f"""#!{sys.executable}
import json, sys
host = sys.stdin.read().strip()
answers = {{"reg.example": {{"Username": "carol", "Secret": "pw-" + sys.argv[1]}},
           "tok.example": {{"Username": "<token>", "Secret": "IDTOK"}}}}
if host not in answers:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(answers[host]))
""")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"credsStore": "fake", "credHelpers": {"tok.example": "fake"},
                                "auths": {"plain.example": {"username": "u", "password": "p"}}}))
    assert load_credentials("reg.example", str(path)) == Credentials("carol", "pw-get")
    assert load_credentials("tok.example", str(path)).identity_token == "IDTOK"
    assert load_credentials("plain.example", str(path)) == Credentials("u", "p")
    assert load_credentials("other.example", str(path)) is None
    path.write_text(json.dumps({"credsStore": "missing-helper"}))
    assert load_credentials("reg.example", str(path)) is None


def test_docker_config_errors_do_not_leak(tmp_path):
    path = _write_config(tmp_path, {"h": {"auth": "not-base64-SECRETVALUE!"}})
    with pytest.raises(AuthError) as e:
        load_credentials("h", path)
    assert "SECRETVALUE" not in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text('{"auths": {"h": {"auth": "SECRET"')
    with pytest.raises(AuthError) as e:
        load_credentials("h", path)
    assert "SECRET" not in str(e.value)


def test_credentials_and_tokens_never_in_repr():
    c = Credentials("alice", "hunter2")
    assert "hunter2" not in repr(c) and "alice" not in repr(c) and "hunter2" not in str(c)
    replies = iter([(200, json.dumps({"access_token": "TOKENVALUE",
                                     "expires_in": 300}).encode())])
    a = Authenticator("h", c, lambda m, u, h, b: next(replies), allow_http_realm=True)
    a.on_unauthorized('Bearer realm="http://t/token",service="s"', "repository:x:pull", None)
    assert a.authorization("repository:x:pull") == "Bearer TOKENVALUE"
    assert "TOKENVALUE" not in repr(a) and "TOKENVALUE" not in repr(a._tokens)


def test_token_refreshed_before_expiry():
    now = [1000.0]
    calls = []

    def fetch(method, url, headers, body):
        calls.append(url)
        return 200, json.dumps({"access_token": f"t{len(calls)}", "expires_in": 100}).encode()

    a = Authenticator("h", None, fetch, clock=lambda: now[0])
    a.on_unauthorized('Bearer realm="https://t/token",service="s",scope="repository:x:pull"',
                      "repository:x:pull", None)
    assert a.authorization("repository:x:pull") == "Bearer t1"
    assert "scope=repository%3Ax%3Apull" in calls[0] and "service=s" in calls[0]
    now[0] += 79                    # 100 s lifetime, renewed 20 s early
    assert a.authorization("repository:x:pull") == "Bearer t1"
    now[0] += 2
    assert a.authorization("repository:x:pull") == "Bearer t2"
    # A new scope gets its own token without waiting for a challenge.
    assert a.authorization("repository:y:pull") == "Bearer t3"


def test_identity_token_uses_oauth2_refresh_grant(tmp_path):
    import urllib.parse
    path = _write_config(tmp_path, {"h": {"auth": "", "identitytoken": "REFRESH-SECRET"}})
    creds = load_credentials("h", path)
    assert creds.identity_token == "REFRESH-SECRET" and "REFRESH" not in repr(creds)
    seen = []

    def fetch(method, url, headers, body):
        seen.append((method, url, urllib.parse.parse_qs(body.decode())))
        return 200, b'{"access_token": "AT", "expires_in": 300}'

    a = Authenticator("h", creds, fetch)
    a.on_unauthorized('Bearer realm="https://t/oauth2/token",service="s",'
                      'scope="repository:x:pull"', "repository:x:pull", None)
    assert a.authorization("repository:x:pull") == "Bearer AT"
    method, url, form = seen[0]
    assert (method, url) == ("POST", "https://t/oauth2/token")
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == ["REFRESH-SECRET"]
    assert form["scope"] == ["repository:x:pull"] and form["service"] == ["s"]


def test_credentials_not_sent_to_plain_http_realm():
    a = Authenticator("h", Credentials("u", "p"), lambda *a: (200, b"{}"))
    with pytest.raises(AuthError, match="plain HTTP"):
        a.on_unauthorized('Bearer realm="http://t/token"', "repository:x:pull", None)


def test_retry_policy():
    p = RetryPolicy(retries=3, backoff=1.0, max_backoff=5.0)
    assert all(0 <= p.delay(n) <= min(5.0, 2 ** n) for n in range(6) for _ in range(20))
    assert p.delay(0, "3") == 3.0 and p.delay(0, "100") == 5.0
    assert parse_retry_after(None) is None and parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_safe_url_strips_secrets():
    assert safe_url("https://u:p@h/v2/x?X-Amz-Signature=abc&_state=s") == "https://h/v2/x"


def test_manifest_build_and_parse():
    cfg = Descriptor(mt.OCI_CONFIG, D, 10)
    layer = Descriptor(mt.NYDUS_BLOB, "sha256:" + "cd" * 32, 20,
                       {mt.ANNOTATION_NYDUS_BLOB: "true"})
    m = build_manifest(cfg, [layer])
    assert m.digest == sha256_digest(m.data) and m.media_type == mt.OCI_MANIFEST
    assert m.config() == cfg and m.layers() == [layer] and m.blobs() == [cfg, layer]
    nydus = Descriptor(mt.OCI_MANIFEST, m.digest, len(m.data), platform={"os": "linux",
                       "architecture": "amd64"}, artifact_type=mt.NYDUS_MANIFEST_ARTIFACT)
    plain = Descriptor(mt.OCI_MANIFEST, D, 5, platform={"os": "linux",
                                                         "architecture": "amd64"})
    index = build_index([plain, nydus])
    assert index.is_index
    assert select_platform(index, nydus=True) == nydus
    assert select_platform(index, nydus=False) == plain
    with pytest.raises(CorruptImageError):
        select_platform(index, arch="arm64")


def test_manifest_rejects_garbage():
    from erofs_tools.registry.manifest import Manifest
    bad = Manifest(b'{"schemaVersion": 2, "layers": [{"digest": "x"}]}', mt.OCI_MANIFEST, D)
    with pytest.raises(CorruptImageError):
        bad.layers()
    with pytest.raises(CorruptImageError):
        _ = Manifest(b"[1]", mt.OCI_MANIFEST, D).json      # the property parses


def test_oci_layout_roundtrip(tmp_path):
    layout = OciLayout(tmp_path / "img", create=True)
    blob = layout.write_blob(b"layer data")
    assert layout.read_blob(blob.digest) == b"layer data"
    cfg = layout.write_blob(b"{}")
    m = build_manifest(Descriptor(mt.OCI_CONFIG, cfg.digest, cfg.size),
                       [Descriptor(mt.OCI_LAYER_TAR, blob.digest, blob.size)])
    layout.put_manifest(m, "v1")
    layout.put_manifest(m, "v1")                    # same tag replaces, not duplicates
    again = OciLayout(tmp_path / "img")
    assert len(again.index().manifests()) == 1
    assert again.resolve("v1").digest == m.digest == again.resolve().digest
    assert again.get_manifest(m.digest).layers()[0].digest == blob.digest
    with pytest.raises(InputError):
        again.resolve("nope")
    # Corrupt content is caught on read.
    with open(again.blob_path(blob.digest), "wb") as f:
        f.write(b"layer DATA")
    with pytest.raises(DigestMismatchError):
        again.read_blob(blob.digest)
    with pytest.raises(InputError, match="not an OCI image layout"):
        OciLayout(tmp_path)
    assert not [n for n in os.listdir(tmp_path / "img" / "blobs" / "sha256")
                if n.startswith(".tmp")]


def test_client_refuses_bad_names_before_sending():
    from erofs_tools.registry import RegistryClient
    c = RegistryClient("127.0.0.1:9", insecure=True, docker_config=False, retries=0)
    for call in (lambda: c.blob_url("../etc", D), lambda: c.blob_url("a", "sha256:xx"),
                 lambda: c.manifest_url("a", "../../x"), lambda: c.manifest_url("A", "t")):
        with pytest.raises(InputError):
            call()
    assert c.manifest_url("a/b", "v1.0") == "http://127.0.0.1:9/v2/a/b/manifests/v1.0"


def test_refresh_token_kept_for_its_realm_and_service_only():
    """A refresh_token in a realm's answer is the next grant at that realm and service
    only: another realm, or another service at the same realm, gets the password grant
    (the real issuer's flow: test_registry_token_fetch)."""
    import urllib.parse
    posts = []

    def fetch(method, url, headers, body):
        form = urllib.parse.parse_qs(body.decode())
        posts.append((url, form))
        return 200, json.dumps({"access_token": f"AT{len(posts)}", "expires_in": 300,
                                "refresh_token": f"RT-of-{url}-{form['service'][0]}"}).encode()

    a = Authenticator("h", Credentials("u", "p"), fetch)
    for realm, service, repo in [("https://one/token", "s1", "x"),
                                 ("https://one/token", "s1", "y"),
                                 ("https://two/token", "s1", "z"),
                                 ("https://one/token", "s2", "w")]:
        a.on_unauthorized(f'Bearer realm="{realm}",service="{service}"',
                          f"repository:{repo}:pull", None)
    grants = [(url, f["grant_type"][0], f.get("refresh_token", [""])[0]) for url, f in posts]
    assert grants == [("https://one/token", "password", ""),
                      ("https://one/token", "refresh_token", "RT-of-https://one/token-s1"),
                      ("https://two/token", "password", ""),
                      ("https://one/token", "password", "")]
    assert all("RT-" not in repr(x) for x in (a, a._tokens))
