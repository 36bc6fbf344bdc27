"""Tag lists in pages (distribution with ?n=, ghcr.io, ECR, Harbor): the next page is
named by a Link header; every page is read, an endless chain of them is cut, and the
pages follow the origin rule (credentials only at the registry's origin, no plain HTTP
from an HTTPS registry)."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from registry_fixtures import make_tls_cert
from test_registry_hostile import BASIC, _answer, _client, _Server

from erofs_tools.errors import RegistryError

pytestmark = pytest.mark.registry

TAGS = [f"t{i:03d}" for i in range(7)]


def _paging(n=3, endless=False, next_host=None):
    """Basic auth; /v2/app/tags/list in pages of n with Link rel="next" (relative, or on
    ``next_host`` once); endless: every page names another."""
    def handle(h, _):
        if h.headers.get("Authorization") != BASIC and not h.path.startswith("/other"):
            return _answer(h, 401, {"WWW-Authenticate": 'Basic realm="r"'})
        u = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        last = q.get("last")
        rest = [t for t in TAGS if last is None or t > last]
        page, more = rest[:n], rest[n:]
        headers = {"Content-Type": "application/json"}
        if more or endless:
            nxt = f"/v2/app/tags/list?n={n}&last={page[-1] if page else 'z'}"
            if next_host:
                nxt = next_host + nxt
            headers["Link"] = f'<{nxt}>; rel="next"'
        _answer(h, 200, headers, json.dumps({"name": "app", "tags": page}).encode())
    return handle


def _endless_new_pages(h, _):
    """Every page names a new one."""
    if h.headers.get("Authorization") != BASIC:
        return _answer(h, 401, {"WWW-Authenticate": 'Basic realm="r"'})
    n = int(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query)).get("p", 0))
    _answer(h, 200, {"Content-Type": "application/json",
                     "Link": f'</v2/app/tags/list?p={n + 1}>; rel="next"'},
            json.dumps({"name": "app", "tags": [f"p{n}"]}).encode())


def test_every_page_of_tags(tmp_path):
    cert = make_tls_cert(str(tmp_path))
    srv = _Server(_paging(), cert)
    try:
        c = _client(srv.host, insecure=False, cert=cert)
        assert c.list_tags("app") == TAGS
        assert sum("/tags/list" in p for _, p, _ in srv.seen) >= 3
    finally:
        srv.stop()


def test_endless_pages_are_cut(tmp_path, monkeypatch):
    import erofs_tools.registry.client as client_mod
    monkeypatch.setattr(client_mod, "MAX_TAG_PAGES", 20, raising=False)
    cert = make_tls_cert(str(tmp_path))
    srv = _Server(_endless_new_pages, cert)
    try:
        with pytest.raises(RegistryError, match="more than 20 pages"):
            _client(srv.host, insecure=False, cert=cert).list_tags("app")
    finally:
        srv.stop()


def test_a_page_naming_itself_ends_at_once(tmp_path):
    """A loop of pages (here: the last page names itself) is an error at the repeat,
    not 1000 requests (was: each page's tags added again, up to the page limit)."""
    cert = make_tls_cert(str(tmp_path))
    srv = _Server(_paging(endless=True), cert)
    try:
        with pytest.raises(RegistryError, match="tag pages loop"):
            _client(srv.host, insecure=False, cert=cert).list_tags("app")
        pages = sum("/tags/list" in p and not p.endswith("/tags/list")
                    for _, p, _ in srv.seen)
        assert pages <= 4       # t000-t002, t003-t005, t006, then the repeat
    finally:
        srv.stop()


def test_tag_pages_are_bounded_in_bytes(tmp_path, monkeypatch):
    """Pages that never repeat and are each large: the whole list is bounded (1000
    pages of up to 4 MiB held 4 GB)."""
    import erofs_tools.registry.client as client_mod
    monkeypatch.setattr(client_mod, "MAX_TAG_BYTES", 4096, raising=False)
    big = [f"tag-{i:06d}" for i in range(200)]

    def handle(h, _):
        if h.headers.get("Authorization") != BASIC:
            return _answer(h, 401, {"WWW-Authenticate": 'Basic realm="r"'})
        n = int(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query)).get("p", 0))
        _answer(h, 200, {"Content-Type": "application/json",
                         "Link": f'</v2/app/tags/list?p={n + 1}>; rel="next"'},
                json.dumps({"name": "app", "tags": big}).encode())
    cert = make_tls_cert(str(tmp_path))
    srv = _Server(handle, cert)
    try:
        with pytest.raises(RegistryError, match="tag list larger than 4096 bytes"):
            _client(srv.host, insecure=False, cert=cert).list_tags("app")
        assert sum("/tags/list" in p for _, p, _ in srv.seen) <= 3
    finally:
        srv.stop()


def test_next_page_on_plain_http_is_refused(tmp_path):
    cert = make_tls_cert(str(tmp_path))
    plain = _Server(_paging())
    srv = _Server(_paging(next_host=plain.url), cert)
    try:
        with pytest.raises(RegistryError, match="refusing next page"):
            _client(srv.host, insecure=False, cert=cert).list_tags("app")
        assert plain.seen == []
    finally:
        srv.stop()
        plain.stop()
