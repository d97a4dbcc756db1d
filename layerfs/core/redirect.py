"""Overlayfs's directory redirects: where a renamed directory's lower parts are.

With ``redirect_dir``, renaming a directory that has lower parts moves only the directory itself in the
upper layer and records, in ``trusted.overlay.redirect``, where the layers below still hold its content:
the old name alone when it stayed in the same parent, else the absolute path from the layers' root
(``/a/b``). Lookup then looks the layers below up there (``lookup.py``); the children stay where they are
until they are changed. Kernel overlayfs writes and reads the same form (``user.overlay.redirect`` with
``userxattr``), and follows redirects by default even where it makes none.

A redirect is a path the daemon follows inside a layer: one with an empty, ``.`` or ``..`` component, or a
relative one with a slash, is not followed.
"""

from __future__ import annotations

import errno
import os

from . import xattr
from .forms import Forms

REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
MAX_LENGTH = 256  # bytes: kernel overlayfs's redirect_max, beyond which it refuses a rename (EXDEV)


def valid(target: str) -> bool:
    parts = target[1:].split("/") if target.startswith("/") else [target]
    return all(part not in ("", ".", "..") for part in parts)


def read(path: str, *, dir_fd: int | None = None) -> str | None:
    """The redirect of the directory at ``path`` (relative to ``dir_fd``), None if it has none or an
    invalid one."""
    value = xattr.get_first(path, REDIRECT_XATTRS, dir_fd=dir_fd)
    target = None if value is None else os.fsdecode(value)
    return target if target is not None and valid(target) else None


def write(path: str, target: str, *, dir_fd: int, forms: Forms) -> None:
    """Record on the upper directory ``path`` that its lower parts are at ``target``, in the mount's form."""
    if not xattr.set_first(path, forms.written("redirect"), os.fsencode(target), dir_fd=dir_fd):
        raise OSError(errno.EXDEV, "no redirect can be recorded here", path)
