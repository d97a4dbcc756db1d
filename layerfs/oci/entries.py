"""A container's changes as the entries of a layer: the one place that says what a layer gets for each
change. Both writers of a layer take their entries from here, ``layertar`` (an OCI layer tar: ``layerfs
export``) and the store's commit (a layer directory in overlay form), so the directory a commit stores is
the layer its diff_id names.

- A deletion is a whiteout entry: an overlay whiteout (0/0 device) in the upper, or, for a change reported
  deleted, an OCI ``.wh.NAME`` file beside its name.
- A directory hides what the lowers have at its path (opaque) when the upper marks it so, or when it is
  reported deleted yet present: it replaced the lowers' one. An opaque upper root has no change of its
  own; ``Upper.root_opaque`` asks for it.
- The root itself, the upper's own markers (``.wh.*``) and sockets (they belong to a running process) are
  no entries.
- Below a redirected directory an entry may still be in a lower layer (``Change.source``), and a
  metadata-only copy's data is in the lower that holds it (``Change.data``): both are read from there.
- A file with several names in this layer is one file: its first name is written, the others link to it
  (``FirstNames``).
- Entries come in path order, component by component as ``changes`` sorts, a whiteout before its
  siblings (some tar extractors apply entries strictly in order).

Everything is read relative to descriptors of the upper's real directories, opened one component at a
time without following symlinks (``core.confined``), and no entry is followed: a symlink in the upper that
points outside is an entry like any other, and an upper directory swapped for a symlink on the way stops
the reading with an error instead of leading it out of the upper directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ..core import confined, whiteout
from ..core.changes import DELETED, Change
from ..errors import LayerfsError

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: never hang on a fifo
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # the path, or a directory on it, is not what it was


class Entry(NamedTuple):
    """What the layer gets for one change, as found in the upper directory."""

    path: str  # in the container: "/etc/passwd"
    st: os.stat_result | None  # None: a deletion, a whiteout entry
    opaque: bool = False  # a directory that hides what the lowers have at its path
    source: tuple[str, str] | None = None  # in a lower layer (below a redirected directory): Change.source
    data: tuple[str, str] | None = None  # a metadata-only copy's data, in a lower layer: Change.data


def _order(entry: Entry) -> list[tuple[int, str]]:
    """Sort key: path order, component by component as ``changes`` sorts, a whiteout before its siblings."""
    parts = entry.path[1:].split("/")
    return [(1, p) for p in parts[:-1]] + [(0 if entry.st is None else 1, parts[-1])]


class FirstNames:
    """The rule for a file with several names: the layer holds it once, under the first name written, and
    its other names are hard links to that one."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, int], str] = {}  # (dev, ino) of a multi-link file -> its first path

    def link_target(self, path: str, st: os.stat_result) -> str | None:
        """The path this file was first written under, if it was; remembers ``path`` otherwise."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
            return None
        key = (st.st_dev, st.st_ino)
        first = self._first.get(key)
        if first is None:
            self._first[key] = path
        return first


class Upper:
    """The upper directory, reached one real directory at a time so that no access follows a symlink
    (``confined.DirChain``: entries come parents first and mostly in tree order, so only the components
    that differ from the previous entry's are opened)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        try:
            self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LayerfsError(f"upper directory {self.root}: {e.strerror}") from e
        self._chain = confined.DirChain(self.fd)
        self._lowers: dict[str, int] = {}  # root -> descriptor of the lower layers sources are read from

    def __enter__(self) -> Upper:
        return self

    def __exit__(self, *exc: object) -> None:
        self._chain.release()
        for fd in self._lowers.values():
            os.close(fd)
        self._lowers.clear()
        os.close(self.fd)

    def entries(self, changes: Iterable[Change]) -> list[Entry]:
        """The layer's entries for ``changes`` (from ``layerfs.core.changes``), in the order to write them."""
        found = [entry for change in changes if (entry := self._classify(change)) is not None]
        found.sort(key=_order)
        return found

    def root_opaque(self) -> bool:
        """An opaque upper root hides every lower entry; no change stands for it, so it is asked here."""
        return whiteout.is_opaque_dir(".", dir_fd=self.fd)

    def gone(self, path: str) -> LayerfsError:
        return LayerfsError(f"cannot export {path}: it is no longer in the upper directory {self.root}")

    def failed(self, path: str, e: OSError) -> LayerfsError:
        if e.errno in _GONE:
            return self.gone(path)
        return LayerfsError(f"cannot export {path}: {e.strerror}")

    @contextlib.contextmanager
    def directory_of(self, entry: Entry) -> Iterator[tuple[int, str]]:
        """The real directory holding ``entry`` and its name there: in the upper, or in the lower layer a
        source names (opened beneath that layer's root, without following a symlink on the way)."""
        if entry.source is None:
            yield self._parent(entry.path), os.path.basename(entry.path)
            return
        head, _, name = entry.source[1].rpartition("/")
        fd = self._open_lower(entry.path, entry.source[0], head or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def open_file(self, entry: Entry, parent: int, name: str) -> int:
        """The data of the regular file ``entry`` (``name`` in ``parent``, from ``directory_of``): its own,
        or for a metadata-only copy, the lower layer's file that holds it."""
        if entry.data is None:
            return os.open(name, _FILE_FLAGS, dir_fd=parent)
        root, real = entry.data
        return self._open_lower(entry.path, root, real, _FILE_FLAGS)

    def data_at(self, entry: Entry) -> tuple[int, str] | None:
        """Where a metadata-only copy's data is, as ``copyup.copy_entry`` takes it: a lower layer's root
        descriptor and the path below it; None for an entry that holds its own data."""
        if entry.data is None:
            return None
        root, real = entry.data
        return self._lower(root), real[1:]

    def _parent(self, path: str) -> int:
        """A descriptor of the real directory holding ``path`` (a container path, not ``/``)."""
        try:
            return self._chain.get(path[1:].split("/")[:-1])
        except OSError as e:
            raise self.failed(path, e) from e

    def _lower(self, root: str) -> int:
        layer = self._lowers.get(root)
        if layer is None:
            layer = self._lowers[root] = os.open(root, _DIR_FLAGS)
        return layer

    def _open_lower(self, path: str, root: str, real: str, flags: int) -> int:
        """``real`` of the lower layer at ``root`` opened beneath it, for the change at ``path``."""
        try:
            return confined.open_beneath(real[1:] or ".", flags, dir_fd=self._lower(root))
        except OSError as e:
            raise LayerfsError(f"cannot export {path} from {root}{real}: {e.strerror}") from e

    def _classify(self, change: Change) -> Entry | None:
        """What the layer gets for ``change``, as the upper is now; None for what a layer does not carry."""
        path = change.path
        name = os.path.basename(path)
        if path == "/" or whiteout.is_marker_name(name):
            return None  # the root has no entry; markers are never written as themselves
        if change.source is not None:  # still in a lower layer, below a redirected directory
            entry = Entry(path, None, source=change.source, data=change.data)
            with self.directory_of(entry) as (parent, real_name):
                try:
                    st = os.lstat(real_name, dir_fd=parent)
                except OSError as e:
                    raise self.failed(path, e) from e
            return None if stat.S_ISSOCK(st.st_mode) else entry._replace(st=st)
        parent = self._parent(path)
        try:
            st = os.lstat(name, dir_fd=parent)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise self.failed(path, e) from e
            if change.kind == DELETED and self._has_oci_whiteout(parent, name, path):
                return Entry(path, None)
            raise self.gone(path) from e
        if whiteout.is_whiteout_stat(st):
            return Entry(path, None)
        if stat.S_ISSOCK(st.st_mode):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return Entry(path, st, data=change.data)
        # A directory reported deleted yet present was replaced: the lowers' content under it is gone.
        try:
            opaque = change.kind == DELETED or whiteout.is_opaque_dir(name, dir_fd=parent)
        except OSError as e:
            raise self.failed(path, e) from e
        return Entry(path, st, opaque)

    def _has_oci_whiteout(self, parent: int, name: str, path: str) -> bool:
        try:
            os.lstat(whiteout.oci_whiteout_name(name), dir_fd=parent)
            return True
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENAMETOOLONG):  # too long a name has no ".wh." twin
                return False
            raise self.failed(path, e) from e
