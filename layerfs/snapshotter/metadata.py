"""The snapshotter's records: each snapshot's key, id, parent, kind, times, labels and committed usage.

One sqlite database in WAL mode; every change is one transaction, so a kill -9 at any moment leaves
either the state before it or the state after it. A transaction may hold a directory rename too
(``Metadata.transaction``): the rename happens inside it, and a crash between the two leaves a directory
no record names, which ``Snapshotter`` removes when it opens (nothing half-made is ever visible).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import LayerfsError


class SnapshotError(LayerfsError):
    """A request containerd's errdefs class as the subclass's name says."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str  # the parent's key ("" for none); a parent is always committed
    kind: str  # "view", "active" or "committed"
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0  # a committed snapshot's usage, counted once at Commit
    inodes: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
"""
_COLUMNS = "id, key, parent, kind, created_ns, updated_ns, labels, size, inodes"


def _snapshot(row: tuple) -> Snapshot:
    id, key, parent, kind, created_ns, updated_ns, labels, size, inodes = row
    return Snapshot(id, key, parent, kind, created_ns, updated_ns, json.loads(labels), size, inodes)


def now_ns() -> int:
    return time.time_ns()


class Metadata:
    """The records of one snapshotter root; ``transaction`` is the only way to change them."""

    def __init__(self, path: str) -> None:
        # (one connection, used by the service's threads one at a time under its lock)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Metadata]:
        """Changes made inside are kept together or not at all (an exception rolls them back)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, key: str) -> Snapshot:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key}: not found")
        return _snapshot(row)

    def all(self) -> list[Snapshot]:
        return [_snapshot(row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")]

    def ids(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def has_children(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone() is not None

    def chain(self, snapshot: Snapshot) -> list[Snapshot]:
        """The snapshot's parents, nearest first."""
        found = []
        while snapshot.parent:
            snapshot = self.get(snapshot.parent)
            found.append(snapshot)
        return found

    def add(self, key: str, parent: str, kind: str, labels: dict[str, str]) -> Snapshot:
        stamp = now_ns()
        try:
            self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, created_ns, updated_ns, labels) VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent, kind, stamp, stamp, json.dumps(labels)),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {key}: already exists") from None
        return self.get(key)

    def save(self, snapshot: Snapshot, *, old_key: str | None = None) -> None:
        """Write the snapshot's record back (under a new key when ``old_key`` is its former one)."""
        try:
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, labels = ?, size = ?, "
                "inodes = ? WHERE key = ?",
                (
                    snapshot.key,
                    snapshot.kind,
                    snapshot.created_ns,
                    snapshot.updated_ns,
                    json.dumps(snapshot.labels),
                    snapshot.size,
                    snapshot.inodes,
                    old_key or snapshot.key,
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {snapshot.key}: already exists") from None

    def remove(self, key: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
