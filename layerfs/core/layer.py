"""One directory of the layer stack, and how a name is probed in it.

Paths handed to a layer are merged-view paths (``/etc/passwd``). The layer opens its root directory
once, when it is created (before the mount, so a layer hidden by the mount point stays reachable), and
every system call names an entry relative to that descriptor (``dir_fd=layer.fd``, ``layer.rel(path)``).
That keeps the whole PATH_MAX for the merged path, however long the layer's own path is.
The caller guarantees that every ancestor of a path is a real directory in this layer (the lookup walks
the stack level by level, and a layer takes part in a directory only where that directory is a real
directory in it), so resolution never passes through a symlink; the final component is always looked at
without following. Should a directory be swapped for a symlink behind the lookup's back, the kernel
refuses to follow it where it matters: file data is opened with ``confined.open_beneath`` and entries
are changed through ``at``, both of which fail rather than leave the layer.

Lower layers never change while mounted, so what is read from them (directory listings, which names
are whited out, whether a directory is opaque) is cached forever. The upper layer changes, and is asked
every time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

from . import confined, metacopy, redirect, whiteout, xattr

# How many directories of a layer stay open for the next lookup in them (the descriptors are the cost).
_DIRS_KEPT = 64


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
    opaque: bool  # (with the OCI marker among the entries, or an xattr)
    redirect: str | None


def _type_bits(entry: os.DirEntry) -> int:
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


class _Dir:
    """An O_PATH descriptor of a directory of a layer, closed when the last holder lets go of it: a lookup
    may still be using one that the layer has just dropped."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


class Layer:
    """A layer rooted at ``root``. ``writable`` marks the upper layer.

    A lower layer never changes, so a mount reads each of its directories once and answers lookups from
    that listing (``cached``). A one-off reader that asks about a few names (a diff) is better off
    looking each up: ``cached=False``.

    Every name is reached through its parent directory, opened beneath the root once (``confined``) and
    kept open for the next name in it (``near``): a lookup, an lstat or an xattr read then costs one
    system call, not an openat2 and a close around it. A directory of the upper layer can be renamed or
    removed, after which its path leads elsewhere: whoever does that calls ``forget_dirs``.
    """

    def __init__(self, root: str, writable: bool, *, cached: bool | None = None) -> None:
        self.root = root.rstrip("/") or "/"
        self.writable = writable
        self._cached = not writable if cached is None else cached
        self._root = _Dir(os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        self.fd = self._root.fd
        self.dev = os.fstat(self.fd).st_dev
        self._listings: dict[str, _Listing] = {}
        self._metacopies: dict[str, tuple[bool, str | None]] = {}  # (a lower layer's, asked once)
        self._dirs: OrderedDict[str, _Dir] = OrderedDict()  # (the most recently used last)
        self._dirs_lock = threading.Lock()
        # The directory ``near`` gave last, by path: a lookup asks about the same one several times
        # (the name, then its metacopy mark), as readdirplus does for every name in it.
        self._last_dir: tuple[str, _Dir] | None = None
        # A directory opened before a forget_dirs may be the one that moved away: it is not kept.
        self._dirs_generation = 0

    def __repr__(self) -> str:
        return f"Layer({self.root!r}, writable={self.writable})"

    @staticmethod
    def rel(path: str) -> str:
        """Merged path ``path`` relative to a layer's root: ``/etc/passwd`` -> ``etc/passwd``, ``/`` -> ``.``"""
        return path[1:] or "."

    def near(self, rel: str) -> tuple[_Dir, str]:
        """``rel``'s parent directory, opened beneath the root without following a symlink, and its last
        name, for an ``*at`` call that does not follow it. Hold the first while its ``fd`` is in use."""
        head, _, name = rel.rpartition("/")
        if not head:
            return self._root, name
        last = self._last_dir
        if last is not None and last[0] == head:
            return last[1], name
        with self._dirs_lock:
            found = self._dirs.get(head)
            if found is not None:
                self._dirs.move_to_end(head)
                self._last_dir = (head, found)
                return found, name
            generation = self._dirs_generation
        found = _Dir(confined.open_beneath(head, os.O_PATH | os.O_DIRECTORY, dir_fd=self.fd))
        with self._dirs_lock:
            if generation == self._dirs_generation:
                self._dirs[head] = found
                self._last_dir = (head, found)
                if len(self._dirs) > _DIRS_KEPT:
                    self._dirs.popitem(last=False)
        return found, name

    def descriptors(self) -> list[int]:
        """The descriptors the layer holds: its root, and the directories kept open."""
        with self._dirs_lock:
            last = [] if self._last_dir is None else [self._last_dir[1].fd]
            return sorted({self.fd, *last, *(d.fd for d in self._dirs.values())})

    def forget_dirs(self) -> None:
        """Directories of this layer were renamed or removed: open every parent afresh from now on."""
        with self._dirs_lock:
            self._dirs_generation += 1
            self._dirs.clear()
            self._last_dir = None

    def lstat(self, path: str) -> os.stat_result:
        parent, name = self.near(self.rel(path))
        return os.lstat(name, dir_fd=parent.fd)

    def readlink(self, path: str) -> str:
        parent, name = self.near(self.rel(path))
        return os.readlink(name, dir_fd=parent.fd)

    def getxattr(self, path: str, attr: str) -> bytes:
        parent, name = self.near(self.rel(path))
        # What ls -l asks of every file is mostly not there: one call says so. (A system.* name is the
        # filesystem's own, which may answer otherwise for one it does not list, as for ACLs: asked.)
        present = None if attr.startswith("system.") else xattr.known_names(name, dir_fd=parent.fd)
        if present is not None and attr not in present:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), path)
        return xattr.get(name, attr, dir_fd=parent.fd)

    def listxattr(self, path: str) -> list[str]:
        parent, name = self.near(self.rel(path))
        return xattr.names(name, dir_fd=parent.fd)

    @contextlib.contextmanager
    def at(self, rel: str) -> Iterator[tuple[int, str]]:
        """``rel``'s parent directory, opened without following a symlink on the way, and its last name:
        for calls that change an entry, so that one aimed into a directory someone swapped for a symlink
        fails (ELOOP) instead of changing something outside the layer."""
        parent, _, name = rel.rpartition("/")
        # Opened for reading, not O_PATH: fstat, fchmod and futimens work on it.
        fd = confined.open_beneath(parent or ".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # -- probing one name -------------------------------------------------------------------------

    def probe(self, parent: str, name: str, path: str) -> tuple[os.stat_result | None, bool]:
        """Look up ``name`` in directory ``parent`` (``path`` is their join).

        Returns ``(stat, hidden)``: the entry's lstat if the layer has a real entry there, and whether
        the layer holds a whiteout for it, which hides the name in every layer below.
        """
        if self._cached:
            listing = self._listing(parent)
            if name in listing.hidden:
                return None, True
            if name not in listing.entries:
                return None, False
            return self.lstat(path), False
        try:
            st = self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None, self._has_oci_whiteout(oci_whiteout_path(path))
        if whiteout.is_whiteout_stat(st):
            return None, True
        return st, False

    def probe_path(self, path: str) -> tuple[os.stat_result | None, bool, str]:
        """Look up the absolute ``path`` (a redirect's target) from this layer's root, a component at a
        time as overlayfs does. Returns the entry's lstat (None: nothing there), whether the layers
        below must not be looked at (a whiteout, a non-directory or an opaque directory on the way),
        and the path they must look up instead (a redirect of a directory on the way changes it)."""
        names = path[1:].split("/")
        below: list[str] = []  # the components the layers below look up, so far
        stop = False
        parent = "/"
        for i, name in enumerate(names):
            real = parent + name if parent == "/" else parent + "/" + name
            st, hidden = self.probe(parent, name, real)
            below.append(name)
            rest = "/" + "/".join(below + names[i + 1 :])
            if hidden:
                return None, True, rest
            if st is None or i == len(names) - 1:
                return st, stop, rest
            if not stat.S_ISDIR(st.st_mode):
                return None, True, rest
            stop = stop or self.is_opaque(real)
            target = self.redirect(real)
            if target is not None:
                below = target[1:].split("/") if target.startswith("/") else below[:-1] + [target]
            parent = real
        return None, stop, path  # (no components: never asked)

    def redirect(self, path: str) -> str | None:
        """Where the layers below hold the real directory ``path``'s lower parts, if it was renamed."""
        if self._cached:
            return self._listing(path).redirect
        parent, name = self.near(self.rel(path))
        return redirect.read(name, dir_fd=parent.fd)

    def metacopy(self, path: str, st: os.stat_result) -> tuple[bool, str | None]:
        """Whether the file at ``path`` (its lstat ``st``) holds metadata only, its data being below, and
        where its redirect says that is (``metacopy.py``)."""
        if not metacopy.may_be(st):
            return False, None
        known = self._metacopies.get(path) if self._cached else None
        if known is None:
            parent, name = self.near(self.rel(path))
            marked = metacopy.is_marked(name, dir_fd=parent.fd)
            known = (True, redirect.read(name, dir_fd=parent.fd)) if marked else (False, None)
            if self._cached:
                self._metacopies[path] = known
        return known

    def is_opaque(self, path: str) -> bool:
        """Whether the real directory at ``path`` hides the layers below it."""
        if self._cached:
            return self._listing(path).opaque
        parent, name = self.near(self.rel(path))
        return whiteout.is_opaque_dir(name, dir_fd=parent.fd)

    # -- listing a directory ----------------------------------------------------------------------

    def scan(self, path: str) -> tuple[dict[str, DirEntryInfo], frozenset[str]]:
        """The real entries of directory ``path`` and the names it whites out."""
        if self._cached:
            listing = self._listing(path)
            return listing.entries, listing.hidden
        listing = self._read_dir(path)
        return listing.entries, listing.hidden

    def _listing(self, path: str) -> _Listing:
        listing = self._listings.get(path)
        if listing is None:
            listing = self._listings[path] = self._read_dir(path, marks=True)
        return listing

    def _read_dir(self, path: str, *, marks: bool = False) -> _Listing:
        """The real entries of a directory and the names it whites out; with ``marks``, whether it is
        opaque and where it redirects (read through the directory opened beneath the layer's root).
        Nothing where there is no directory to open that way."""
        try:
            fd = confined.open_beneath(self.rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return _Listing({}, frozenset(), False, None)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EXDEV):  # (a symlink on the way: a redirect's target)
                return _Listing({}, frozenset(), False, None)
            raise
        entries: dict[str, DirEntryInfo] = {}
        hidden: set[str] = set()
        opaque = False
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    if whiteout.is_marker_name(name):
                        opaque = opaque or name == whiteout.OPAQUE_MARKER
                        hidden_name = whiteout.whited_out_name(name)
                        if hidden_name is not None:
                            hidden.add(hidden_name)
                        continue
                    bits = _type_bits(entry)
                    if bits == stat.S_IFCHR and whiteout.is_whiteout_stat(entry.stat(follow_symlinks=False)):
                        hidden.add(name)
                        continue
                    entries[name] = DirEntryInfo(name, entry.inode(), self.dev, bits)
            target = None
            if marks and xattr.known_names(fd) != []:  # (most directories have none: one call, not five)
                opaque = opaque or whiteout.has_opaque_xattr(".", dir_fd=fd)
                target = redirect.read(".", dir_fd=fd)
        finally:
            os.close(fd)
        return _Listing(entries, frozenset(hidden), opaque, target)

    def _has_oci_whiteout(self, path: str) -> bool:
        """Whether the OCI whiteout file at merged path ``path`` is there."""
        try:
            self.lstat(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # the name is too long to have a ".wh." twin
                return False
            raise


def oci_whiteout_path(path: str) -> str:
    """The merged path of the OCI whiteout file that hides ``path``."""
    head, _, name = path.rpartition("/")
    return f"{head}/{whiteout.oci_whiteout_name(name)}"
