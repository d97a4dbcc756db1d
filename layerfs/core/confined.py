"""The one door into a layer: every path below a layer's root (or any directory the daemon, the unpacker,
the exporter or the store works in) is reached here, one real directory at a time, never through a
symlink, never out of that root.

A layer's tree can change under whoever reads it: a container renames a directory and leaves a symlink to
the host in its place, between a lookup and the call that uses it. A call that takes a multi-component
path relative to a directory descriptor (``os.lstat("a/b", dir_fd=...)``) would then follow ``a`` out of
the layer. So such paths are opened with openat2's RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (a walk of
O_NOFOLLOW opens on kernels before 5.6), and calls that take a name (``*at`` calls, xattrs through
``/proc/self/fd``) get the entry's parent opened that way and its last name, which they do not follow.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence

from .. import syscalls

_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_have_openat2 = True


def open_beneath(path: str, flags: int, mode: int = 0, *, dir_fd: int) -> int:
    """Open ``path`` (relative, no ``..``) below ``dir_fd`` without following any symlink on the way, the
    last component included: a directory that someone swapped for a symlink fails with ELOOP (or
    ENOTDIR) instead of leading out of the layer."""
    global _have_openat2
    how = syscalls.open_how(flags, mode)
    if _have_openat2:
        try:
            return syscalls.openat2(dir_fd, path, how)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
        _have_openat2 = False
    *parents, name = path.split("/")
    held = []
    try:
        for parent in parents:
            dir_fd = os.open(parent, _WALK, dir_fd=dir_fd)
            held.append(dir_fd)
        return os.open(name, how.flags, mode, dir_fd=dir_fd)
    finally:
        for fd in held:
            os.close(fd)


@contextlib.contextmanager
def beneath(path: str, *, dir_fd: int) -> Iterator[tuple[int, str]]:
    """``path``'s parent directory below ``dir_fd`` (``dir_fd`` itself for a single name, else an O_PATH
    descriptor from ``open_beneath``) and its last name: what an ``*at`` call that does not follow its
    last component takes."""
    head, _, name = path.rpartition("/")
    if not head:
        yield dir_fd, name
        return
    fd = open_beneath(head, os.O_PATH | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        yield fd, name
    finally:
        os.close(fd)


def lstat(path: str, *, dir_fd: int) -> os.stat_result:
    """lstat of ``path`` below ``dir_fd``. (A single name needs no walk: the hot case of a lookup.)"""
    if "/" not in path:
        return os.lstat(path, dir_fd=dir_fd)
    with beneath(path, dir_fd=dir_fd) as (parent, name):
        return os.lstat(name, dir_fd=parent)


def readlink(path: str, *, dir_fd: int) -> str:
    """The target of the symlink ``path`` below ``dir_fd``."""
    with beneath(path, dir_fd=dir_fd) as (parent, name):
        return os.readlink(name, dir_fd=parent)


def open_dir(name: str, *, dir_fd: int) -> int:
    """An O_PATH descriptor of the directory ``name`` (one component) in ``dir_fd``, not followed."""
    return os.open(name, _WALK, dir_fd=dir_fd)


# How a DirChain opens one more directory: (the parent's descriptor, the path's components, the index of
# the one to open) -> its descriptor. The default opens it; the unpacker's also makes it where missing.
Step = Callable[[int, Sequence[str], int], int]


class DirChain:
    """Descriptors of the directories from ``root_fd`` down to the last one asked for, each opened in its
    parent without following a symlink. A walk that visits a tree in order (a tar's entries, an export of
    sorted changes) asks for the same directories again and again: only the components that differ from
    the previous request are opened. The caller must not replace a directory on the held chain."""

    def __init__(self, root_fd: int, step: Step | None = None) -> None:
        self.root_fd = root_fd
        self._step: Step = step or (lambda fd, parts, i: open_dir(parts[i], dir_fd=fd))
        self._held: list[tuple[str, int]] = []  # (name, descriptor) of each directory below the root
        self._last: tuple[str, ...] | None = None  # what ``_held`` leads to, while it is whole

    def get(self, parts: Sequence[str]) -> int:
        """The descriptor of the directory ``parts`` (components below the root), kept until another is
        asked for or the chain is closed."""
        if parts == self._last:  # (as a rule: entries come directory by directory)
            return self._held[-1][1] if self._held else self.root_fd
        same = 0
        while same < min(len(parts), len(self._held)) and self._held[same][0] == parts[same]:
            same += 1
        self.release(same)
        for i in range(same, len(parts)):
            fd = self._step(self._held[-1][1] if self._held else self.root_fd, parts, i)
            self._held.append((parts[i], fd))
        self._last = tuple(parts)  # (a list the caller may change is never taken for it)
        return self._held[-1][1] if self._held else self.root_fd

    def release(self, keep: int = 0) -> None:
        """Close the held descriptors below the first ``keep`` directories (all of them by default)."""
        for _, fd in self._held[keep:]:
            os.close(fd)
        del self._held[keep:]
        self._last = None
