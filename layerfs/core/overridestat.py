"""Owners and modes that fuse-overlayfs's ``xattr_permissions`` keeps in an xattr, where the files
themselves belong to the user who ran it.

The record is ``UID:GID:MODE`` (the mode in octal; fuse-overlayfs 1.15 adds ``:TYPE``, which names the
file's own type here), under ``user.containers.override_stat`` (containers-storage's, preferred) or
``user.fuseoverlayfs.override_stat`` with ``xattr_permissions=2``, and under
``security.fuseoverlayfs.override_stat`` with ``xattr_permissions=1``. With the same option layerfs shows
what a record says in place of the file's own owner and permission bits, and records a chown, chmod or
creation of a directory or regular file there (the only entries ``user.*`` xattrs go on) instead of
making it: the entry stays its daemon's user's, as with fuse-overlayfs.
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from . import xattr

NAMES = {
    "1": ("security.fuseoverlayfs.override_stat",),
    "2": ("user.containers.override_stat", "user.fuseoverlayfs.override_stat"),
}


class Override(NamedTuple):
    uid: int
    gid: int
    mode: int  # permission bits (with setuid, setgid and sticky)

    def changed(self, owner: tuple[int, int] | None, mode: int | None, file_type: int) -> Override:
        """This record after a chown to ``owner`` (-1: that id kept) and a chmod to ``mode``; a chown
        clears setuid, and setgid where group-executable, of a non-directory, as the kernel does."""
        uid, gid, bits = self.uid, self.gid, self.mode if mode is None else stat.S_IMODE(mode)
        if owner is not None:
            uid, gid = (now if new == -1 else new for now, new in zip((uid, gid), owner, strict=True))
            if file_type != stat.S_IFDIR:
                bits &= ~(stat.S_ISUID | (stat.S_ISGID if bits & stat.S_IXGRP else 0))
        return Override(uid, gid, bits)


def is_recorded(mode: int) -> bool:
    """Whether an entry of this type gets a record: a directory or a regular file."""
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode)


def parse(value: bytes) -> Override | None:
    """The record ``value``; None for one that is not ``UID:GID:MODE[:TYPE]``."""
    fields = value.split(b"\0", 1)[0].split(b":")
    if len(fields) < 3:
        return None
    try:
        return Override(int(fields[0]), int(fields[1]), stat.S_IMODE(int(fields[2], 8)))
    except ValueError:
        return None


def read(path: str | int, names: tuple[str, ...], *, dir_fd: int | None = None) -> Override | None:
    """The record of the entry ``path`` (relative to ``dir_fd``; or an open file) under the first of
    ``names`` it has."""
    value = xattr.get_first(path, names, dir_fd=dir_fd)
    return None if value is None else parse(value)


def write(
    path: str | int, names: tuple[str, ...], record: Override, file_type: int, *, dir_fd: int | None = None
) -> None:
    """``record`` kept for the entry ``path`` (relative to ``dir_fd``; or an open file) under the first of
    ``names`` it has a record under (the one read), else under the last: fuse-overlayfs's own, which it
    writes (containers-storage writes the first). The mode goes with its type bits, as fuse-overlayfs has it."""
    present = set(xattr.names(path, dir_fd=dir_fd))
    name = next((n for n in names if n in present), names[-1])
    xattr.set(path, name, f"{record.uid}:{record.gid}:{file_type | record.mode:o}".encode(), dir_fd=dir_fd)
