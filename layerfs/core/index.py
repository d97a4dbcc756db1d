"""The change index: what the upper layer holds, path by path; its saved form; and its reader.

A container's changes are exactly its upper layer, so a diff only needs the upper's entries, never the
lowers' whole tree. The index keeps one record per upper path (sorted, so a subtree is a range) with
what ``lstat`` said of it, and the content hash of regular files once asked.

Saved in a state directory beside the upper (``SavedIndex``): a snapshot (``records``: a JSON header, then
one JSON record a line) of one generation, and the journals (``journal-N``, one JSON path a line) of
that generation and later ones: the paths changed since. The daemon writes them (core.journal); a
reader (``ChangeIndex``, what diff, export and commit use) pairs a snapshot with its journals and
checks the result against the upper.

Why it can be trusted after a crash, or after someone else wrote to the upper:

- Every path is journaled *before* the upper changes there. A killed daemon's last writes are in the
  kernel already; on the next load the journal's paths are looked at again (and what is new below
  them), so nothing the daemon did goes unrecorded.
- Every record holds the entry's inode number and ctime. Nobody can change an entry without changing
  its ctime, nor add or remove one without changing its directory's: on load, ``verify`` looks at every
  recorded path once and rescans the directories whose ctime moved. That catches kernel overlayfs or
  a person having written to the upper in between, at the cost of the index's size, not the tree's.
- A snapshot is written atomically; a missing or unreadable one means a full walk of the upper, never
  a wrong answer.

No FUSE here.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TextIO

import xxhash
from sortedcontainers import SortedDict

from . import confined, metacopy, redirect, whiteout, xattr
from .layer import Layer
from .lookup import Part, Resolver

_SNAPSHOT = "records"
_JOURNAL = "journal-{}"  # one per snapshot generation
_VERSION = 5


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
    blocks: int  # of 512 bytes, as st_blocks: what the entry takes on disk
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


def journal_line(path: str) -> str:
    """A journal's line for ``path`` (read back by ``SavedIndex.read_journals``)."""
    return json.dumps(path) + "\n"


class SavedIndex:
    """The index of ``upper`` over ``lowers`` as saved in ``state_dir`` (outside the upper and the view).

    The directory is opened now and used through its descriptor: its path may be hidden by the mount
    later, like the upper's. A snapshot saved for another upper is never read; one saved over other
    lowers is read without what it knew of the lowers."""

    def __init__(self, state_dir: str, upper: str, lowers: Sequence[str]) -> None:
        self.upper = upper.rstrip("/") or "/"
        self.lowers = [os.path.abspath(p) for p in lowers]
        os.makedirs(state_dir, exist_ok=True)
        self.fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def _open(self, name: str, mode: str):
        return open(
            name,
            mode,
            encoding="utf-8",
            errors="surrogateescape",
            opener=lambda n, flags: os.open(n, flags | os.O_CLOEXEC, 0o600, dir_fd=self.fd),
        )

    def _header(self, generation: int | None) -> dict:
        return {"version": _VERSION, "upper": self.upper, "generation": generation, "lowers": self.lowers}

    def read_snapshot(self) -> tuple[int, int, dict[str, Record]] | None:
        """The snapshot's generation, the time it was written (by the clock of file times) and its records;
        None if there is no usable snapshot."""
        try:
            with self._open(_SNAPSHOT, "r") as f:
                written = os.fstat(f.fileno()).st_mtime_ns
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
        return header["generation"], written, records

    def write_snapshot(self, generation: int, records: Iterable[tuple[str, Record]]) -> None:
        """``records`` as the snapshot of ``generation``, in place of the old one at once (or not at all)."""
        try:
            with self._open(_SNAPSHOT + ".tmp", "w") as f:
                f.write(json.dumps(self._header(generation)) + "\n")
                for path, r in records:
                    f.write(json.dumps([path, *r]) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(_SNAPSHOT + ".tmp", dir_fd=self.fd)
            raise
        os.replace(_SNAPSHOT + ".tmp", _SNAPSHOT, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def save(self, records: Iterable[tuple[str, Record]]) -> tuple[int, TextIO]:
        """``records`` as the snapshot of a new generation, with its journal started empty; the
        generation and the journal. Readers pair a snapshot with the journals of its generation and
        later ones: the new journal comes first, the snapshot that needs it next, and only then do older
        journals go (a reader that finds its snapshot's journal gone reads again)."""
        generation = max(self._journal_generations(), default=0) + 1
        journal = self.start_journal(generation)
        try:
            self.write_snapshot(generation, records)
        except OSError:
            journal.close()
            raise
        self.remove_journals_before(generation)
        return generation, journal

    def remove_snapshot(self) -> None:
        """No snapshot, so that nobody trusts the journals (readers walk the upper instead)."""
        for name in (_SNAPSHOT, _SNAPSHOT + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)

    def start_journal(self, generation: int) -> TextIO:
        """The journal of ``generation``, empty, to write ``journal_line``s to. Line-buffered: each line
        is in the kernel (safe from a killed daemon) once written."""
        journal = self._open(_JOURNAL.format(generation), "w")
        journal.reconfigure(line_buffering=True)
        return journal

    def read_journals(self, generation: int) -> list[str] | None:
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

    def remove_journals_before(self, generation: int) -> None:
        for old in self._journal_generations():
            if old < generation:
                os.unlink(_JOURNAL.format(old), dir_fd=self.fd)

    def _journal_generations(self) -> list[int]:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            names = os.listdir(listing)
        finally:
            os.close(listing)
        return sorted(int(n[len("journal-") :]) for n in names if n.startswith("journal-") and n[8:].isdigit())


@contextlib.contextmanager
def read_index(upper: str, state_dir: str, *, lowers: Sequence[str] = ()) -> Iterator[ChangeIndex]:
    """The index of ``upper`` saved in ``state_dir`` (by a mount, running or not), loaded: read, never
    written (a running daemon owns the state)."""
    with contextlib.closing(SavedIndex(state_dir, upper, lowers)) as saved:
        upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            index = ChangeIndex(saved, upper_fd)
            index.load()
            yield index
        finally:
            os.close(upper_fd)


class ChangeIndex:
    """The records of one upper layer, read from its saved state and checked against the upper.

    The upper is read through ``upper_fd`` (an O_PATH descriptor of its root): a mount may hide the
    upper's path, as a mount over its own directories does. A mount passes its own open
    ``lower_layers`` too, else they are opened when first needed (looked up name by name: a diff asks
    about few). ``saved`` and ``upper_fd`` stay the caller's to close (``read_index`` does)."""

    def __init__(self, saved: SavedIndex, upper_fd: int, *, lower_layers: Sequence[Layer] | None = None) -> None:
        self._saved = saved
        self._fd = upper_fd
        self._lower_layers = None if lower_layers is None else list(lower_layers)
        self._lower_resolver: Resolver | None = None
        self._records: SortedDict = SortedDict(_key)
        self.generation = 0  # of the snapshot read, 0 if none
        self._saved_at = 0  # when that snapshot was written (ns)
        self.rebuilt = False  # whether the load had to walk the whole upper
        self.rescanned: list[str] = []  # directories whose ctime had moved behind the index's back
        self.journaled: list[str] = []  # the paths its journals named (each one looked at again)

    @property
    def upper(self) -> str:
        return self._saved.upper

    @property
    def lowers(self) -> list[str]:
        return self._saved.lowers

    @property
    def upper_fd(self) -> int:
        return self._fd

    def load(self) -> None:
        """Read the snapshot, catch up with its journals, check everything against the upper; walk the
        whole upper instead if there is no usable snapshot."""
        for _ in range(5):
            snapshot = self._saved.read_snapshot()
            if snapshot is None:
                self.generation = 0
                break
            self.generation, self._saved_at, records = snapshot
            journal = self._saved.read_journals(self.generation)
            if journal is not None:
                self.journaled = journal
                self._records.clear()
                self._records.update(records)
                self._catch_up(journal)
                self._verify(records)
                return
            # The daemon saved a new generation between our reading the snapshot and its journal.
        self.rebuilt = True
        self._records.clear()
        self._scan("/")

    def _catch_up(self, paths) -> None:
        """Records for ``paths`` (and what is new below them) as the upper has them now."""
        for path in sorted(set(paths), key=_key):
            old = self._records.get(path)
            self._refresh_with_ancestors(path)
            new = self._records.get(path)
            if new is not None and new.is_dir and (old is None or not old.is_dir or old.ino != new.ino):
                self._scan(path)  # a directory made, copied up or renamed in whole

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
            st = confined.lstat(rel, dir_fd=self._fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        target = confined.readlink(rel, dir_fd=self._fd) if stat.S_ISLNK(st.st_mode) else None
        opaque = stat.S_ISDIR(st.st_mode) and whiteout.is_opaque_dir(rel, dir_fd=self._fd)
        moved = redirect.read(rel, dir_fd=self._fd) if stat.S_ISDIR(st.st_mode) else None
        metadata_only = metacopy.may_be(st) and metacopy.is_marked(rel, dir_fd=self._fd)
        return Record(
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_blocks,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_rdev,
            target,
            opaque,
            moved,
            metadata_only,
        )

    def _forget_below(self, path: str) -> None:
        for child in list(self.paths_below(path)):
            del self._records[child]

    def _scan(self, path: str) -> None:
        """Record the upper directory ``path`` and everything below it."""
        todo = [path]
        while todo:
            directory = todo.pop()
            self._refresh(directory)
            names = self._names(directory)
            prefix = "" if directory == "/" else directory
            for name in names:
                child = prefix + "/" + name
                self._refresh(child)
                if child in self._records and self._records[child].is_dir:
                    todo.append(child)

    def _names(self, directory: str) -> list[str]:
        """The names in the upper directory ``directory`` (none if it is gone)."""
        try:
            fd = confined.open_beneath(_rel(directory), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._fd)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def _verify(self, saved: dict[str, Record]) -> None:
        """Make the records match the upper: look at each once, rescan directories that moved. ``saved``:
        the snapshot's records (the ones still as read from it were read before it was written)."""
        self.rescanned = []
        for path in list(self._records):
            old = self._records.get(path)
            if old is None:
                continue  # dropped with a directory that went
            try:
                st = confined.lstat(_rel(path), dir_fd=self._fd)
                # The cheap look (its directory was checked just before, in path order). A saved ctime as
                # late as the snapshot itself proves nothing: file times may tick coarsely, and a change in
                # the tick the record was read in leaves it as it was.
                from_snapshot = saved.get(path) is old
                racy = from_snapshot and old.ctime_ns >= self._saved_at
                if (st.st_ino, st.st_ctime_ns) == (old.ino, old.ctime_ns) and not racy:
                    continue
            except OSError:
                pass
            new = self._read(path)
            if new is not None and new.is_dir:
                self.rescanned.append(path)
                self._rescan(path)
            else:
                self._refresh(path)

    def _rescan(self, directory: str) -> None:
        """``directory``'s entries changed unseen: it is read again, and its entries that are new or another
        inode now (a directory in whole) recorded and the ones gone dropped. The others stay for
        ``verify``, which looks at each record after its directory's: a change below one of them shows in
        its own ctime, so what did not change is not read again."""
        self._refresh(directory)
        names = self._names(directory)
        prefix = "" if directory == "/" else directory
        present = {prefix + "/" + name for name in names}
        depth = prefix.count("/") + 1
        for child in [p for p in self.paths_below(directory) if p.count("/") == depth and p not in present]:
            self._refresh(child)  # gone: dropped, with what was below it
        for child in sorted(present, key=_key):
            old = self._records.get(child)
            if old is not None:
                try:
                    if confined.lstat(_rel(child), dir_fd=self._fd).st_ino == old.ino:
                        continue
                except OSError:
                    pass
            self._refresh(child)
            new = self._records.get(child)
            if new is not None and new.is_dir:
                self._scan(child)

    def save(self) -> None:
        """Save these records as a new snapshot with an empty journal, for an upper that no daemon
        journals (a layer written straight into its directory, then frozen): later readers load it
        from its records instead of walking it."""
        self.generation, journal = self._saved.save(self._records.items())
        journal.close()

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
