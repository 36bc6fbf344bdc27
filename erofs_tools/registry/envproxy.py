"""The proxy the environment names for a URL, as Go's http.ProxyFromEnvironment has it
(containerd's pulls, and so the node's other registry traffic, go through it).

HTTPS_PROXY (or https_proxy) serves https URLs, HTTP_PROXY (or http_proxy) http ones
(not when REQUEST_METHOD is set: in a CGI program HTTP_PROXY is a request header);
a value without a scheme is http://. NO_PROXY (or no_proxy) lists, separated by commas,
what goes direct: `*` (everything), an IP address or CIDR block (`10.0.0.0/8`,
`fd00::/8`), an address with a port (`10.1.2.3:5000`, `[::1]:5000`), or a domain:
`example.com` is example.com and its subdomains, `.example.com` and `*.example.com` only
the subdomains, each optionally with `:PORT` (compared with the URL's port, 443 or 80
when it names none). localhost and loopback addresses never use a proxy. Curl differs
(a leading dot also matches the domain itself, ports are not compared): Go's rules are
the ones containerd applies to the same variables.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InputError

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name) or env.get(name.lower()) or ""


@dataclass(frozen=True)
class _Domain:
    suffix: str         # ".example.com"
    port: str           # "" for any
    itself: bool        # the bare domain matches too


class EnvProxy:
    """The proxy settings of an environment (read once, as Go reads them once)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.https = _proxy_url(_get(env, "HTTPS_PROXY"))
        self.http = "" if env.get("REQUEST_METHOD") else _proxy_url(_get(env, "HTTP_PROXY"))
        self._all = False
        self._nets: list[tuple[_Net, str]] = []       # (network, port or "")
        self._domains: list[_Domain] = []
        for raw in _get(env, "NO_PROXY").split(","):
            self._add(raw.strip().lower())

    def _add(self, p: str) -> None:
        if not p:
            return
        if p == "*":
            self._all = True
            return
        try:
            self._nets.append((ipaddress.ip_network(p, strict=False), ""))
            return
        except ValueError:
            pass
        host, port = _split_port(p)
        if not host:
            return              # ":80": no host, ignored as Go ignores it
        try:
            self._nets.append((ipaddress.ip_network(host.strip("[]")), port))
            return
        except ValueError:
            pass
        if host.startswith("*."):
            host = host[1:]
        itself = not host.startswith(".")
        self._domains.append(_Domain(host if not itself else "." + host, port, itself))

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL for ``url``, or None (direct)."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.https if parts.scheme == "https" else \
            self.http if parts.scheme == "http" else ""
        if not proxy or self._all:
            return None
        host = (parts.hostname or "").lower().rstrip(".")
        try:
            port = str(parts.port or (443 if parts.scheme == "https" else 80))
        except ValueError:
            return None
        if host == "localhost":
            return None
        ip: _Addr | None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.is_loopback:
                return None
            if any(ip in net and (not p or p == port) for net, p in self._nets):
                return None
        for d in self._domains:
            if (host.endswith(d.suffix) or (d.itself and host == d.suffix[1:])) \
                    and (not d.port or d.port == port):
                return None
        return proxy


def _split_port(p: str) -> tuple[str, str]:
    """"host:port" -> (host, port); a bare host or IPv6 address -> (it, "")."""
    if p.startswith("["):
        host, _, rest = p[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, sep, port = p.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, port
    return p, ""


def _proxy_url(value: str) -> str:
    """A proxy variable's value as a URL ("" if unset); a scheme other than http and
    https is refused: we cannot speak it (socks5), and going direct instead would
    bypass a proxy the network may require."""
    value = value.strip()
    if not value:
        return ""
    if "://" not in value:
        value = "http://" + value
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise InputError(f"proxy scheme {scheme!r} from the environment is not supported "
                         "(http and https proxies only)")
    return value
