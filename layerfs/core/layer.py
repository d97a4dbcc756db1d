"""One directory of the layer stack, and how a name is probed in it.

Paths handed to a layer are merged-view paths (``/etc/passwd``); a layer maps them under its root.
The caller guarantees that every ancestor of a probed path is a real directory in this layer (the
lookup walks the stack level by level, and a layer takes part in a directory only where that directory
is a real directory in it), so the string join never passes through a symlink; the final component is
always looked at without following.

Lower layers never change while mounted, so what is read from them (directory listings, which names
are whited out, whether a directory is opaque) is cached forever. The upper layer changes, and is asked
every time.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator, NamedTuple

from . import whiteout


class DirEntryInfo(NamedTuple):
    """What readdir needs of one real entry: its name, inode and file type bits."""

    name: str
    ino: int
    dev: int
    type_bits: int


class _Listing(NamedTuple):
    """A directory of an immutable layer, read once."""

    entries: dict[str, DirEntryInfo]  # visible-candidate entries by name
    hidden: frozenset[str]  # names whited out in this directory (either form)
    opaque: bool


def _type_bits(entry: os.DirEntry) -> int:
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


class Layer:
    """A layer rooted at ``root``. ``writable`` marks the upper layer."""

    def __init__(self, root: str, writable: bool) -> None:
        self.root = root.rstrip("/") or "/"
        self.writable = writable
        self.dev = os.stat(self.root).st_dev
        self._listings: dict[str, _Listing] = {}

    def __repr__(self) -> str:
        return f"Layer({self.root!r}, writable={self.writable})"

    def real(self, path: str) -> str:
        """The host path of merged path ``path`` in this layer."""
        return self.root if path == "/" else self.root + path

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(self.real(path))

    # -- probing one name -------------------------------------------------------------------------

    def probe(self, parent: str, name: str, path: str) -> tuple[os.stat_result | None, bool]:
        """Look up ``name`` in directory ``parent`` (``path`` is their join).

        Returns ``(stat, hidden)``: the entry's lstat if the layer has a real entry there, and whether
        the layer holds a whiteout for it, which hides the name in every layer below.
        """
        if not self.writable:
            listing = self._listing(parent)
            if name in listing.hidden:
                return None, True
            if name not in listing.entries:
                return None, False
            return os.lstat(self.real(path)), False
        try:
            st = os.lstat(self.real(path))
        except (FileNotFoundError, NotADirectoryError):
            return None, self._has_oci_whiteout(parent, name)
        if whiteout.is_whiteout_stat(st):
            return None, True
        return st, False

    def _has_oci_whiteout(self, parent: str, name: str) -> bool:
        try:
            os.lstat(os.path.join(self.real(parent), whiteout.oci_whiteout_name(name)))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_opaque(self, path: str) -> bool:
        """Whether the real directory at ``path`` hides the layers below it."""
        if not self.writable:
            return self._listing(path).opaque
        return whiteout.has_opaque_xattr(self.real(path)) or os.path.lexists(
            os.path.join(self.real(path), whiteout.OPAQUE_MARKER)
        )

    # -- listing a directory ----------------------------------------------------------------------

    def scan(self, path: str) -> tuple[dict[str, DirEntryInfo], frozenset[str]]:
        """The real entries of directory ``path`` and the names it whites out."""
        if not self.writable:
            listing = self._listing(path)
            return listing.entries, listing.hidden
        entries, hidden, _ = self._read_dir(path)
        return entries, hidden

    def _listing(self, path: str) -> _Listing:
        listing = self._listings.get(path)
        if listing is None:
            entries, hidden, has_marker = self._read_dir(path)
            opaque = has_marker or whiteout.has_opaque_xattr(self.real(path))
            listing = _Listing(entries, hidden, opaque)
            self._listings[path] = listing
        return listing

    def _read_dir(self, path: str) -> tuple[dict[str, DirEntryInfo], frozenset[str], bool]:
        entries: dict[str, DirEntryInfo] = {}
        hidden: set[str] = set()
        has_marker = False
        try:
            it = os.scandir(self.real(path))
        except (FileNotFoundError, NotADirectoryError):
            return entries, frozenset(), False
        with it:
            for entry in it:
                name = entry.name
                if whiteout.is_marker_name(name):
                    if name == whiteout.OPAQUE_MARKER:
                        has_marker = True
                    hidden_name = whiteout.whited_out_name(name)
                    if hidden_name is not None:
                        hidden.add(hidden_name)
                    continue
                bits = _type_bits(entry)
                if bits == stat.S_IFCHR and whiteout.is_whiteout_stat(entry.stat(follow_symlinks=False)):
                    hidden.add(name)
                    continue
                entries[name] = DirEntryInfo(name, entry.inode(), self.dev, bits)
        return entries, frozenset(hidden), has_marker


def iter_tree(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` (not ``root`` itself), parents before children, as (relative path, lstat)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                yield child, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
