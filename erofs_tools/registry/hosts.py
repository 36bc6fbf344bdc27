"""Per-registry endpoints from a hosts directory, the layout containerd reads
(`config_path`, e.g. /etc/containerd/certs.d): `DIR/<host>/hosts.toml`.

For a registry host (`host[:port]` of an image reference) the directory looked up is
`DIR/<host>_<port>_` (when there is a port), else `DIR/<host>[:<port>]`, else
`DIR/_default`. Its `hosts.toml`:

    server = "https://registry.example"        # the upstream (default https://<host>)
    [host."http://127.0.0.1:5001"]              # tried first, in file order
      capabilities = ["pull", "resolve"]        # of pull, resolve, push (default: all)
      skip_verify = true                        # TLS without certificate checks
      ca = "ca.crt"                             # or a list; relative to the directory
      client = ["client.pem"]                   # or [["client.cert", "client.key"]]
      override_path = true                      # the URL path is the API root itself
      [host."http://127.0.0.1:5001".header]
        X-Custom = "value"                      # or a list of values

The same keys may stand at the top level for the server. The endpoints are the `host`
tables in the order they are written, then the server; a client tries them in that
order (blob reads: those with `pull`; manifests: `resolve`) and takes the first answer.
A directory without `hosts.toml` supplies CA files (`*.crt`) and client pairs
(`*.cert` + `*.key`) for the server only, as docker's certs.d does.

A URL without a path talks to `/v2`; with a path, the API root is that path plus `/v2`
(unless `override_path`). Requests to a mirror carry `?ns=<registry host>` so that a
mirror serving several registries knows which one is meant.

Credentials are not part of this file: each endpoint gets its own host's credentials
(docker config), so a mirror never sees the upstream's.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from dataclasses import dataclass, field

from ..errors import InputError
from .reference import is_loopback

CAPABILITIES = ("pull", "resolve", "push")
MAX_HOSTS_FILE = 1 << 20
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint serving a registry's content."""

    scheme: str                      # "http" or "https"
    host: str                        # host[:port]
    path: str = "/v2"                # the API root
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    ca: tuple[str, ...] = ()         # extra CA files (added to the system's)
    client: tuple[tuple[str, str], ...] = ()   # (cert file, key file or "")
    skip_verify: bool | None = None
    header: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def insecure(self) -> bool:
        return self.scheme == "http"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def is_mirror(self, registry: str) -> bool:
        """Whether this endpoint stands in for `registry` (containerd adds ?ns= then)."""
        return self.host != registry and not (
            registry == DOCKER_HUB and self.host == "registry-1.docker.io")


def host_dir(root: str, host: str) -> str | None:
    """The directory holding `host`'s configuration, or None. `root` may list several
    directories separated by ':' (containerd's `config_path`): the first that has one
    for the host wins."""
    names = []
    name, sep, port = host.rpartition(":")
    if sep and name and port.isdigit():
        names.append(f"{name}_{port}_")
    names += [host, "_default"]
    for r in (x for x in root.split(os.pathsep) if x):
        for n in names:
            if "/" in n or n in (".", ".."):
                continue
            p = os.path.join(r, n)
            if os.path.isdir(p):
                return p
    return None


def registry_hosts(root: str | None, host: str,
                   default_scheme: str | None = None) -> list[RegistryHost]:
    """The endpoints for registry `host`, in the order to try them; without a hosts
    directory (or an entry for the host) just the registry itself. `default_scheme`
    ("http" for an insecure registry) is the server's scheme when nothing says one."""
    entries: list[dict] = []
    server: dict | None = None
    where = host_dir(root, host) if root else None
    if where is not None:
        path = os.path.join(where, "hosts.toml")
        if os.path.exists(path):
            entries, server = _parse_file(path, where)
        else:
            server = _cert_files(where)
    hosts = [_endpoint(e) for e in entries]
    hosts.append(_server_endpoint(host, server or {}, default_scheme))
    return hosts


def _server_endpoint(host: str, cfg: dict, default_scheme: str | None) -> RegistryHost:
    if cfg.get("url"):
        return _endpoint(cfg)
    if host == DOCKER_HUB:
        scheme, name = "https", "registry-1.docker.io"
    elif is_loopback(host) and default_scheme in (None, "http"):
        scheme, name = "http", host
    else:
        scheme, name = default_scheme or "https", host
    # whatever capabilities the top level names, the registry itself can do everything
    return _endpoint({**cfg, "url": f"{scheme}://{name}", "capabilities": None,
                      "override_path": False})


def _endpoint(cfg: dict) -> RegistryHost:
    url = cfg["url"]
    p = urllib.parse.urlsplit(url)
    path = p.path
    if path:
        path = os.path.normpath(path).rstrip("/") or "/"
        if not path.endswith("/v2") and not cfg.get("override_path"):
            path = path.rstrip("/") + "/v2"
    elif not cfg.get("override_path"):
        path = "/v2"
    caps = cfg.get("capabilities")
    return RegistryHost(p.scheme, p.netloc, path,
                        frozenset(caps) if caps else frozenset(CAPABILITIES),
                        tuple(cfg.get("ca") or ()), tuple(cfg.get("client") or ()),
                        cfg.get("skip_verify"), tuple(cfg.get("header") or ()))


def read_toml(path: str, limit: int, what: str = "") -> dict:
    """A TOML file of at most `limit` bytes, or an InputError naming the file (and
    `what` it is meant to be): tomllib's messages give the line and column, never the
    text, so no secret a file holds reaches a message."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read{what}: {e.strerror}") from None
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: not valid TOML: {' '.join(str(e).split())}") from None


def _parse_file(path: str, base: str) -> tuple[list[dict], dict]:
    doc = read_toml(path, MAX_HOSTS_FILE)
    tables = doc.get("host", {})
    if not isinstance(tables, dict):
        raise InputError(f"{path}: 'host' must be a table of [host.\"URL\"] tables")
    entries = []
    for url, cfg in tables.items():   # tomllib keeps the order of the file
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: host {url!r} must be a table")
        entries.append(_config(path, base, _url(path, url), cfg))
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    server = doc.get("server")
    if server is not None and (not isinstance(server, str) or not server):
        raise InputError(f"{path}: 'server' must be a URL string")
    return entries, _config(path, base, _url(path, server) if server else "", top)


def _url(path: str, text: str) -> str:
    if not text.startswith(("http://", "https://")):
        if "://" in text:
            raise InputError(f"{path}: {text!r}: only http:// and https:// hosts")
        text = "https://" + text
    p = urllib.parse.urlsplit(text)
    if not p.hostname or p.query or p.fragment or "@" in p.netloc:
        raise InputError(f"{path}: {text!r} is not a registry URL (scheme://host[:port]"
                         "[/path])")
    try:
        _ = p.port
    except ValueError:
        raise InputError(f"{path}: {text!r}: bad port") from None
    return text


_KNOWN = {"capabilities", "ca", "client", "skip_verify", "header", "override_path"}


def _config(path: str, base: str, url: str, cfg: dict) -> dict:
    where = f"{path}: {url or 'server'}"
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}")
    out: dict = {"url": url, "override_path": bool(cfg.get("override_path", False))}
    caps = cfg.get("capabilities")
    if caps is not None:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise InputError(f"{where}: capabilities must be a list of strings")
        bad = [c for c in caps if c.lower() not in CAPABILITIES]
        if bad:
            raise InputError(f"{where}: unknown capability {bad[0]!r}")
        out["capabilities"] = [c.lower() for c in caps]
    sv = cfg.get("skip_verify")
    if sv is not None and not isinstance(sv, bool):
        raise InputError(f"{where}: skip_verify must be true or false")
    out["skip_verify"] = sv
    if "ca" in cfg:
        out["ca"] = [_abs(base, f) for f in _strings(cfg["ca"], where, "ca")]
    if "client" in cfg:
        out["client"] = _client_pairs(cfg["client"], base, where)
    if "header" in cfg:
        out["header"] = _headers(cfg["header"], where)
    return out


def _strings(v, where: str, what: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise InputError(f"{where}: {what} must be a string or a list of strings")


def _client_pairs(v, base: str, where: str) -> list[tuple[str, str]]:
    items = [v] if isinstance(v, str) else v if isinstance(v, list) else None
    if items is None:
        raise InputError(f"{where}: client must be a file or a list of files or pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(base, item), ""))
        elif isinstance(item, list) and len(item) == 2 and \
                all(isinstance(x, str) for x in item):
            pairs.append((_abs(base, item[0]), _abs(base, item[1])))
        else:
            raise InputError(f"{where}: client pair must be [\"cert\", \"key\"]")
    return pairs


def _headers(v, where: str) -> list[tuple[str, str]]:
    if not isinstance(v, dict):
        raise InputError(f"{where}: header must be a table")
    out = []
    for k, val in v.items():
        for one in _strings(val, where, f"header {k!r}"):
            if any(c in one or c in k for c in "\r\n\0"):
                raise InputError(f"{where}: header {k!r}: control characters")
            out.append((k, one))
    return out


def _abs(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _cert_files(where: str) -> dict:
    """docker's certs.d layout: `*.crt` CA files, `*.cert` client certs with their
    `*.key` (or the key inside the .cert file)."""
    try:
        names = sorted(os.listdir(where))
    except OSError as e:
        raise InputError(f"{where}: cannot list: {e.strerror}") from None
    ca = [os.path.join(where, n) for n in names if n.endswith(".crt")]
    client = []
    for n in names:
        if n.endswith(".cert"):
            key = n[:-5] + ".key"
            client.append((os.path.join(where, n),
                           os.path.join(where, key) if key in names else ""))
    return {"url": "", "ca": ca, "client": client}
