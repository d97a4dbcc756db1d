"""Extended attributes of an entry named relative to a directory descriptor, never following it.

The *xattr system calls have no ``*at`` form. The entry is reached through the directory descriptor as
``/proc/self/fd/N/PATH``: the kernel jumps to that directory and looks PATH up from there, its last name
without following it, which works for every file type (a symlink or a device cannot be opened to use
f*xattr). Where that is longer than PATH_MAX, through its parent directory opened first, so that paths
up to PATH_MAX relative to the layer work, however long the layer's own path is.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_PATH_MAX = 4096
# A missing xattr, or a namespace the filesystem or the daemon may not use (trusted.* without
# CAP_SYS_ADMIN): where overlayfs's records fall back from their trusted.* form to their user.* one.
_UNAVAILABLE = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES)


@contextlib.contextmanager
def _reach(path: str | int, dir_fd: int | None) -> Iterator[str | int]:
    if dir_fd is None or isinstance(path, int):  # (a path from the cwd, or an open file)
        yield path
        return
    direct = f"/proc/self/fd/{dir_fd}/{path}"
    if len(direct) < _PATH_MAX // 4 or len(os.fsencode(direct)) < _PATH_MAX:  # (the first test: no encoding)
        yield direct
        return
    head, _, name = path.rpartition("/")
    if name in ("", "."):
        # The directory itself: an ordinary descriptor takes f*xattr calls.
        fd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            yield fd
        finally:
            os.close(fd)
        return
    parent = os.open(head or ".", _DIR, dir_fd=dir_fd)
    try:
        yield f"/proc/self/fd/{parent}/{name}"
    finally:
        os.close(parent)


def _nofollow(target: str | int) -> dict:
    return {} if isinstance(target, int) else {"follow_symlinks": False}


def get(path: str | int, name: str, *, dir_fd: int | None = None) -> bytes:
    with _reach(path, dir_fd) as target:
        return os.getxattr(target, name, **_nofollow(target))


def names(path: str | int, *, dir_fd: int | None = None) -> list[str]:
    with _reach(path, dir_fd) as target:
        return os.listxattr(target, **_nofollow(target))


def set(path: str | int, name: str, value: bytes, flags: int = 0, *, dir_fd: int | None = None) -> None:
    with _reach(path, dir_fd) as target:
        os.setxattr(target, name, value, flags, **_nofollow(target))


def remove(path: str | int, name: str, *, dir_fd: int | None = None) -> None:
    with _reach(path, dir_fd) as target:
        os.removexattr(target, name, **_nofollow(target))


def get_first(path: str | int, names: tuple[str, ...], *, dir_fd: int | None = None) -> bytes | None:
    """The value of the first of ``names`` the entry has (an overlay record's trusted.* form, else its
    user.* one, as overlayfs's ``userxattr`` writes it); None where it has none."""
    for name in names:
        try:
            return get(path, name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in _UNAVAILABLE:
                raise
    return None


def has_any(path: str | int, wanted: tuple[str, ...], *, dir_fd: int | None = None) -> bool:
    """Whether the entry has one of ``wanted`` (one listxattr, where asking for each costs a call each)."""
    try:
        present = names(path, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _UNAVAILABLE:
            return False
        raise
    return any(name in present for name in wanted)


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
