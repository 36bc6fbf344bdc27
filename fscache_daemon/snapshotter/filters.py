"""containerd's filter expressions, as far as a snapshotter's Walk receives them.

A request carries a list of filters; a snapshot is listed when it matches any one of
them (none: every snapshot). One filter is comma-separated selectors that must all hold:

    name==sha256:abc       kind==committed      parent!=x      labels."a.b"==v
    labels.gc             (presence)            name~=^extract- (regular expression)

Fields: name, parent, kind (active, view, committed), labels.<key>. Values may be
double-quoted (backslash escapes) or bare up to the next comma.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fscache_daemon.errors import SnapshotInvalidError
from fscache_daemon.snapshotter.store import Info, Kind

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r'[A-Za-z0-9_./-]+|"(?:[^"\\]|\\.)*"')
_OP = re.compile(r"\s*(==|!=|~=)\s*")
_BARE = re.compile(r"[^,\s]*")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None  # None: the field is present (non-empty)
    value: str


def _unquote(tok: str) -> str:
    if tok.startswith('"'):
        return re.sub(r"\\(.)", r"\1", tok[1:-1])
    return tok


def parse(expr: str) -> list[Selector]:
    """One filter -> its selectors; a malformed filter is an InvalidArgument error."""
    out: list[Selector] = []
    pos, n = 0, len(expr)
    while True:
        while pos < n and expr[pos].isspace():
            pos += 1
        m = _NAME.match(expr, pos)
        if not m:
            raise SnapshotInvalidError(f"filter {expr!r}: expected a field at {pos}")
        path = [m.group(0)]
        pos = m.end()
        if path[0] == "labels" and pos < n and expr[pos] == ".":
            # labels.KEY or labels."KEY": a label key may hold dots and slashes
            m = _KEY.match(expr, pos + 1)
            if not m:
                raise SnapshotInvalidError(f"filter {expr!r}: expected a label at {pos + 1}")
            path.append(_unquote(m.group(0)))
            pos = m.end()
        op, value = None, ""
        m = _OP.match(expr, pos)
        if m:
            op, pos = m.group(1), m.end()
            if pos < n and expr[pos] == '"':
                q = re.compile(r'"(?:[^"\\]|\\.)*"').match(expr, pos)
                if not q:
                    raise SnapshotInvalidError(f"filter {expr!r}: unterminated quote")
                value, pos = _unquote(q.group(0)), q.end()
            else:
                b = _BARE.match(expr, pos)
                assert b is not None
                value, pos = b.group(0), b.end()
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise SnapshotInvalidError(f"filter {expr!r}: bad expression: {e}")
        out.append(Selector(tuple(path), op, value))
        while pos < n and expr[pos].isspace():
            pos += 1
        if pos == n:
            return out
        if expr[pos] != ",":
            raise SnapshotInvalidError(f"filter {expr!r}: unexpected {expr[pos]!r} at {pos}")
        pos += 1


def _field(info: Info, path: tuple[str, ...]) -> str | None:
    if path == ("name",):
        return info.name
    if path == ("parent",):
        return info.parent
    if path == ("kind",):
        return {Kind.ACTIVE: "active", Kind.VIEW: "view",
                Kind.COMMITTED: "committed"}[info.kind]
    if len(path) == 2 and path[0] == "labels":
        return info.labels.get(path[1])
    return None


def _holds(info: Info, sel: Selector) -> bool:
    value = _field(info, sel.path)
    if sel.op is None:
        return bool(value)
    if sel.op == "==":
        return value == sel.value
    if sel.op == "!=":
        return value != sel.value
    return value is not None and re.search(sel.value, value) is not None


def compile_filters(filters: list[str]) -> list[list[Selector]]:
    return [parse(f) for f in filters if f.strip()]


def matches(info: Info, compiled: list[list[Selector]]) -> bool:
    if not compiled:
        return True
    return any(all(_holds(info, s) for s in sels) for sels in compiled)
