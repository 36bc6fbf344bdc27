"""The token requests of real containerd (Debian's 1.6: `ctr content fetch --user`,
whose docker authorizer runs in ctr) and ours, side by side at the fixtures' token
issuer in front of the real docker-registry: for each way the realm answers the OAuth2
POST (taken, or refused with 404, 405, 400, 401, 403), and for a password and an
identity token (`--refresh TOKEN`: no user, as containerd's CRI passes one), the
requests the issuer receives have the same shape: method, grant type and form fields,
Basic credentials in the GET or none, and whether the fetch ends in a token; a push
that mounts blobs asks one token for both repositories' scopes, sorted, as `ctr images
push` does. Failed before the client POSTed grants with passwords and fell back as
containerd does.
"""
import base64
import os
import shutil

import pytest
from containerd_fixtures import Containerd, OciImage, require_containerd, short_tmpdir
from registry_fixtures import start_registry

from erofs_tools.errors import ErofsToolsError
from erofs_tools.registry import Credentials

pytestmark = pytest.mark.registry

RT = "RT-parity-" + "e" * 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_containerd()
    ctd = Containerd(short_tmpdir("erofs-token-ctd-"), {})
    server = start_registry(str(tmp_path_factory.mktemp("reg")), auth="token")
    server.issuer.refresh_tokens[RT] = server.username
    image = OciImage([os.urandom(3000)], ["/bin/true"])
    client = server.client()
    try:
        image.push(client, "parity/app", "v1")
    finally:
        client.close()
    yield ctd, server
    server.stop()
    ctd.stop()
    shutil.rmtree(ctd.dir, ignore_errors=True)     # content only: nothing mounted


def _shape(issuer, start: int) -> list[tuple]:
    """The requests since ``start``, without values that differ by design (client_id,
    the token, the scopes' number)."""
    out = []
    grants = iter(issuer.grants[sum(m == "POST" for m in issuer.methods[:start]):])
    for method, auth in zip(issuer.methods[start:], issuer.authorizations[start:]):
        if method == "POST":
            form = next(grants)
            fields = tuple(sorted(k for k in form if k != "access_type"))
            values = (form["grant_type"], form.get("username"), form.get("password"),
                      form.get("refresh_token"), form["service"])
            out.append(("POST", fields, values, auth))
        else:
            basic = None
            if auth:
                basic = base64.b64decode(auth.split(" ", 1)[1]).decode()
            out.append(("GET", basic))
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("refuse", [None, 404, 405, 400, 401, 403])
@pytest.mark.parametrize("who", ["password", "identity"])
def test_token_requests_shaped_as_containerds(setup, refuse, who):
    ctd, server = setup
    issuer = server.issuer
    issuer.refuse_post = refuse
    who_args = ["--user", f"{server.username}:{server.password}"] if who == "password" \
        else ["--refresh", RT]
    ref = f"{server.host}/parity/app:v1"

    start = len(issuer.methods)
    p = ctd.ctr("content", "fetch", "--plain-http", *who_args, ref, check=False,
                timeout=120)
    theirs, their_ok = _shape(issuer, start), p.returncode == 0

    start = len(issuer.methods)
    creds = Credentials(server.username, server.password) if who == "password" else \
        Credentials("<token>", "", RT)
    client = server.client(credentials=creds)
    try:
        client.get_manifest("parity/app", "v1")
        ours_ok = True
    except ErofsToolsError:
        ours_ok = False
    finally:
        client.close()
    ours = _shape(issuer, start)
    assert (ours, ours_ok) == (theirs, their_ok), p.stderr.decode(errors="replace")[:700]


def test_mount_token_scopes_as_containerds(setup):
    """A push that mounts the blobs from the repository they were pulled from: containerd
    asks one token for the destination's pull,push and the source's pull together
    (sorted); so does our mount. containerd also adds the scopes of the challenge that
    first named the realm in that process (docs/registry.md: not copied)."""
    ctd, server = setup
    issuer = server.issuer
    issuer.refuse_post = None
    user = f"{server.username}:{server.password}"
    src = f"{server.host}/parity/app:v1"
    ctd.ctr("content", "fetch", "--plain-http", "--user", user, src)
    start = len(issuer.requests)
    ctd.ctr("images", "push", "--plain-http", "--user", user,
            f"{server.host}/parity/theirs:v1", src)
    theirs = [s for _, s in issuer.requests[start:]
              if "repository:parity/app:pull" in s and len(s) > 1]
    assert theirs, issuer.requests[start:]
    want = ["repository:parity/app:pull", "repository:parity/theirs:pull,push"]
    assert all(s == sorted(s) and set(want) <= set(s) for s in theirs), theirs

    client = server.client()
    try:
        manifest = client.get_manifest("parity/app", "v1")
        digest = manifest.blobs()[0].digest
        start = len(issuer.requests)
        assert client.mount_blob("parity/ours", digest, "parity/app")
    finally:
        client.close()
    ours = [s for _, s in issuer.requests[start:] if "repository:parity/app:pull" in s]
    assert ours == [["repository:parity/app:pull", "repository:parity/ours:pull,push"]], \
        issuer.requests[start:]
    assert [g["scope"] for g in issuer.grants[-len(ours):]] == [" ".join(ours[0])]
