"""Path resolution through the layer stack, with overlayfs's rules.

A name is looked up top-down in the layers where its parent is a real directory. The first layer that
has it decides what it is; a whiteout there (or above) hides it. A directory merges with the
directories of the same name below it until a layer where the name is not a directory, or where the
directory is opaque. That list of layers is the directory's *stack*, and a child is looked up only in
its parent's stack.

A directory renamed by overlayfs's ``redirect_dir`` carries a *redirect* (``redirect.py``): below it,
the layers are looked up at the path it names instead of its own. Each part of a stack is therefore a
layer and the directory's path in that layer (``Part``), which is the merged path unless a redirect sent
the lookup elsewhere, and an entry knows its path in its own layer (``Entry.real``). As on the kernel,
an absolute redirect is looked up from the root of every layer below the one holding it, a relative one
(a new name in the same parent) in the parent's parts.

Stacks of directories are cached: the kernel hands a full path with every request, and without the
cache each request would resolve every ancestor in every layer. The cache is dropped whenever the
filesystem changes the shape of the tree (a directory made, copied up, renamed, removed or made opaque).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import NamedTuple

from . import whiteout
from .layer import DirEntryInfo, Layer


class Part(NamedTuple):
    """One layer of a directory's stack, and the directory's path in it."""

    layer: Layer
    path: str


class Entry:
    """A resolved merged entry: the topmost layer holding it, its path and real lstat there, and for a
    directory the stack of layers it merges."""

    __slots__ = ("path", "layer", "st", "stack", "real", "chain")

    def __init__(
        self,
        path: str,
        layer: Layer,
        st: os.stat_result,
        stack: tuple[Part, ...],
        real: str | None = None,
        chain: tuple[Part, ...] = (),
    ) -> None:
        self.path = path
        self.layer = layer
        self.st = st
        self.stack = stack
        self.real = path if real is None else real
        # A metadata-only copy's layers below it that hold its path, top first; the last holds its data.
        self.chain = chain

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def in_upper(self) -> bool:
        return self.layer.writable

    @property
    def rel(self) -> str:
        """The entry's path relative to its layer's root descriptor, ``self.layer.fd``."""
        return Layer.rel(self.real)

    @property
    def data(self) -> Part | None:
        """Where a metadata-only copy's data is (None: in the entry itself)."""
        return self.chain[-1] if self.chain else None

    @property
    def merged(self) -> bool:
        """A directory whose content comes from more than one layer (overlayfs reports nlink 1)."""
        return len(self.stack) > 1

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, {self.layer!r}, stack={len(self.stack)})"


def split(path: str) -> tuple[str, str]:
    """``/a/b`` -> (``/a``, ``b``); ``/a`` -> (``/``, ``a``)."""
    head, _, name = path.rpartition("/")
    return head or "/", name


def join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


class Resolver:
    """Resolves merged paths over ``layers``, given top-down (the upper first when there is one)."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = tuple(layers)
        self._depth = {id(layer): i for i, layer in enumerate(self.layers)}
        self._stacks: dict[str, tuple[Part, ...]] = {}
        # A lookup racing with a change must not store what it read before the change: it stores only
        # if no invalidation happened since it started.
        self._generation = 0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """The shape of the tree changed (a directory renamed or removed): every stack, and every upper
        directory held open by its path, may be stale."""
        with self._lock:
            self._generation += 1
            self._stacks.clear()
        for layer in self.layers:
            if layer.writable:
                layer.forget_dirs()

    def forget(self, path: str) -> None:
        """The stack of the directory ``path`` alone changed: drop it (lookups under way store nothing)."""
        with self._lock:
            self._generation += 1
            self._stacks.pop(path, None)

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path``, or None when nothing is visible there.

        Raises ENOENT when an ancestor is missing and ENOTDIR when an ancestor is not a directory.
        """
        if path == "/":
            return self._root()
        stack = self._stacks.get(path)
        if stack is not None:  # a directory looked up before: no need to probe every layer again
            top = stack[0]
            return Entry(path, top.layer, top.layer.lstat(top.path), stack, top.path)
        parent, name = split(path)
        if whiteout.is_marker_name(name):
            return None  # bookkeeping, never an entry of the merged view
        generation = self._generation
        entry = self.find_in(self.stack_of(parent), name, path)
        if entry is not None and entry.stack:
            # A directory: kept, for the listing and the lookups in it that usually follow.
            with self._lock:
                if generation == self._generation:
                    self._stacks[path] = entry.stack
        return entry

    def get(self, path: str) -> Entry:
        """Like lookup, but a missing entry is ENOENT."""
        entry = self.lookup(path)
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return entry

    def stack_of(self, path: str) -> tuple[Part, ...]:
        """The stack of the directory at ``path``."""
        stack = self._stacks.get(path)
        if stack is not None:
            return stack
        entry = self.lookup(path)  # (which keeps a directory's stack)
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not entry.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return entry.stack

    def listing(self, path: str) -> dict[str, tuple[Part, DirEntryInfo]]:
        """The merged directory ``path``: name -> the part (layer, and the directory's path in it) the
        entry is shown from, and the entry."""
        merged: dict[str, tuple[Part, DirEntryInfo]] = {}
        hidden: set[str] = set()
        for part in self.stack_of(path):
            entries, whited_out = part.layer.scan(part.path)
            for name, info in entries.items():
                if name not in merged and name not in hidden:
                    merged[name] = (part, info)
            hidden.update(whited_out)
        return merged

    def _root(self) -> Entry:
        stack = self._stacks.get("/")
        if stack is None:
            parts = []
            for layer in self.layers:
                parts.append(Part(layer, "/"))
                if layer.is_opaque("/"):
                    break
            stack = self._stacks["/"] = tuple(parts)
        return Entry("/", stack[0].layer, stack[0].layer.lstat("/"), stack)

    def find_in(self, stack: tuple[Part, ...], name: str, path: str) -> Entry | None:
        """Look ``name`` up in the layers of ``stack`` (its parent directory's stack); ``path`` is the
        merged path it gets.

        Below a directory with a redirect, the layers are looked up where it points: a relative redirect
        is a new name in the parent's parts, an absolute one a path from the root of every layer below.
        Below a metadata-only copy (``metacopy.py``) the lookup goes on the same way, following its
        redirect if it has one, down to the regular file holding its data; with none there (a layer
        changed under the copy) the entry is unreadable: EIO, as on overlayfs.
        """
        top: Layer | None = None
        top_st: os.stat_result | None = None
        top_real = path
        dirs: list[Part] = []
        chain: list[Part] = []  # below a metadata-only copy: the layers holding its path, to its data
        needs_data = False
        parts, i = stack, 0
        absolute: str | None = None  # the path looked up once an absolute redirect was met
        while i < len(parts):
            layer, parent = parts[i]
            i += 1
            last_layer = False
            if absolute is None:
                real = join(parent, name)
                st, hidden = layer.probe(parent, name, real)
            else:
                real = absolute
                st, last_layer, absolute = layer.probe_path(real)
                hidden = st is None and last_layer
            if hidden:
                break
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if top is None:
                    top, top_st, top_real = layer, st, real
                elif not dirs:
                    break  # (below a file: its data is not a directory)
                dirs.append(Part(layer, real))
                if layer.is_opaque(real):
                    break
                target = layer.redirect(real)
            else:
                if top is None:
                    top, top_st, top_real = layer, st, real
                elif dirs or not stat.S_ISREG(st.st_mode):
                    break  # a directory's stack ends here; a file's data is a regular file
                else:
                    chain.append(Part(layer, real))
                needs_data, target = layer.metacopy(real, st)
                if not needs_data:
                    break
            if target is not None and target.startswith("/"):
                absolute = target
                below = self._depth[id(layer)]
                parts, i = tuple(p for p in self.stack_of("/") if self._depth[id(p.layer)] > below), 0
            elif target is not None and absolute is None:
                name = target
            elif target is not None and absolute is not None:
                absolute = join(split(absolute)[0], target)
            if last_layer:
                break
        if top is None or top_st is None:
            return None
        if needs_data:
            raise OSError(errno.EIO, "a metadata-only copy with no data below it", path)
        return Entry(path, top, top_st, tuple(dirs), top_real, tuple(chain))
