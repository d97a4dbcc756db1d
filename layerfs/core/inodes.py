"""Inode numbers of the merged view.

A merged entry reports the inode number of the real file holding it, so hard links in a layer share it.
Layers on other filesystems than the first one get their numbers moved into a high range (like
overlayfs's ``xino``) so that numbers of different layers never collide. A file copied up keeps the
number it had in the lower layer (like overlayfs's origin), unless the lower file had several hard
links: copy-up breaks the link, and the copy must not claim the number the remaining links still use.
"""

from __future__ import annotations

import os
import stat
import threading

_XINO_SHIFT = 48


class InodeMap:
    def __init__(self, primary_dev: int) -> None:
        self._dev_index = {primary_dev: 0}
        self._origin: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def number(self, st: os.stat_result) -> int:
        """The merged inode number of the real entry ``st``."""
        return self.number_for(st.st_dev, st.st_ino)

    def number_for(self, dev: int, ino: int) -> int:
        origin = self._origin.get((dev, ino))
        if origin is not None:
            return origin
        return self.raw_number(dev, ino)

    def raw_number(self, dev: int, ino: int) -> int:
        index = self._dev_index.get(dev)
        if index is None:
            with self._lock:
                index = self._dev_index.setdefault(dev, len(self._dev_index))
        return ino if index == 0 else (index << _XINO_SHIFT) | ino

    def copied_up(self, lower: os.stat_result, upper: os.stat_result) -> None:
        """Record that ``upper`` is the copy-up of ``lower``."""
        if stat.S_ISDIR(lower.st_mode) or lower.st_nlink == 1:
            self._origin[(upper.st_dev, upper.st_ino)] = self.number(lower)

    def removed(self, st: os.stat_result) -> None:
        """The real entry ``st`` lost its last name: the filesystem may give its number to a new entry,
        which must not be shown with the old one's origin."""
        self._origin.pop((st.st_dev, st.st_ino), None)
