"""The change index: what the upper layer holds, path by path, kept as changes happen.

A container's changes are exactly its upper layer, so a diff only needs the upper's entries, never the
lowers' whole tree. The index keeps one record per upper path (sorted, so a subtree is a range) with
what ``lstat`` said of it, and the content hash of regular files once asked.

Why it can be trusted after a crash, or after someone else wrote to the upper:

- Every path is written to the journal (``journal``, one path per line) *before* the upper changes
  there. A killed daemon's last writes are in the kernel already; on the next load the journal's paths
  are looked at again, so nothing the daemon did goes unrecorded.
- Every record holds the entry's inode number and ctime. Nobody can change an entry without changing
  its ctime, nor add or remove one without changing its directory's: on load, ``verify`` looks at every
  recorded path once and rescans the directories whose ctime moved. That catches kernel overlayfs or
  a person having written to the upper in between, at the cost of the index's size, not the tree's.
- ``save`` writes a snapshot (``records``) atomically and empties the journal; a missing or unreadable
  snapshot means a full walk of the upper, never a wrong answer.

No FUSE here; the union calls ``note`` around its changes.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Iterator, NamedTuple

import xxhash
from sortedcontainers import SortedDict

from . import whiteout

_SNAPSHOT = "records"
_JOURNAL = "journal"
_VERSION = 1


class Record(NamedTuple):
    """An upper entry as the index last saw it."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    rdev: int
    target: str | None  # a symlink's target
    opaque: bool  # a directory hiding the lowers below it
    digest: str | None = None  # xxh3-128 of a regular file's content, once computed

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_whiteout(self) -> bool:
        return whiteout.is_whiteout_device(self.mode, self.rdev)

    # Read like an os.stat_result by the code that classifies changes.
    st_mode = property(lambda self: self.mode)
    st_uid = property(lambda self: self.uid)
    st_gid = property(lambda self: self.gid)
    st_mtime_ns = property(lambda self: self.mtime_ns)
    st_rdev = property(lambda self: self.rdev)


def _key(path: str) -> tuple[str, ...]:
    """Sort key: component by component, so "/a/b" comes right after "/a" and before "/a-b"."""
    return tuple(path.split("/"))


def _rel(path: str) -> str:
    return "." if path == "/" else path[1:]


class ChangeIndex:
    """The records of one upper layer, persisted in ``state_dir`` (outside the upper and the view).

    The upper is read through ``upper_fd`` (an O_PATH descriptor of its root, opened here if not given):
    a mount may hide the upper's path, as a mount over its own directories does.
    """

    def __init__(self, upper: str, state_dir: str, *, upper_fd: int | None = None) -> None:
        self.upper = upper.rstrip("/") or "/"
        self.state_dir = state_dir
        self._own_fd = upper_fd is None
        self._fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if upper_fd is None else upper_fd
        self._records: SortedDict = SortedDict(_key)
        self._journal = None
        self.rebuilt = False  # whether the last load had to walk the whole upper
        self.rescanned = 0  # directories whose ctime had moved behind the index's back

    # -- loading and saving

    def load(self) -> None:
        """Read the snapshot, replay the journal, check everything against the upper, open the journal."""
        os.makedirs(self.state_dir, exist_ok=True)
        if not self._read_snapshot():
            self.rebuilt = True
            self._records.clear()
            self._scan("/", recursive=True)
        else:
            for path in sorted(set(self._journal_paths()), key=_key):
                self._refresh_with_ancestors(path)
            self.verify()
        self.save()

    def save(self) -> None:
        """Write the records as a snapshot (atomically) and start an empty journal."""
        tmp = os.path.join(self.state_dir, _SNAPSHOT + ".tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps({"version": _VERSION, "upper": self.upper}) + "\n")
            for path, r in self._records.items():
                f.write(json.dumps([path, *r]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.state_dir, _SNAPSHOT))
        if self._journal is not None:
            self._journal.close()
        self._journal = open(os.path.join(self.state_dir, _JOURNAL), "w", encoding="utf-8",
                             errors="surrogateescape", buffering=1)

    def close(self) -> None:
        """Save and let go of the journal (a clean unmount)."""
        self.save()
        self._journal.close()
        self._journal = None
        if self._own_fd:
            os.close(self._fd)

    def _read_snapshot(self) -> bool:
        try:
            with open(os.path.join(self.state_dir, _SNAPSHOT), encoding="utf-8", errors="surrogateescape") as f:
                header = json.loads(f.readline())
                if header != {"version": _VERSION, "upper": self.upper}:
                    return False
                for line in f:
                    path, *fields = json.loads(line)
                    self._records[path] = Record(*fields)
        except (OSError, ValueError, TypeError):
            return False
        return True

    def _journal_paths(self) -> list[str]:
        try:
            with open(os.path.join(self.state_dir, _JOURNAL), encoding="utf-8", errors="surrogateescape") as f:
                return [line[:-1] for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []

    # -- keeping it current

    def note(self, path: str) -> None:
        """``path`` is about to change in the upper: journal it, so a crash cannot lose it."""
        self._journal.write(path + "\n")

    def refresh(self, *paths: str) -> None:
        """``paths`` changed in the upper (or went): record what is there now, and their directories
        if the upper did not have them before (copied up)."""
        for path in paths:
            self._refresh_with_ancestors(path)

    def _refresh_with_ancestors(self, path: str) -> None:
        missing = []
        parent = path
        while parent != "/":
            parent = parent.rpartition("/")[0] or "/"
            if parent in self._records:
                break
            missing.append(parent)
        for ancestor in reversed(missing):
            self._refresh(ancestor)
        self._refresh(path)

    def refresh_tree(self, path: str) -> None:
        """Everything at and below ``path`` changed (a directory renamed or copied up whole)."""
        self._forget_below(path)
        self._refresh(path)
        if path in self._records and self._records[path].is_dir:
            self._scan(path, recursive=True)

    def _refresh(self, path: str) -> None:
        record = self._read(path)
        if record is None or not record.is_dir:
            self._forget_below(path)
        if record is None:
            self._records.pop(path, None)
        else:
            self._records[path] = record

    def _read(self, path: str) -> Record | None:
        """What the upper has at ``path``; None if nothing, or if its directory is not a recorded
        directory (so a symlink put in place of a directory is never followed)."""
        if path != "/":
            parent = self._records.get(path.rpartition("/")[0] or "/")
            if parent is None or not parent.is_dir:
                return None
        rel = _rel(path)
        try:
            st = os.lstat(rel, dir_fd=self._fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        target = os.readlink(rel, dir_fd=self._fd) if stat.S_ISLNK(st.st_mode) else None
        opaque = stat.S_ISDIR(st.st_mode) and whiteout.is_opaque_dir(rel, dir_fd=self._fd)
        return Record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                      st.st_rdev, target, opaque)

    def _forget_below(self, path: str) -> None:
        for child in list(self.paths_below(path)):
            del self._records[child]

    def _scan(self, path: str, *, recursive: bool) -> None:
        """Record the entries of the upper directory ``path`` (and below, if ``recursive``)."""
        todo = [path]
        while todo:
            directory = todo.pop()
            self._refresh(directory)
            try:
                fd = os.open(_rel(directory), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            prefix = "" if directory == "/" else directory
            for name in names:
                child = prefix + "/" + name
                self._refresh(child)
                if recursive and child in self._records and self._records[child].is_dir:
                    todo.append(child)

    def verify(self) -> None:
        """Make the records match the upper: look at each once, rescan directories that moved."""
        self.rescanned = 0
        for path in list(self._records):
            old = self._records.get(path)
            if old is None:
                continue  # dropped with a directory that went
            new = self._read(path)
            if new is not None and (new.ino, new.ctime_ns) == (old.ino, old.ctime_ns):
                continue
            if new is not None and new.is_dir:
                self.rescanned += 1
                self._forget_below(path)
                self._scan(path, recursive=True)
            else:
                self._refresh(path)

    # -- reading

    def __len__(self) -> int:
        return len(self._records)

    def get(self, path: str) -> Record | None:
        return self._records.get(path)

    def items(self, under: str = "/") -> Iterator[tuple[str, Record]]:
        """(path, record) in path order, at and below ``under``."""
        if under == "/":
            yield from self._records.items()
            return
        if under in self._records:
            yield under, self._records[under]
        for path in self.paths_below(under):
            yield path, self._records[path]

    def paths_below(self, path: str) -> Iterator[str]:
        """Recorded paths strictly below ``path``, in order."""
        start = _key(path)
        for key in self._records.irange(path, inclusive=(False, False)):
            if _key(key)[:len(start)] != start:
                break
            yield key

    def digest(self, path: str) -> str:
        """The xxh3-128 of a regular file's content in the upper, computed once per version of it."""
        record = self._records[path]
        if record.digest is None:
            self._records[path] = record = record._replace(digest=file_digest(_rel(path), dir_fd=self._fd))
        return record.digest


def file_digest(path: str, *, dir_fd: int | None = None) -> str:
    """xxh3-128 of the content of the regular file at ``path`` (never through a symlink)."""
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()
