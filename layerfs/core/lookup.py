"""Path resolution through the layer stack, with overlayfs's rules.

A name is looked up top-down in the layers where its parent is a real directory. The first layer that
has it decides what it is; a whiteout there (or above) hides it. A directory merges with the
directories of the same name below it until a layer where the name is not a directory, or where the
directory is opaque. That list of layers is the directory's *stack*, and a child is looked up only in
its parent's stack.

Stacks of directories are cached: the kernel hands a full path with every request, and without the
cache each request would resolve every ancestor in every layer. The cache is dropped whenever the
filesystem changes the shape of the tree (a directory made, copied up, renamed, removed or made opaque).
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from . import whiteout
from .layer import Layer


class Entry:
    """A resolved merged entry: the topmost layer holding it, its real lstat there, and for a
    directory the stack of layers it merges."""

    __slots__ = ("path", "layer", "st", "stack")

    def __init__(self, path: str, layer: Layer, st: os.stat_result, stack: tuple[Layer, ...]) -> None:
        self.path = path
        self.layer = layer
        self.st = st
        self.stack = stack

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def in_upper(self) -> bool:
        return self.layer.writable

    @property
    def rel(self) -> str:
        """The entry's path relative to its layer's root descriptor, ``self.layer.fd``."""
        return Layer.rel(self.path)

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
        self._stacks: dict[str, tuple[Layer, ...]] = {}
        # A lookup racing with a change must not store what it read before the change: it stores only
        # if no invalidation happened since it started.
        self._generation = 0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._stacks.clear()

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path``, or None when nothing is visible there.

        Raises ENOENT when an ancestor is missing and ENOTDIR when an ancestor is not a directory.
        """
        if path == "/":
            return self._root()
        stack = self._stacks.get(path)
        if stack is not None:  # a directory looked up before: no need to probe every layer again
            return Entry(path, stack[0], stack[0].lstat(path), stack)
        parent, name = split(path)
        if whiteout.is_marker_name(name):
            return None  # bookkeeping, never an entry of the merged view
        return self.find_in(self.stack_of(parent), parent, name, path)

    def get(self, path: str) -> Entry:
        """Like lookup, but a missing entry is ENOENT."""
        entry = self.lookup(path)
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return entry

    def stack_of(self, path: str) -> tuple[Layer, ...]:
        """The stack of the directory at ``path``."""
        stack = self._stacks.get(path)
        if stack is not None:
            return stack
        generation = self._generation
        entry = self.lookup(path)
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not entry.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        with self._lock:
            if generation == self._generation:
                self._stacks[path] = entry.stack
        return entry.stack

    def _root(self) -> Entry:
        stack = self._stacks.get("/")
        if stack is None:
            layers = []
            for layer in self.layers:
                layers.append(layer)
                if layer.is_opaque("/"):
                    break
            stack = tuple(layers)
            self._stacks["/"] = stack
        return Entry("/", stack[0], stack[0].lstat("/"), stack)

    @staticmethod
    def find_in(stack: tuple[Layer, ...], parent: str, name: str, path: str) -> Entry | None:
        """Look ``name`` up in the layers of ``stack`` (its parent directory's stack)."""
        top: Layer | None = None
        top_st: os.stat_result | None = None
        dirs: list[Layer] = []
        for layer in stack:
            st, hidden = layer.probe(parent, name, path)
            if hidden:
                break
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                if top is None:
                    top, top_st = layer, st
                break
            if top is None:
                top, top_st = layer, st
            dirs.append(layer)
            if layer.is_opaque(path):
                break
        if top is None:
            return None
        return Entry(path, top, top_st, tuple(dirs))
