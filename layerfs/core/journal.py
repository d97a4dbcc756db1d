"""The daemon's side of the change index (core.index): each change journaled before it happens.

The daemon only journals, and holds no records, so its memory does not grow with the upper: the
records are read back (by an index reader) whenever they are saved. Every 100,000 journal lines a
background thread folds the journals into a new snapshot, and ``sync`` (each mount's start) does it at once.
The unmount writes nothing: the journal holds every change already, and the caller of the unmount may
be removing the work directory as soon as it returns (Podman deletes a build step's layer so), before
the daemon has exited.

The state lives beside the upper, on its filesystem. When that is full, the journal does not stand in
the way of changes that need no space (a container freeing space by deleting files): it stops
journaling and removes its snapshot, so that readers, and the next load, walk the upper instead of
trusting a journal with gaps. The next sync that finds space (the next mount's) saves it again.

No FUSE here; the union calls ``note`` before its changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Sequence
from typing import TextIO

from .index import ChangeIndex, SavedIndex, journal_line
from .layer import Layer

_COMPACT_EVERY = 100_000  # journal lines
_RECENT = 4096  # paths remembered as journaled already
_FULL = (errno.ENOSPC, errno.EDQUOT)


class ChangeJournal:
    """Journals the changes of one upper layer into its index's state directory ``state_dir``.

    Opening it brings the saved index up to date with the upper (a walk, if nothing usable was saved)
    and starts journaling. The upper is read through ``upper_fd`` (opened here if not given), and the
    lowers through ``lower_layers`` (the mount's own; opened when needed if not given)."""

    def __init__(
        self,
        upper: str,
        state_dir: str,
        *,
        lowers: Sequence[str] = (),
        lower_layers: Sequence[Layer] | None = None,
        upper_fd: int | None = None,
    ) -> None:
        self._saved = SavedIndex(state_dir, upper, lowers)
        self._lower_layers = lower_layers
        self._own_fd = upper_fd is None
        self._fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if upper_fd is None else upper_fd
        self._journal: TextIO | None = None
        self._journal_generation = 0
        self._compactor: threading.Thread | None = None
        self._recent: dict[str, None] = {}  # paths journaled lately: not written again
        self._lines = 0  # in the journal
        self._paused = False  # the state's filesystem was full: no journal, no snapshot
        self._lock = threading.Lock()
        self.sync()

    def descriptors(self) -> list[int]:
        """The descriptors the journal holds (upper, state directory, journal)."""
        return [self._fd, self._saved.fd] + ([self._journal.fileno()] if self._journal is not None else [])

    def note(self, *paths: str) -> None:
        """``paths`` are about to change in the upper: journal them first, so that a killed daemon
        loses nothing. Their records are brought up to date when the index is next read."""
        with self._lock:
            if self._paused or self._journal is None:
                return
            try:
                if self._lines >= _COMPACT_EVERY and (self._compactor is None or not self._compactor.is_alive()):
                    self._compact_in_background()  # keep the journal, and the work of the next load, bounded
                journal = self._journal  # (a new one, after a compaction started)
                for path in paths:
                    if path not in self._recent:
                        journal.write(journal_line(path))
                        self._lines += 1
                        self._recent[path] = None
                        if len(self._recent) > _RECENT:
                            del self._recent[next(iter(self._recent))]
            except OSError as e:
                if e.errno not in _FULL:
                    raise
                self._pause()

    def sync(self) -> None:
        """Read the index back (caught up with the journal and checked), save it as a new snapshot, and
        start its journal over."""
        with self._lock:
            if self._compactor is not None:
                self._compactor.join()
                self._compactor = None
            index = self._read_index()
            try:
                self._save(index)
                self._paused = False
            except OSError as e:
                if e.errno not in _FULL:
                    raise
                self._pause()

    def close(self) -> None:
        """Let go of everything (a clean unmount), writing nothing new: a reader pairs the snapshot with
        the journals as after a killed daemon."""
        with self._lock:
            if self._compactor is not None:
                self._compactor.join()  # (it writes through the descriptors closed next)
                self._compactor = None
            if self._journal is not None:
                with contextlib.suppress(OSError):  # (what a full filesystem left in its buffer)
                    self._journal.close()
                self._journal = None
        self._saved.close()
        if self._own_fd:
            os.close(self._fd)

    def _read_index(self) -> ChangeIndex:
        index = ChangeIndex(self._saved, self._fd, lower_layers=self._lower_layers)
        index.load()  # the journal being written now is read too: harmless, it stays
        return index

    def _save(self, index: ChangeIndex) -> None:
        """``index`` as the snapshot of a new generation, whose journal starts empty."""
        generation, journal = self._saved.save(index.items())
        self._use_journal(journal, generation)

    def _start_journal(self, generation: int) -> None:
        self._use_journal(self._saved.start_journal(generation), generation)

    def _use_journal(self, journal: TextIO, generation: int) -> None:
        if self._journal is not None:
            self._journal.close()
        self._journal, self._journal_generation = journal, generation
        self._recent.clear()
        self._lines = 0

    def _compact_in_background(self) -> None:
        """Start a new journal now, and fold the older ones into a new snapshot in another thread, so
        that a long-lived daemon's journal stays bounded without stopping its requests."""
        generation = self._journal_generation + 1
        self._start_journal(generation)
        self._compactor = threading.Thread(
            target=self._compact, args=(generation,), name="index-compaction", daemon=True
        )
        self._compactor.start()

    def _compact(self, generation: int) -> None:
        index = self._read_index()
        try:
            self._saved.write_snapshot(generation, index.items())
        except OSError as e:
            if e.errno not in _FULL:
                raise
            return  # no room for a new snapshot: the old one and every journal since stay, as good as before
        self._saved.remove_journals_before(generation)

    def _pause(self) -> None:
        """The state's filesystem is full: stop journaling, and take the snapshot away first, so that
        nobody trusts the journal's gaps (readers walk the upper instead)."""
        self._paused = True
        if self._compactor is not None:
            self._compactor.join()  # it could write a snapshot after ours is gone
            self._compactor = None
        self._saved.remove_snapshot()
