"""The work directory: where new entries and copies are built before a rename makes them appear in the
upper layer whole, kernel overlayfs's ``workdir/work`` (overlayfs and fuse-overlayfs use and clean the same
directory)."""

from __future__ import annotations

import itertools
import os
import shutil
import stat


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd``, whatever it is; nothing there is no error."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


class WorkDir:
    """``work``/work, opened and emptied: what is there is an interrupted operation's leftovers, never data."""

    def __init__(self, work: str) -> None:
        parent = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir("work", 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            self.fd = os.open("work", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            for name in os.listdir(listing):
                remove_tree(self.fd, name)
        finally:
            os.close(listing)
        self._names = itertools.count()

    def tmp(self) -> str:
        """A fresh name to build an entry under."""
        return f"#{next(self._names):x}"

    def discard(self, name: str) -> None:
        """Remove what was being built at ``name`` (a failed operation's leftover)."""
        remove_tree(self.fd, name)
