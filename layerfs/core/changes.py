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

``changes`` walks the upper directory: good for any upper written by layerfs or kernel overlayfs.
``indexed_changes`` gives the same answer from a change index (core.index), which costs what changed:
the upper is not read at all. No FUSE and no mount here.
"""

from __future__ import annotations

import os
import stat
from typing import Callable, Iterator, NamedTuple, Sequence

from . import whiteout, xattr
from .index import ChangeIndex, file_digest
from .layer import Layer
from .lookup import Entry, Resolver, join

ADDED, CHANGED, DELETED = "A", "C", "D"


class Change(NamedTuple):
    kind: str  # ADDED, CHANGED or DELETED
    path: str  # in the container: "/etc/passwd"

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


# What the walk needs of an upper directory: name -> (lstat-like, opaque directory?).
Listing = Callable[[str], dict]
# Whether the upper file at a path (its lstat-like, the lower entry it hides) is an unchanged copy.
Unchanged = Callable[[str, object, Entry], bool]


def changes(upper: str, lowers: Sequence[str], *, unchanged_copies: bool = True) -> list[Change]:
    """The changes ``upper`` makes to ``lowers`` (top first), sorted by path, ancestors included.

    With ``unchanged_copies`` False, a file copied up that ended identical to the lower one (content,
    mode, owner, xattrs; not its times) is no change: a ``touch`` then undone, an editor's rewrite."""
    upper = upper.rstrip("/") or "/"

    def listing(path: str) -> dict:
        with os.scandir(upper if path == "/" else upper + path) as it:
            return {e.name: (st := e.stat(follow_symlinks=False),
                             stat.S_ISDIR(st.st_mode) and whiteout.is_opaque_dir(e.path)) for e in it}

    def unchanged(path: str, st, lower: Entry) -> bool:
        real = upper + path
        return _same_file(st, lambda: _xattrs(real, None), lambda: file_digest(real), lower)

    return _sorted_with_ancestors(_walk(listing, _resolver(lowers), whiteout.is_opaque_dir(upper),
                                        None if unchanged_copies else unchanged))


def indexed_changes(index: ChangeIndex, lowers: Sequence[str], *, unchanged_copies: bool = True) -> list[Change]:
    """The same as ``changes(index.upper, lowers)``, from the index's records instead of the upper."""
    children: dict[str, dict] = {}
    for path, record in index.items():
        if path != "/":
            parent, _, name = path.rpartition("/")
            children.setdefault(parent or "/", {})[name] = (record, record.opaque)
    root = index.get("/")

    def unchanged(path: str, record, lower: Entry) -> bool:
        return _same_file(record, lambda: _xattrs(path[1:], index.upper_fd), lambda: index.digest(path), lower)

    return _sorted_with_ancestors(_walk(lambda path: children.get(path, {}), _resolver(lowers),
                                        root is not None and root.opaque, None if unchanged_copies else unchanged))


def _same_file(st, xattrs: Callable[[], dict], digest: Callable[[], str], lower: Entry) -> bool:
    """Whether an upper regular file is an unchanged copy of ``lower``; the costly parts last."""
    old = lower.st
    if not (stat.S_ISREG(st.st_mode) and stat.S_ISREG(old.st_mode)):
        return False
    if (st.st_mode, st.st_uid, st.st_gid, st.st_size) != (old.st_mode, old.st_uid, old.st_gid, old.st_size):
        return False
    return xattrs() == _xattrs(lower.rel, lower.layer.fd) and \
        digest() == file_digest(lower.rel, dir_fd=lower.layer.fd)


def _xattrs(path: str, dir_fd: int | None) -> dict[str, bytes]:
    return {n: xattr.get(path, n, dir_fd=dir_fd) for n in xattr.names(path, dir_fd=dir_fd)
            if not whiteout.is_private_xattr(n)}


def _resolver(lowers: Sequence[str]) -> Resolver | None:
    # A diff asks about a few names per directory: looked up one by one, not listed whole.
    return Resolver([Layer(p, writable=False, cached=False) for p in lowers]) if lowers else None


def _sorted_with_ancestors(found_changes: Iterator[Change]) -> list[Change]:
    found = {c.path: c for c in found_changes}
    for path in list(found):
        parent = os.path.dirname(path)
        while parent != "/" and parent not in found:
            found[parent] = Change(CHANGED, parent)
            parent = os.path.dirname(parent)
    return sorted(found.values(), key=lambda c: c.path.split("/"))


def _walk(listing: Listing, resolver: Resolver | None, root_opaque: bool,
          unchanged: Unchanged | None) -> Iterator[Change]:
    """Every change in the upper that ``listing`` lists, in no particular order.

    Each directory to visit comes with what the lowers show at its path (a directory), or None when
    they show nothing there or the upper directory is new or opaque: everything below it is added.
    A loop rather than recursion: paths close to PATH_MAX nest deeper than Python's recursion limit.
    """
    root_lower = resolver.lookup("/") if resolver is not None and not root_opaque else None
    todo: list[tuple[str, Entry | None]] = [("/", root_lower)]
    while todo:
        path, lower = todo.pop()
        entries = listing(path)

        for name, (st, opaque) in entries.items():
            child = join(path, name)
            if whiteout.is_marker_name(name):
                hidden = whiteout.whited_out_name(name)  # an OCI whiteout file (None for opaque markers)
                if hidden is not None and hidden not in entries and _below(resolver, lower, path, hidden) is not None:
                    yield Change(DELETED, join(path, hidden))
                continue
            old = _below(resolver, lower, path, name)
            if whiteout.is_whiteout_stat(st):
                if old is not None:
                    yield Change(DELETED, child)
            elif not stat.S_ISDIR(st.st_mode):
                if old is None:
                    yield Change(ADDED, child)
                elif unchanged is None or not unchanged(child, st, old):
                    yield Change(CHANGED, child)
            elif old is None:
                yield Change(ADDED, child)
                todo.append((child, None))
            elif not old.is_dir:
                yield Change(CHANGED, child)  # a file replaced by a directory: what is inside is new
                todo.append((child, None))
            elif opaque:
                yield Change(DELETED, child)  # Docker's way of saying "replaced": D, then A for its content
                todo.append((child, None))
            else:
                if _dir_differs(st, old.st):
                    yield Change(CHANGED, child)
                todo.append((child, old))


def _below(resolver: Resolver | None, lower: Entry | None, path: str, name: str) -> Entry | None:
    """What the lowers show at ``name`` in directory ``path`` (``lower`` there), if anything."""
    if lower is None or resolver is None:
        return None
    return resolver.find_in(lower.stack, path, name, join(path, name))


def _dir_differs(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) != (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns)
