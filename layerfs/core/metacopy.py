"""Overlayfs's metadata-only copies: an upper file that holds a lower file's metadata, not its data.

With ``metacopy=on``, a chown, chmod, timestamp or xattr change (and a rename or a link) of a lower
regular file copies up its metadata alone: the copy has the lower's size but no blocks (a sparse file),
and ``trusted.overlay.metacopy`` says its data is still below, in the next layer holding a file at its
path (or where its redirect, ``redirect.py``, says, once it was renamed). The data is copied into the
copy itself when the file is first opened for writing or truncated, and the mark is then removed.
Kernel overlayfs writes and reads the same form (``user.overlay.metacopy`` with ``userxattr``).

Every non-empty regular file is asked for the mark when looked up (a lower layer's once): its blocks do
not tell, an ext4 file's xattrs may take a block of their own. An empty file needs no data from below.
"""

from __future__ import annotations

import os
import stat

from . import xattr
from .forms import Forms

METACOPY_XATTRS = ("trusted.overlay.metacopy", "user.overlay.metacopy")


def may_be(st: os.stat_result) -> bool:
    """Whether the file ``st`` can need data from below."""
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def is_marked(path: str | int, *, dir_fd: int | None = None) -> bool:
    """Whether the regular file ``path`` (relative to ``dir_fd``, or an open file) carries the mark."""
    return xattr.has_any(path, METACOPY_XATTRS, dir_fd=dir_fd)


def mark(fd: int, forms: Forms) -> bool:
    """Mark the open copy as holding metadata only, in the mount's form; False where it cannot be set
    (then the copy must hold its data)."""
    return xattr.set_first(fd, forms.written("metacopy"), b"")


def unmark(fd: int) -> None:
    """Remove the mark from the open file, whose data is now its own."""
    xattr.remove_all(fd, METACOPY_XATTRS)
