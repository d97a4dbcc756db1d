"""Extended attributes of an entry named relative to a directory descriptor, never following it.

The *xattr system calls had no ``*at`` form before Linux 6.13. The entry's parent directory is opened
beneath the directory descriptor (``confined.open_beneath``) and the entry reached as
``/proc/self/fd/PARENT/NAME``: the kernel jumps to that directory and looks NAME up without following it,
which works for every file type (a symlink or a device cannot be opened to use f*xattr), and the path is
short whatever the layer's own path is. An entry's names, which lookups ask of every file (its metacopy
mark) and directory (its records), most having none, come from ``listxattrat`` where the kernel has it
(``known_names``), at a third of the cost.
"""

from __future__ import annotations

import errno
import os

from .. import syscalls
from . import confined

# A missing xattr, or a namespace the filesystem or the daemon may not use (trusted.* without
# CAP_SYS_ADMIN): where overlayfs's records fall back from their trusted.* form to their user.* one.
_UNAVAILABLE = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES)
_listxattrat = True  # (until the kernel says it has none)


def _on_entry(call, path: str | int, dir_fd: int | None, *args):
    """``call`` (an ``os.*xattr``) on the entry, never following it. No context manager: a lookup asks
    this of every regular file it meets (``metacopy.py``)."""
    if isinstance(path, int):  # (an open file)
        return call(path, *args)
    if dir_fd is None:  # (a path from the cwd)
        return call(path, *args, follow_symlinks=False)
    # Through /proc/self/fd, the kernel follows every directory on the way: the entry's parent is opened
    # beneath the layer first, so that a directory swapped for a symlink is not.
    head, _, name = path.rpartition("/")
    if not head:  # (the common case: a name in a directory the caller holds open)
        return call(f"/proc/self/fd/{dir_fd}/{name}", *args, follow_symlinks=False)
    parent = confined.open_beneath(head, os.O_PATH | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        return call(f"/proc/self/fd/{parent}/{name}", *args, follow_symlinks=False)
    finally:
        os.close(parent)


def get(path: str | int, name: str, *, dir_fd: int | None = None) -> bytes:
    return _on_entry(os.getxattr, path, dir_fd, name)


def names(path: str | int, *, dir_fd: int | None = None) -> list[str]:
    return _on_entry(os.listxattr, path, dir_fd)


def set(path: str | int, name: str, value: bytes, flags: int = 0, *, dir_fd: int | None = None) -> None:
    _on_entry(os.setxattr, path, dir_fd, name, value, flags)


def remove(path: str | int, name: str, *, dir_fd: int | None = None) -> None:
    _on_entry(os.removexattr, path, dir_fd, name)


def get_first(path: str | int, names: tuple[str, ...], *, dir_fd: int | None = None) -> bytes | None:
    """The value of the first of ``names`` the entry has (an overlay record's trusted.* form, else its
    user.* one, as overlayfs's ``userxattr`` writes it); None where it has none."""
    present = known_names(path, dir_fd=dir_fd)
    if present is not None:  # (asked only for what it has: most entries have none, and no error is raised)
        if not present:
            return None
        names = tuple(name for name in names if name in present)
    for name in names:
        try:
            return get(path, name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in _UNAVAILABLE:
                raise
    return None


def has_any(path: str | int, wanted: tuple[str, ...], *, dir_fd: int | None = None) -> bool:
    """Whether the entry has one of ``wanted`` (one listxattr, where asking for each costs a call each)."""
    present = known_names(path, dir_fd=dir_fd)
    if present is None:
        try:
            present = names(path, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in _UNAVAILABLE:
                return False
            raise
    return bool(present) and any(name in present for name in wanted)


def known_names(path: str | int, *, dir_fd: int | None = None) -> list[str] | None:
    """The xattr names of an open file, or of a name in ``dir_fd`` where the kernel has listxattrat
    (Linux 6.13; a third of the time listxattr through /proc takes): one call, where asking for each
    record costs one. None where they are not known that way (the caller asks the slower way, which
    answers, or raises, as it always has)."""
    global _listxattrat
    try:
        if isinstance(path, int):
            return os.listxattr(path)
        if not _listxattrat or dir_fd is None or "/" in path:
            return None
        return syscalls.xattr_names(path, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM) and not isinstance(path, int):
            _listxattrat = False  # (an older kernel, or a seccomp filter that knows none)
        return None


def set_first(path: str | int, names: tuple[str, ...], value: bytes, *, dir_fd: int | None = None) -> bool:
    """Set the first of ``names`` the filesystem and the daemon may use; False where none."""
    for name in names:
        try:
            set(path, name, value, dir_fd=dir_fd)
            return True
        except OSError as e:
            if e.errno not in _UNAVAILABLE:
                raise
    return False


def remove_all(path: str | int, names: tuple[str, ...], *, dir_fd: int | None = None) -> None:
    """Remove each of ``names`` the entry has (every form of an overlay record)."""
    for name in names:
        try:
            remove(path, name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in _UNAVAILABLE:
                raise
