"""Owners and modes that fuse-overlayfs's ``xattr_permissions`` keeps in an xattr, where the files
themselves belong to the user who ran it.

The record is ``UID:GID:MODE`` (the mode in octal; fuse-overlayfs 1.15 adds ``:TYPE``, which names the
file's own type here), under ``user.containers.override_stat`` (containers-storage's, preferred) or
``user.fuseoverlayfs.override_stat`` with ``xattr_permissions=2``, and under
``security.fuseoverlayfs.override_stat`` with ``xattr_permissions=1``. With the same option layerfs shows
what a record says in place of the file's own owner and permission bits.
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


def parse(value: bytes) -> Override | None:
    """The record ``value``; None for one that is not ``UID:GID:MODE[:TYPE]``."""
    fields = value.split(b"\0", 1)[0].split(b":")
    if len(fields) < 3:
        return None
    try:
        return Override(int(fields[0]), int(fields[1]), stat.S_IMODE(int(fields[2], 8)))
    except ValueError:
        return None


def read(path: str, names: tuple[str, ...], *, dir_fd: int) -> Override | None:
    """The record of the entry ``path`` (relative to ``dir_fd``) under the first of ``names`` it has."""
    value = xattr.get_first(path, names, dir_fd=dir_fd)
    return None if value is None else parse(value)
