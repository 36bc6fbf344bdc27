"""Snapshot metadata in SQLite: keys, kinds, parent chains, labels, committed usage.

One row per snapshot; its integer id names its directory (`snapshots/<id>`), so the
directory tree never needs renaming when an active snapshot is committed under a new name.
Keys of active/view snapshots and names of committed ones share one namespace, as in
containerd's own metadata store.

Crash safety: every change runs in one SQLite transaction with synchronous=FULL (the
commit is fsynced before a reply leaves). A new snapshot's directory is made while its
row is inserted but not yet committed (see `create`), and a removed snapshot's directory
is deleted only after its row's deletion committed, so after a crash at any point every
committed row has its directory; the only leftovers are directories with no row, which
`Cleanup` removes.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fscache_daemon.errors import (
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    SnapshotPreconditionError,
)

SCHEMA_VERSION = 1
MAX_LABEL_BYTES = 4096  # containerd's limit on one key + value


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's snapshots.Kind on the wire."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What Stat/Walk report about one snapshot."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot's directory id and its ancestors' ids, nearest parent first."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a removed id's dir may linger
    key TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}'  -- the snapshotter's own notes (nydus.py), kept on Commit
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS lazy_mounts (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id),
    mountpoint TEXT NOT NULL
);
"""


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as containerd stores them: empty values dropped, each pair bounded."""
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise SnapshotInvalidError(
                f"label {k[:64]!r}: key and value exceed {MAX_LABEL_BYTES} bytes")
    return {k: v for k, v in labels.items() if v != ""}


class MetaStore:
    """The snapshot table of one snapshotter root; safe to call from many threads."""

    def __init__(self, path: str) -> None:
        # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE) so
        # that a read-check-write sequence cannot interleave with another writer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise SnapshotInvalidError(
                    f"{path}: snapshot metadata schema {version}, expected {SCHEMA_VERSION}")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, key: str) -> sqlite3.Row | tuple:
        row = db.execute(
            "SELECT id, kind, parent_id FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        return row

    def _chain(self, db: sqlite3.Connection, parent_id: int | None) -> tuple[int, ...]:
        ids: list[int] = []
        while parent_id is not None:
            ids.append(parent_id)
            parent_id = db.execute(
                "SELECT parent_id FROM snapshots WHERE id = ?", (parent_id,)).fetchone()[0]
        return tuple(ids)

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str],
               make_dir: Callable[[Snapshot], None],
               extra: dict[str, str] | None = None) -> Snapshot:
        """Register an active or view snapshot of `parent` (a committed snapshot, or ""
        for none). `make_dir` builds its directory inside the transaction: the row is
        committed only after the directory is complete, and not at all if it fails."""
        if not key:
            raise SnapshotInvalidError("snapshot key must not be empty")
        labels = check_labels(labels)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise SnapshotExistsError(f"snapshot {key!r} already exists")
            parent_id = None
            if parent:
                row = db.execute("SELECT id, kind FROM snapshots WHERE key = ?",
                                 (parent,)).fetchone()
                if row is None:
                    raise SnapshotNotFoundError(f"parent snapshot {parent!r} does not exist")
                if row[1] != Kind.COMMITTED:
                    raise SnapshotInvalidError(
                        f"parent {parent!r} of {key!r} is not a committed snapshot")
                parent_id = row[0]
            now = time.time_ns()
            cur = db.execute(
                "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, labels,"
                " extra) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, int(kind), parent_id, now, now, json.dumps(labels),
                 json.dumps(extra or {})))
            assert cur.lastrowid is not None
            snap = Snapshot(cur.lastrowid, kind, self._chain(db, parent_id))
            make_dir(snap)
            return snap

    def get(self, key: str) -> Snapshot:
        with self._lock:
            sid, kind, parent_id = self._row(self._db, key)
            return Snapshot(sid, Kind(kind), self._chain(self._db, parent_id))

    def commit(self, key: str, name: str, labels: dict[str, str], size: int,
               inodes: int) -> None:
        """Turn active snapshot `key` into committed snapshot `name` (same directory),
        recording its disk usage, which no longer changes."""
        if not name:
            raise SnapshotInvalidError("committed snapshot name must not be empty")
        labels = check_labels(labels)
        with self._tx() as db:
            sid, kind, _ = self._row(db, key)
            if kind != Kind.ACTIVE:
                raise SnapshotPreconditionError(f"snapshot {key!r} is not active")
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise SnapshotExistsError(f"snapshot {name!r} already exists")
            now = time.time_ns()
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?,"
                " labels = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, json.dumps(labels), size, inodes, sid))

    def remove(self, key: str) -> tuple[int, int | None]:
        """Delete snapshot `key` (which must have no children); -> (its directory id, its
        parent's id). The caller removes the directory after this returned (the deletion
        is committed)."""
        with self._tx() as db:
            sid, _, parent_id = self._row(db, key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1",
                          (sid,)).fetchone():
                raise SnapshotPreconditionError(f"cannot remove snapshot {key!r} with a child")
            if db.execute("SELECT 1 FROM lazy_mounts WHERE snapshot_id = ?",
                          (sid,)).fetchone():
                raise SnapshotPreconditionError(
                    f"snapshot {key!r}: its lazy mount is still registered")
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            return int(sid), parent_id

    def extra(self, sid: int) -> dict[str, str]:
        with self._lock:
            row = self._db.execute("SELECT extra FROM snapshots WHERE id = ?",
                                   (sid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def name_of(self, sid: int) -> str:
        """Snapshot `sid`'s key (active, view) or name (committed); "" if it is gone."""
        with self._lock:
            row = self._db.execute("SELECT key FROM snapshots WHERE id = ?",
                                   (sid,)).fetchone()
        return row[0] if row else ""

    def has_children(self, sid: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1",
                                    (sid,)).fetchone() is not None

    def lazy_mount(self, sid: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT mountpoint FROM lazy_mounts WHERE snapshot_id = ?",
                                   (sid,)).fetchone()
        return row[0] if row else None

    def set_lazy_mount(self, sid: int, mountpoint: str | None) -> None:
        with self._tx() as db:
            if mountpoint is None:
                db.execute("DELETE FROM lazy_mounts WHERE snapshot_id = ?", (sid,))
            else:
                db.execute("INSERT OR REPLACE INTO lazy_mounts VALUES (?, ?)",
                           (sid, mountpoint))

    def _info(self, row: tuple) -> Info:
        key, kind, parent, created, updated, labels = row
        return Info(key, parent or "", Kind(kind), created, updated, json.loads(labels))

    _INFO_SQL = ("SELECT s.key, s.kind, p.key, s.created_ns, s.updated_ns, s.labels"
                 " FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id")

    def stat(self, key: str) -> Info:
        with self._lock:
            row = self._db.execute(self._INFO_SQL + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        return self._info(row)

    def walk(self) -> list[Info]:
        with self._lock:
            rows = self._db.execute(self._INFO_SQL + " ORDER BY s.id").fetchall()
        return [self._info(r) for r in rows]

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Info:
        """Containerd's Update: only labels are mutable. No paths (or "labels") replaces
        them all; "labels.K" sets (or, with an empty or absent value, removes) one."""
        with self._tx() as db:
            row = db.execute("SELECT labels FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
            current: dict[str, str] = json.loads(row[0])
            if not paths:
                paths = ["labels"]
            for path in paths:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels."):]
                    current[label] = labels.get(label, "")
                else:
                    raise SnapshotInvalidError(
                        f"cannot update field {path!r} of snapshot {key!r}")
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?",
                       (json.dumps(check_labels(current)), time.time_ns(), key))
        return self.stat(key)

    def usage(self, key: str) -> tuple[Kind, int, int, int]:
        """-> (kind, directory id, recorded size, recorded inodes)."""
        with self._lock:
            row = self._db.execute("SELECT kind, id, size, inodes FROM snapshots"
                                   " WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"snapshot {key!r} does not exist")
        return Kind(row[0]), row[1], row[2], row[3]

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold off every writer (for Cleanup: no directory is being made meanwhile)."""
        with self._lock:
            yield
