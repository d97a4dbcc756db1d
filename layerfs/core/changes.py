"""What a container changed: its upper layer read against the lower layers, as ``docker diff`` shows it.

``changes(upper, lowers)`` walks the upper directory once and looks each entry up in the merged view
of the lowers (whiteouts and opaque directories of the lowers applied, both forms), so a name the
lowers had deleted counts as added, not changed. The report follows Docker's overlay walk:

- ``A`` added: the lowers show nothing there (and everything below a new directory is ``A`` too);
- ``C`` changed: a file that is in the upper over a lower one (it was copied up, so something wrote
  to it, its metadata or its data), a type change, a directory whose mode, owner or mtime differ, and
  every ancestor directory of a change (``/`` never);
- ``D`` deleted: a whiteout over something the lowers show; a whiteout that hides nothing is not
  reported. An opaque directory over a lower one is reported ``D`` for the directory, then ``A`` for
  each entry in it, as Docker and Podman do.

A directory renamed with a redirect (``redirect.py``) is new at its path with all it shows, wherever that
is: ``A`` (``D`` where the lowers show something at its path) for it and ``A`` for every entry of the
merged view below it, as Docker shows a renamed directory; the entries that are still in a lower layer
carry where (``Change.source``), for the layer writers to read them there. A metadata-only copy
(``metacopy.py``) is reported like any copy, with where its data is (``Change.data``), for the same
reason; its content is that data when it is compared with the lowers' file.

``changes`` walks the upper directory: good for any upper written by layerfs or kernel overlayfs.
``indexed_changes`` gives the same answer from a change index (core.index), which costs what changed:
the upper is not read at all. No FUSE and no mount here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from . import confined, metacopy, redirect, whiteout, xattr
from .index import ChangeIndex, LowerFacts, file_digest
from .layer import Layer
from .lookup import Entry, Part, Resolver, join

ADDED, CHANGED, DELETED = "A", "C", "D"


class Change(NamedTuple):
    kind: str  # ADDED, CHANGED or DELETED
    path: str  # in the container: "/etc/passwd"
    # Where an entry below a redirected directory still is, when not in the upper: (lower layer's root,
    # its path in that layer). None: at ``path`` in the upper.
    source: tuple[str, str] | None = None
    # Where a metadata-only copy's data is: (lower layer's root, its path in that layer).
    data: tuple[str, str] | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


# What the walk needs of an upper directory: name -> (lstat-like, opaque directory?, redirect or None,
# a metadata-only copy?).
Listing = Callable[[str], dict]
# What the lowers show at a path (only asked where no upper directory hides them), or None.
Below = Callable[[str], "LowerFacts | None"]
# Whether the upper file at a path (its lstat-like, what the lowers show there, where its data is if it
# is a metadata-only copy) is an unchanged copy.
Unchanged = Callable[[str, object, LowerFacts, "Part | None"], bool]


def changes(
    upper: str,
    lowers: Sequence[str],
    *,
    unchanged_copies: bool = True,
    ignore: frozenset[str] = frozenset(),
    ignore_below: frozenset[str] = frozenset(),
) -> list[Change]:
    """The changes ``upper`` makes to ``lowers`` (top first), sorted by path, ancestors included.

    With ``unchanged_copies`` False, a file copied up that ended identical to the lower one (content,
    mode, owner, xattrs; not its times) is no change: a ``touch`` then undone, an editor's rewrite.
    Paths in ``ignore`` (what a runtime made for itself) are no changes either, nor reason to list their
    directories; nor are the paths in ``ignore_below`` and everything below them (where a runtime mounts
    volumes: what is there is not the container's)."""
    upper = upper.rstrip("/") or "/"
    # A diff asks about a few names per directory: looked up one by one, not listed whole.
    resolver = Resolver([Layer(p, writable=False, cached=False) for p in lowers]) if lowers else None
    # The upper's directories are entered through its descriptor, never by a path from outside.
    top = Layer(upper, writable=True, cached=False)

    def marks(name: str, st: os.stat_result, dir_fd: int) -> tuple[bool, str | None, bool]:
        """Whether the upper entry ``name`` in ``dir_fd`` is an opaque directory, its redirect, and
        whether it is a metadata-only copy."""
        if stat.S_ISDIR(st.st_mode):
            return whiteout.is_opaque_dir(name, dir_fd=dir_fd), redirect.read(name, dir_fd=dir_fd), False
        return False, None, metacopy.may_be(st) and metacopy.is_marked(name, dir_fd=dir_fd)

    def listing(path: str) -> dict:
        fd = confined.open_beneath(Layer.rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=top.fd)
        try:
            with os.scandir(fd) as it:
                return {e.name: (st := e.stat(follow_symlinks=False), *marks(e.name, st, fd)) for e in it}
        finally:
            os.close(fd)

    def lookup(path: str) -> Entry | None:
        try:
            return resolver.lookup(path) if resolver is not None else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def below(path: str) -> LowerFacts | None:
        entry = lookup(path)
        return None if entry is None else LowerFacts.of(entry.st)

    def unchanged(path: str, st, lower: LowerFacts, data: Part | None) -> bool:
        if not _alike(st, lower):
            return False
        entry = lookup(path)
        if entry is None:
            return False
        content = (
            file_digest(Layer.rel(path), dir_fd=top.fd)
            if data is None
            else file_digest(Layer.rel(data.path), dir_fd=data.layer.fd)
        )
        return _xattrs(Layer.rel(path), top.fd) == _xattrs(entry.rel, entry.layer.fd) and content == file_digest(
            entry.rel, dir_fd=entry.layer.fd
        )

    return _sorted_with_ancestors(
        _walk(listing, below, top.is_opaque("/"), None if unchanged_copies else unchanged, _MergedView(upper, lowers)),
        ignore,
        ignore_below,
    )


def indexed_changes(
    index: ChangeIndex,
    lowers: Sequence[str],
    *,
    unchanged_copies: bool = True,
    ignore: frozenset[str] = frozenset(),
    ignore_below: frozenset[str] = frozenset(),
) -> list[Change]:
    """The same as ``changes(index.upper, lowers)``, from the index's records instead of the upper; what
    the lowers show at each path is kept in the records too, so a diff reads neither layer again."""
    if [os.path.abspath(p) for p in lowers] != index.lowers:
        raise ValueError("the index was opened for other lowers")
    children: dict[str, dict] = {}
    for path, record in index.items():
        if path != "/":
            parent, _, name = path.rpartition("/")
            children.setdefault(parent or "/", {})[name] = (record, record.opaque, record.redirect, record.metacopy)
    root = index.get("/")
    # (the upper through the index's descriptor: a mount may hide its path)
    view = _MergedView(f"/proc/self/fd/{index.upper_fd}", lowers)

    def unchanged(path: str, record, lower: LowerFacts, data: Part | None) -> bool:
        return _alike(record, lower) and index.upper_signature(path, data) == index.lower_signature(path)

    return _sorted_with_ancestors(
        _walk(
            lambda path: children.get(path, {}),
            index.lower_facts,
            root is not None and root.opaque,
            None if unchanged_copies else unchanged,
            view,
        ),
        ignore,
        ignore_below,
    )


def _alike(st, lower: LowerFacts) -> bool:
    """The cheap part of "an unchanged copy": both regular files, same mode, owner and size."""
    return (
        stat.S_ISREG(st.st_mode)
        and stat.S_ISREG(lower.st_mode)
        and (st.st_mode, st.st_uid, st.st_gid, st.st_size) == tuple(lower[:4])
    )


def _xattrs(path: str, dir_fd: int) -> dict[str, bytes]:
    return {
        n: xattr.get(path, n, dir_fd=dir_fd)
        for n in xattr.names(path, dir_fd=dir_fd)
        if not whiteout.is_private_xattr(n)
    }


class _MergedView:
    """The upper directory ``upper`` over ``lowers`` merged, for what ``_walk`` must know beyond the upper
    itself: what is below a redirected directory, where a metadata-only copy's data is. Opened when
    first needed: most diffs meet neither."""

    def __init__(self, upper: str, lowers: Sequence[str]) -> None:
        self._upper = upper
        self._lowers = lowers
        self._resolver: Resolver | None = None

    def _view(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(
                [Layer(self._upper, writable=True)] + [Layer(p, writable=False, cached=False) for p in self._lowers]
            )
        return self._resolver

    def data_of(self, path: str) -> Part | None:
        """Where the metadata-only copy at ``path`` has its data (None: it has none below any more)."""
        try:
            entry = self._view().lookup(path)
        except OSError:
            return None
        return None if entry is None else entry.data

    def below(self, top: str) -> Iterator[Change]:
        """Every entry the merged view shows below the directory ``top``, added, with where it is when
        not in the upper and where its data is when that is elsewhere."""
        resolver = self._view()
        todo = [top]
        while todo:
            directory = todo.pop()
            for name, (part, info) in resolver.listing(directory).items():
                path = join(directory, name)
                source = None if part.layer.writable else (part.layer.root, join(part.path, name))
                data = self.data_of(path) if info.type_bits == stat.S_IFREG else None
                yield Change(ADDED, path, source, _where(data))
                if info.type_bits == stat.S_IFDIR:
                    todo.append(path)


def _where(part: Part | None) -> tuple[str, str] | None:
    """A part as a change names it: (the layer's root, the path in it)."""
    return None if part is None else (part.layer.root, part.path)


def _sorted_with_ancestors(
    found_changes: Iterator[Change], ignore: frozenset[str], ignore_below: frozenset[str]
) -> list[Change]:
    found = {c.path: c for c in found_changes if c.path not in ignore and not _below_any(c.path, ignore_below)}
    for path in list(found):
        parent = os.path.dirname(path)
        while parent != "/" and parent not in found:
            found[parent] = Change(CHANGED, parent)
            parent = os.path.dirname(parent)
    return sorted(found.values(), key=lambda c: c.path.split("/"))


def _below_any(path: str, tops: frozenset[str]) -> bool:
    """Whether ``path`` is one of ``tops`` or below one."""
    return any(path == top or path.startswith(top + "/") for top in tops)


def _walk(
    listing: Listing, below: Below, root_opaque: bool, unchanged: Unchanged | None, view: _MergedView
) -> Iterator[Change]:
    """Every change in the upper that ``listing`` lists, in no particular order.

    Each directory to visit comes with whether the lowers show a directory at its path that it merges
    with: not when they show nothing there, or the upper directory is new or opaque; then everything
    below it is added. A loop rather than recursion: paths close to PATH_MAX nest deeper than Python's
    recursion limit.
    """
    root = below("/") if not root_opaque else None
    todo: list[tuple[str, bool]] = [("/", root is not None)]
    while todo:
        path, merged = todo.pop()
        entries = listing(path)

        for name, (st, opaque, redirected, metadata_only) in entries.items():
            child = join(path, name)
            if whiteout.is_marker_name(name):
                hidden = whiteout.whited_out_name(name)  # an OCI whiteout file (None for opaque markers)
                if hidden is not None and hidden not in entries and merged and below(join(path, hidden)) is not None:
                    yield Change(DELETED, join(path, hidden))
                continue
            old = below(child) if merged else None
            if whiteout.is_whiteout_stat(st):
                if old is not None:
                    yield Change(DELETED, child)
            elif not stat.S_ISDIR(st.st_mode):
                data = view.data_of(child) if metadata_only else None
                if old is None:
                    yield Change(ADDED, child, data=_where(data))
                elif unchanged is None or not unchanged(child, st, old, data):
                    yield Change(CHANGED, child, data=_where(data))
            elif redirected is not None:
                yield Change(ADDED if old is None else DELETED, child)
                yield from view.below(child)
            elif old is None:
                yield Change(ADDED, child)
                todo.append((child, False))
            elif not old.is_dir:
                yield Change(CHANGED, child)  # a file replaced by a directory: what is inside is new
                todo.append((child, False))
            elif opaque:
                yield Change(DELETED, child)  # Docker's way of saying "replaced": D, then A for its content
                todo.append((child, False))
            else:
                if _dir_differs(st, old):
                    yield Change(CHANGED, child)
                todo.append((child, True))


def _dir_differs(a, b) -> bool:
    return (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) != (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns)
