"""Registry settings from containerd's own configuration file (`/etc/containerd/config.toml`):
what a node that pulls through containerd's CRI plugin already has, so that the
daemon's blob reads use the same credentials and hosts directory as containerd's pulls.

The CRI plugin's `registry` table (config version 2: `[plugins."io.containerd.grpc.v1.cri"
.registry]`; version 1: `[plugins.cri.registry]`; version 3:
`[plugins."io.containerd.cri.v1.images".registry]`):

    config_path = "/etc/containerd/certs.d"       # the hosts directory (hosts.py); a
                                                  # list separated by ':' is searched in order
    [plugins."io.containerd.grpc.v1.cri".registry.configs."registry.example:5000".auth]
      username = "user"                           # with password, or
      password = "secret"
      identitytoken = "..."                       # an OAuth2 refresh token, or
      auth = "dXNlcjpzZWNyZXQ="                   # base64 of user:password

`registry.auths."https://registry.example"` (deprecated in containerd, keyed by URL) is
read the way containerd 1.6 reads it: as the `configs` entry of the URL's host, which it
replaces. containerd tries `username`, then `identitytoken`, then `auth`; so does this.

The rule is containerd's and the one of every other credential source here: an entry is
keyed by `host[:port]` exactly as the endpoint is contacted, and its credentials go only
to that endpoint (a mirror needs its own entry; a redirect to another origin gets none:
session.py). The deprecated `mirrors` and `configs.tls` tables are not read (a warning
says so): the hosts directory says the same per host.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse
from dataclasses import dataclass, field

from ..errors import AuthError, InputError
from .auth import Credentials
from .hosts import read_toml

log = logging.getLogger(__name__)

MAX_CONFIG_FILE = 4 << 20
# the CRI plugin's name in config versions 2, 1 and 3 (containerd 2.x: images plugin)
CRI_PLUGINS = ("io.containerd.grpc.v1.cri", "cri", "io.containerd.cri.v1.images")
_AUTH_KEYS = ("username", "password", "auth", "identitytoken")


@dataclass(frozen=True)
class CriRegistryConfig:
    """The parts of containerd's CRI registry configuration the daemon uses."""

    path: str
    config_path: str | None = None            # hosts directory (or ':'-separated list)
    auths: dict[str, Credentials] = field(default_factory=dict, repr=False)

    def credentials(self, host: str) -> Credentials | None:
        """The credentials configured for endpoint `host` (`host[:port]`), else None."""
        return self.auths.get(host.lower())


def load_cri_config(path: str) -> CriRegistryConfig:
    """Read containerd's config file; a clear one-line error (naming the file and the
    key, never a secret) if it cannot be used."""
    doc = read_toml(path, MAX_CONFIG_FILE, " containerd config")
    registry, where = _registry_table(path, doc)
    if registry is None:
        return CriRegistryConfig(path)
    config_path = registry.get("config_path")
    if config_path is not None and not isinstance(config_path, str):
        raise InputError(f"{path}: {where}.config_path must be a string")
    for old in ("mirrors",):
        if registry.get(old):
            log.warning("%s: %s.%s is not read (deprecated in containerd): use config_path "
                        "and hosts.toml", path, where, old)
    auths: dict[str, Credentials] = {}
    configs = _table(path, registry, "configs", where)
    for host, cfg in configs.items():
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: {where}.configs.{_q(host)} must be a table")
        if cfg.get("tls"):
            log.warning("%s: %s.configs.%s.tls is not read (deprecated in containerd): use "
                        "config_path and hosts.toml", path, where, _q(host))
        auth = _table(path, cfg, "auth", f"{where}.configs.{_q(host)}")
        _put(auths, _host_key(path, host, f"{where}.configs"),
             _credentials(path, auth, f"{where}.configs.{_q(host)}.auth"))
    # containerd 1.6 turns each deprecated `auths` URL into its host's `configs` entry
    for url, auth in _table(path, registry, "auths", where).items():
        if not isinstance(auth, dict):
            raise InputError(f"{path}: {where}.auths.{_q(url)} must be a table")
        p = urllib.parse.urlsplit(url)
        host = p.netloc if p.scheme else url
        _put(auths, _host_key(path, host, f"{where}.auths"),
             _credentials(path, auth, f"{where}.auths.{_q(url)}"))
    return CriRegistryConfig(path, config_path or None, auths)


def _registry_table(path: str, doc: dict) -> tuple[dict | None, str]:
    plugins = doc.get("plugins")
    if plugins is None:
        return None, ""
    if not isinstance(plugins, dict):
        raise InputError(f"{path}: 'plugins' must be a table")
    for name in CRI_PLUGINS:
        cri = plugins.get(name)
        if cri is None:
            continue
        where = f"plugins.{_q(name)}"
        if not isinstance(cri, dict):
            raise InputError(f"{path}: {where} must be a table")
        if "registry" in cri:
            if not isinstance(cri["registry"], dict):
                raise InputError(f"{path}: {where}.registry must be a table")
            return cri["registry"], f"{where}.registry"
    return None, ""


def _table(path: str, parent: dict, key: str, where: str) -> dict:
    v = parent.get(key, {})
    if not isinstance(v, dict):
        raise InputError(f"{path}: {where}.{key} must be a table")
    return v


def _q(key: str) -> str:
    return f'"{key}"' if not key.replace("_", "").replace("-", "").isalnum() else key


def _host_key(path: str, host: str, where: str) -> str:
    if not host or any(c in host for c in "/@ \t\r\n\0"):
        raise InputError(f"{path}: {where}: {host!r} is not a registry host[:port]")
    return host.lower()


def _put(auths: dict[str, Credentials], host: str, creds: Credentials | None) -> None:
    if creds is None:
        auths.pop(host, None)       # an empty entry: anonymous, as containerd has it
    else:
        auths[host] = creds


def _credentials(path: str, auth: dict, where: str) -> Credentials | None:
    unknown = sorted(set(auth) - set(_AUTH_KEYS))
    if unknown:
        raise InputError(f"{path}: {where}: unknown key {unknown[0]!r}")
    for k in _AUTH_KEYS:
        if k in auth and not isinstance(auth[k], str):
            raise InputError(f"{path}: {where}.{k} must be a string")
    if auth.get("username"):
        return Credentials(auth["username"], auth.get("password", ""))
    if auth.get("identitytoken"):
        return Credentials("<token>", "", auth["identitytoken"])
    encoded = auth.get("auth")
    if not encoded:
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode() \
            .partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        user, sep, password = "", "", ""
    if not sep or not user:
        # which entry is broken, never what it holds
        raise AuthError(f"{path}: {where}.auth is malformed (expected base64 of "
                        "user:password)")
    return Credentials(user, password.rstrip("\0"))

