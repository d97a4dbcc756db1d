"""The change index: what the upper layer holds, path by path, kept as changes happen.

A container's changes are exactly its upper layer, so a diff only needs the upper's entries, never the
lowers' whole tree. The index keeps one record per upper path (sorted, so a subtree is a range) with
what ``lstat`` said of it, and the content hash of regular files once asked.

Why it can be trusted after a crash, or after someone else wrote to the upper:

- Every path is written to the journal (``journal``, one JSON string per line) *before* the upper
  changes there. A killed daemon's last writes are in the kernel already; on the next load the
  journal's paths are looked at again (and what is new below them), so nothing the daemon did goes
  unrecorded. The daemon itself only journals, and holds no records; every 100,000 journal lines a
  background thread folds the journals into a new snapshot, and ``sync`` (unmount) does it at once.
  Readers pair a snapshot with the journals of its generation and later ones.
- Every record holds the entry's inode number and ctime. Nobody can change an entry without changing
  its ctime, nor add or remove one without changing its directory's: on load, ``verify`` looks at every
  recorded path once and rescans the directories whose ctime moved. That catches kernel overlayfs or
  a person having written to the upper in between, at the cost of the index's size, not the tree's.
- ``sync`` writes a snapshot (``records``) atomically and empties the journal; a missing or unreadable
  snapshot means a full walk of the upper, never a wrong answer.
- The state lives beside the upper, on its filesystem. When that is full, the index does not stand in
  the way of changes that need no space (a container freeing space by deleting files): it stops
  journaling and removes its snapshot, so that readers, and the next load, walk the upper instead of
  trusting a journal with gaps. The next sync that finds space (the unmount's) saves it again.

No FUSE here; the union calls ``note`` before its changes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TextIO

import xxhash
from sortedcontainers import SortedDict

from . import confined, metacopy, redirect, whiteout, xattr
from .layer import Layer
from .lookup import Part, Resolver

_SNAPSHOT = "records"
_SYNC_EVERY = 100_000  # journal lines
_RECENT = 4096  # paths remembered as journaled already
_JOURNAL = "journal-{}"  # one per snapshot generation
_FULL = (errno.ENOSPC, errno.EDQUOT)
_VERSION = 4


class LowerFacts(NamedTuple):
    """What a change is classified by, of the entry the lowers show at a path (read like a stat)."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)

    @classmethod
    def of(cls, st: os.stat_result) -> LowerFacts:
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


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
    redirect: str | None  # a directory renamed with its lower parts elsewhere: where (core.redirect)
    metacopy: bool  # a regular file holding metadata only, its data below (core.metacopy)
    digest: str | None = None  # xxh3-128 of a regular file's content, once computed
    # What the lowers show at this path, looked up once (they never change): known or not, and the
    # lower entry's facts (None: nothing there) and signature (content and xattrs), once computed.
    lower_known: bool = False
    lower: LowerFacts | None = None
    lower_sig: str | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_whiteout(self) -> bool:
        return whiteout.is_whiteout_device(self.mode, self.rdev)

    # Read like an os.stat_result by the code that classifies changes.
    @property
    def st_mode(self) -> int:
        return self.mode

    @property
    def st_uid(self) -> int:
        return self.uid

    @property
    def st_gid(self) -> int:
        return self.gid

    @property
    def st_size(self) -> int:
        return self.size

    @property
    def st_mtime_ns(self) -> int:
        return self.mtime_ns

    @property
    def st_rdev(self) -> int:
        return self.rdev


def _key(path: str) -> str:
    """Sort key: component by component, so "/a/b" comes right after "/a" and before "/a-b". (A name
    has no NUL, which sorts before every other character; one string keeps the index small.)"""
    return path.replace("/", "\0")


def _rel(path: str) -> str:
    return "." if path == "/" else path[1:]


class ChangeIndex:
    """The records of one upper layer, persisted in ``state_dir`` (outside the upper and the view).

    The upper is read through ``upper_fd`` (an O_PATH descriptor of its root, opened here if not given):
    a mount may hide the upper's path, as a mount over its own directories does.
    """

    def __init__(self, upper: str, state_dir: str | None, *, lowers: Sequence[str] = (),
                 lower_layers: Sequence[Layer] | None = None, upper_fd: int | None = None,
                 state_fd: int | None = None) -> None:
        """``lowers`` are the paths of the lower layers (top first); a mount passes its own open
        ``lower_layers`` too, else they are opened here (looked up name by name: a diff asks about few)."""
        self.upper = upper.rstrip("/") or "/"
        self.lowers = [os.path.abspath(p) for p in lowers]
        self._lower_layers = None if lower_layers is None else list(lower_layers)
        self._lower_resolver: Resolver | None = None
        self._own_fd = upper_fd is None
        self._fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if upper_fd is None else upper_fd
        self._own_state = state_fd is None
        if state_fd is None:
            if state_dir is None:
                raise ValueError("an index needs its state directory or its descriptor")
            # Opened now: the state directory's path may be hidden by the mount later, like the upper's.
            os.makedirs(state_dir, exist_ok=True)
            state_fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._state = state_fd
        self._records: SortedDict = SortedDict(_key)
        self._journal: TextIO | None = None
        self._generation = 0  # of the snapshot read: the first journal it needs
        self._journal_generation = 0  # of the journal being written
        self._compactor: threading.Thread | None = None
        self._recent: dict[str, None] = {}  # paths journaled lately: not written again
        self._lines = 0  # in the journal
        self._journal_only = False  # the daemon's way: records only in the snapshot
        self._paused = False  # the state's filesystem was full: no journal, no snapshot
        self._lock = threading.Lock()
        self.rebuilt = False  # whether the last load had to walk the whole upper
        self.rescanned: list[str] = []  # directories whose ctime had moved behind the index's back

    @property
    def upper_fd(self) -> int:
        return self._fd

    def descriptors(self) -> list[int]:
        """The descriptors the index holds (upper, lowers, state directory, journal)."""
        held = [self._fd, self._state] + ([self._journal.fileno()] if self._journal is not None else [])
        return held + [layer.fd for layer in self._lower_view().layers] if self.lowers else held

    def _open(self, name: str, mode: str):
        return open(name, mode, encoding="utf-8", errors="surrogateescape",
                    opener=lambda n, flags: os.open(n, flags | os.O_CLOEXEC, 0o600, dir_fd=self._state))

    # -- loading and saving

    def load(self, *, readonly: bool = False) -> None:
        """Read the snapshot, catch up with the journal, check everything against the upper; then
        (unless ``readonly``: someone else, a running daemon, owns the state) save and start journaling."""
        for _ in range(5):
            journal = self._read_state()
            if journal is not None:
                self._catch_up(journal)
                self.verify()
                break
            if self._generation == 0:
                break  # no snapshot (or an unreadable one)
            # The daemon saved a new generation between our reading the snapshot and its journal.
        else:
            journal = None
        if journal is None:
            self.rebuilt = True
            self._records.clear()
            self._scan("/", recursive=True)
        if not readonly:
            try:
                self._save()
                self._paused = False
            except OSError as e:
                if e.errno not in _FULL:
                    raise
                self._pause()

    def _pause(self) -> None:
        """The state's filesystem is full: stop journaling, and take the snapshot away first, so that
        nobody trusts the journal's gaps (readers walk the upper instead)."""
        self._paused = True
        if self._compactor is not None:
            self._compactor.join()  # it could write a snapshot after ours is gone
            self._compactor = None
        for name in (_SNAPSHOT, _SNAPSHOT + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._state)

    def start_journal(self) -> None:
        """For the daemon: bring the saved state up to date and start journaling. The records are not
        kept: each sync reads them back, so the daemon's memory does not grow with the upper."""
        self.load()
        self._records.clear()
        self._journal_only = True

    def sync(self) -> None:
        """Catch the records up with the journal, check them, save them (the journal starts over)."""
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        if self._compactor is not None:
            self._compactor.join()
            self._compactor = None
        if self._journal_only:
            self.load()  # read back what was saved, catch up, save
            self._records.clear()
        else:
            self._catch_up(self._read_journals(self._generation) or [])
            self.verify()
            self._save()

    def _save(self) -> None:
        """The records as the snapshot of a new generation, whose journal starts empty. Readers pair a
        snapshot with the journals of its generation and later ones: the new journal comes first, the
        snapshot that needs it next, and only then do older journals go (a reader that finds its
        snapshot's journal gone reads again)."""
        generation = max(self._generation, self._journal_generation) + 1
        self._start_journal(generation)
        self._write_snapshot(generation)
        self._remove_journals_before(generation)

    def _start_journal(self, generation: int) -> None:
        # Line-buffered: each noted path is in the kernel (safe from a killed daemon) when note returns.
        journal = self._open(_JOURNAL.format(generation), "w")
        journal.reconfigure(line_buffering=True)
        if self._journal is not None:
            self._journal.close()
        self._journal, self._journal_generation = journal, generation
        self._recent.clear()
        self._lines = 0

    def _write_snapshot(self, generation: int) -> None:
        with self._open(_SNAPSHOT + ".tmp", "w") as f:
            f.write(json.dumps(self._header(generation)) + "\n")
            for path, r in self._records.items():
                f.write(json.dumps([path, *r]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(_SNAPSHOT + ".tmp", _SNAPSHOT, src_dir_fd=self._state, dst_dir_fd=self._state)
        self._generation = generation

    def _journal_generations(self) -> list[int]:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._state)
        try:
            names = os.listdir(listing)
        finally:
            os.close(listing)
        return sorted(int(n[len("journal-"):]) for n in names if n.startswith("journal-") and n[8:].isdigit())

    def _remove_journals_before(self, generation: int) -> None:
        for old in self._journal_generations():
            if old < generation:
                os.unlink(_JOURNAL.format(old), dir_fd=self._state)

    def _compact_in_background(self) -> None:
        """Start a new journal now, and fold the older ones into a new snapshot in another thread, so
        that a long-lived daemon's journal stays bounded without stopping its requests."""
        generation = self._journal_generation + 1
        self._start_journal(generation)
        self._compactor = threading.Thread(target=self._compact, args=(generation,), name="index-compaction",
                                           daemon=True)
        self._compactor.start()

    def _compact(self, generation: int) -> None:
        reader = ChangeIndex(self.upper, None, lowers=self.lowers, lower_layers=self._lower_view().layers,
                             upper_fd=self._fd, state_fd=self._state)
        reader.load(readonly=True)  # the journal being written now is read too: harmless, it stays
        try:
            reader._write_snapshot(generation)
        except OSError as e:
            if e.errno not in _FULL:
                raise
            # No room for a new snapshot: the old one and every journal since stay, as good as before.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_SNAPSHOT + ".tmp", dir_fd=self._state)
            return
        reader._remove_journals_before(generation)

    def _header(self, generation: int) -> dict:
        return {"version": _VERSION, "upper": self.upper, "generation": generation, "lowers": self.lowers}

    def close(self) -> None:
        """Sync (unless loaded read-only) and let go of everything (a clean unmount)."""
        if self._journal is not None:
            self.sync()
            with contextlib.suppress(OSError):  # (what a full filesystem left in its buffer)
                self._journal.close()
            self._journal = None
        if self._own_state:
            os.close(self._state)
        if self._own_fd:
            os.close(self._fd)

    def _read_state(self) -> list[str] | None:
        """Read the snapshot into the records; returns the paths its journal names, or None if there is
        no usable snapshot (generation 0) or its journal is gone (a newer generation was saved)."""
        self._records.clear()
        self._generation = 0
        try:
            with self._open(_SNAPSHOT, "r") as f:
                header = json.loads(f.readline())
                same_lowers = header.get("lowers") == self.lowers
                header["lowers"] = self.lowers
                if header != self._header(header.get("generation")):
                    return None
                records = {}
                for path, *fields in json.loads("[" + ",".join(f.read().splitlines()) + "]"):
                    record = Record(*fields)
                    if not same_lowers:  # facts about other lowers than ours: look again
                        record = record._replace(lower_known=False, lower=None, lower_sig=None)
                    elif record.lower is not None:
                        record = record._replace(lower=LowerFacts(*record.lower))
                    records[path] = record
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        self._generation = header["generation"]
        paths = self._read_journals(self._generation)
        if paths is not None:
            self._records.update(records)
        return paths

    def _read_journals(self, generation: int) -> list[str] | None:
        """The paths in the journals of ``generation`` and later ones; None if its own is gone (a
        newer snapshot replaced the one just read)."""
        generations = [g for g in self._journal_generations() if g >= generation]
        if generation not in generations:
            return None
        paths: list[str] = []
        for journal in generations:
            try:
                with self._open(_JOURNAL.format(journal), "r") as f:
                    for line in f:
                        try:
                            paths.append(json.loads(line))
                        except ValueError:
                            break  # a line cut short by a crash: the ones before it are whole
            except FileNotFoundError:
                return None
        return paths

    # -- keeping it current

    def note(self, *paths: str) -> None:
        """``paths`` are about to change in the upper: journal them first, so that a killed daemon
        loses nothing. Their records are brought up to date at the next sync."""
        with self._lock:
            if self._paused or self._journal is None:  # (paused, or not journaling: a reader)
                return
            try:
                if self._lines >= _SYNC_EVERY:  # keep the journal, and the work of the next load, bounded
                    if not self._journal_only:
                        self._sync()
                    elif self._compactor is None or not self._compactor.is_alive():
                        self._compact_in_background()
                journal = self._journal  # (a sync above may have started a new one)
                for path in paths:
                    if path not in self._recent:
                        journal.write(json.dumps(path) + "\n")
                        self._lines += 1
                        self._recent[path] = None
                        if len(self._recent) > _RECENT:
                            del self._recent[next(iter(self._recent))]
            except OSError as e:
                if e.errno not in _FULL:
                    raise
                self._pause()

    def _catch_up(self, paths) -> None:
        """Records for ``paths`` (and what is new below them) as the upper has them now."""
        for path in sorted(set(paths), key=_key):
            old = self._records.get(path)
            self._refresh_with_ancestors(path)
            new = self._records.get(path)
            if new is not None and new.is_dir and (old is None or not old.is_dir or old.ino != new.ino):
                self._scan(path, recursive=True)  # a directory made, copied up or renamed in whole

    def _refresh_with_ancestors(self, path: str) -> None:
        """Record ``path``, and its directories if the upper did not have them before (a copy-up made
        them; the directory they were made in changed too)."""
        missing: list[str] = []
        parent = path
        while parent != "/":
            parent = parent.rpartition("/")[0] or "/"
            if parent in self._records:
                if missing:
                    self._refresh(parent)
                break
            missing.append(parent)
        for ancestor in reversed(missing):
            self._refresh(ancestor)
        self._refresh(path)

    def _refresh(self, path: str) -> None:
        record = self._read(path)
        old = self._records.get(path)
        if old is not None and old.is_dir and (record is None or not record.is_dir):
            self._forget_below(path)
        if record is None:
            self._records.pop(path, None)
            return
        if old is not None and old.lower_known:  # the lowers never change: what they show stays
            record = record._replace(lower_known=True, lower=old.lower, lower_sig=old.lower_sig)
        elif self.lowers:
            record = record._replace(lower_known=True, lower=self._look_below(path))
        self._records[path] = record

    def _lower_view(self) -> Resolver:
        """The lowers, opened when first needed: a reader whose records know them all never opens them."""
        if self._lower_resolver is None:
            if self._lower_layers is None:
                self._lower_layers = [Layer(p, writable=False, cached=False) for p in self.lowers]
            self._lower_resolver = Resolver(self._lower_layers)
        return self._lower_resolver

    def _look_below(self, path: str) -> LowerFacts | None:
        """What the lowers show at ``path``."""
        parent = self._records.get(path.rpartition("/")[0] or "/") if path != "/" else None
        if parent is not None and parent.lower_known and (parent.lower is None or not parent.lower.is_dir):
            return None  # nothing below a name the lowers do not have as a directory (and no deep lookup)
        try:
            entry = self._lower_view().lookup(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if entry is None else LowerFacts.of(entry.st)

    def lower_facts(self, path: str) -> LowerFacts | None:
        """What the lowers show at ``path``: from its record when known, else looked up (and kept)."""
        record = self._records.get(path)
        if record is not None and record.lower_known:
            return record.lower
        facts = self._look_below(path) if self.lowers else None
        if record is not None:
            self._records[path] = record._replace(lower_known=True, lower=facts)
        return facts

    def upper_signature(self, path: str, data: Part | None = None) -> str:
        """The upper file's content and xattrs in one hash, to compare with ``lower_signature``; the
        content of a metadata-only copy is its ``data``."""
        digest = self.digest(path) if data is None else file_digest(Layer.rel(data.path), dir_fd=data.layer.fd)
        return _signature(digest, _rel(path), self._fd)

    def lower_signature(self, path: str) -> str:
        """The same of the file the lowers show at ``path`` (a regular file), computed once."""
        record = self._records[path]
        if record.lower_sig is None:
            entry = self._lower_view().get(path)
            sig = _signature(file_digest(entry.rel, dir_fd=entry.layer.fd), entry.rel, entry.layer.fd)
            self._records[path] = record = record._replace(lower_sig=sig)
        return record.lower_sig

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
        moved = redirect.read(rel, dir_fd=self._fd) if stat.S_ISDIR(st.st_mode) else None
        metadata_only = metacopy.may_be(st) and metacopy.is_marked(rel, dir_fd=self._fd)
        return Record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                      st.st_rdev, target, opaque, moved, metadata_only)

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
        self.rescanned = []
        for path in list(self._records):
            old = self._records.get(path)
            if old is None:
                continue  # dropped with a directory that went
            try:
                st = os.lstat(_rel(path), dir_fd=self._fd)
                if (st.st_ino, st.st_ctime_ns) == (old.ino, old.ctime_ns):
                    continue  # the cheap look; its directory was checked just before, in path order
            except OSError:
                pass
            new = self._read(path)
            if new is not None and new.is_dir:
                self.rescanned.append(path)
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
        prefix = "/" if path == "/" else path + "/"
        for key in self._records.irange(path, inclusive=(False, False)):
            if not key.startswith(prefix):
                break
            yield key

    def digest(self, path: str) -> str:
        """The xxh3-128 of a regular file's content in the upper, computed once per version of it."""
        record = self._records[path]
        if record.digest is None:
            self._records[path] = record = record._replace(digest=file_digest(_rel(path), dir_fd=self._fd))
        return record.digest


def _signature(digest: str, path: str, dir_fd: int) -> str:
    h = xxhash.xxh3_128(digest.encode())
    for name in sorted(xattr.names(path, dir_fd=dir_fd)):
        if not whiteout.is_private_xattr(name):
            h.update(b"\0" + name.encode("utf-8", "surrogateescape") + b"\0" + xattr.get(path, name, dir_fd=dir_fd))
    return h.hexdigest()


def file_digest(path: str, *, dir_fd: int | None = None) -> str:
    """xxh3-128 of the content of the regular file at ``path`` (never through a symlink)."""
    h = xxhash.xxh3_128()
    if dir_fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    else:
        fd = confined.open_beneath(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()
