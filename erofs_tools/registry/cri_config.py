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

`imports = [...]` (top level) are followed as containerd's loader follows them: breadth
first from the main file, each file once; a relative path is relative to the importing
file's directory; a path with `*` is a glob (matches in name order; containerd takes a
relative glob from its working directory, `/` under systemd: write globs absolute). A plugin
section in a later file replaces the earlier file's section of that plugin as a whole
(containerd merges plugin tables by name, never inside one), so the CRI plugin's
registry table comes from the last file that has the CRI plugin.

The rule is containerd's and the one of every other credential source here: an entry is
keyed by `host[:port]` exactly as the endpoint is contacted, and its credentials go only
to that endpoint (a mirror needs its own entry; a redirect to another origin gets none:
session.py). The deprecated `mirrors` and `configs.tls` tables are not read (a warning
says so): the hosts directory says the same per host.
"""

from __future__ import annotations

import glob
import logging
import os
import urllib.parse
from dataclasses import dataclass, field

from ..errors import AuthError, InputError
from .auth import Credentials, decode_basic_auth
from .hosts import read_toml

log = logging.getLogger(__name__)

MAX_CONFIG_FILE = 4 << 20
MAX_CONFIG_FILES = 64         # a config and what it imports, transitively
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
    registry, where, src = _registry_table(_merged_plugins(path))
    if registry is None:
        return CriRegistryConfig(path)
    config_path = registry.get("config_path")
    if config_path is not None and not isinstance(config_path, str):
        raise InputError(f"{src}: {where}.config_path must be a string")
    for old in ("mirrors",):
        if registry.get(old):
            log.warning("%s: %s.%s is not read (deprecated in containerd): use config_path "
                        "and hosts.toml", src, where, old)
    auths: dict[str, Credentials] = {}
    configs = _table(src, registry, "configs", where)
    for host, cfg in configs.items():
        if not isinstance(cfg, dict):
            raise InputError(f"{src}: {where}.configs.{_q(host)} must be a table")
        if cfg.get("tls"):
            log.warning("%s: %s.configs.%s.tls is not read (deprecated in containerd): use "
                        "config_path and hosts.toml", src, where, _q(host))
        auth = _table(src, cfg, "auth", f"{where}.configs.{_q(host)}")
        _put(auths, _host_key(src, host, f"{where}.configs"),
             _credentials(src, auth, f"{where}.configs.{_q(host)}.auth"))
    # containerd 1.6 turns each deprecated `auths` URL into its host's `configs` entry
    for url, auth in _table(src, registry, "auths", where).items():
        if not isinstance(auth, dict):
            raise InputError(f"{src}: {where}.auths.{_q(url)} must be a table")
        p = urllib.parse.urlsplit(url)
        host = p.netloc if p.scheme else url
        _put(auths, _host_key(src, host, f"{where}.auths"),
             _credentials(src, auth, f"{where}.auths.{_q(url)}"))
    return CriRegistryConfig(path, config_path or None, auths)


def _merged_plugins(main: str) -> dict[str, tuple[str, object]]:
    """The plugin sections of `main` and the files it imports, merged as containerd
    merges them: -> {plugin name: (the file it came from, its table)}."""
    plugins: dict[str, tuple[str, object]] = {}
    loaded: set[str] = set()
    pending = [main]
    while pending:
        path, pending = pending[0], pending[1:]
        if path in loaded:
            continue
        if len(loaded) == MAX_CONFIG_FILES:
            raise InputError(f"{main}: more than {MAX_CONFIG_FILES} files imported")
        loaded.add(path)
        doc = read_toml(path, MAX_CONFIG_FILE, " containerd config")
        found = doc.get("plugins", {})
        if not isinstance(found, dict):
            raise InputError(f"{path}: 'plugins' must be a table")
        for name, table in found.items():
            plugins[name] = (path, table)
        pending += _imports(path, doc.get("imports", []))
    return plugins


def _imports(path: str, imports: object) -> list[str]:
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise InputError(f"{path}: 'imports' must be a list of paths")
    out: list[str] = []
    for imp in imports:
        if not os.path.isabs(imp):
            imp = os.path.join(os.path.dirname(path), imp)
        imp = os.path.normpath(imp)
        out += sorted(glob.glob(imp)) if "*" in imp else [imp]
    return out


def _registry_table(plugins: dict[str, tuple[str, object]]
                    ) -> tuple[dict | None, str, str]:
    """The CRI plugin's registry table: (table or None, its key path, the file that
    holds it, which the messages about it name)."""
    for name in CRI_PLUGINS:
        if name not in plugins:
            continue
        source, cri = plugins[name]
        where = f"plugins.{_q(name)}"
        if not isinstance(cri, dict):
            raise InputError(f"{source}: {where} must be a table")
        if "registry" in cri:
            if not isinstance(cri["registry"], dict):
                raise InputError(f"{source}: {where}.registry must be a table")
            return cri["registry"], f"{where}.registry", source
    return None, "", ""


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
    pair = decode_basic_auth(encoded)
    if pair is None:
        # which entry is broken, never what it holds
        raise AuthError(f"{path}: {where}.auth is malformed (expected base64 of "
                        "user:password)")
    return Credentials(*pair)

