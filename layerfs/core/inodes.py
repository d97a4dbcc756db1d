"""Inode numbers of the merged view, as kernel overlayfs gives them.

A merged entry reports the inode number of the real file holding it, so hard links in a layer share it.
Layers on other filesystems than the first one get their numbers moved into a high range (like
overlayfs's ``xino``) so that numbers of different layers never collide; the ranges follow the layers'
order, so a number is the same at every mount of the same layers.

A copied-up entry keeps the number of the lower entry it came from, read from its origin record
(``origin.py``), so it keeps it after a remount too, as on overlayfs; unless the lower file had several
hard links: copy-up breaks the link, and the copy must not claim the number the remaining links still use.
An entry of a lower layer shows its own number, origin record or not, as on overlayfs.
"""

from __future__ import annotations

import os
import stat
import threading

from .layer import Layer
from .origin import Origins

_XINO_SHIFT = 48


def _keeps_origin_number(lower: os.stat_result) -> bool:
    return stat.S_ISDIR(lower.st_mode) or lower.st_nlink == 1


class InodeMap:
    def __init__(self, layers: list[Layer], origins: Origins | None) -> None:
        self._dev_index: dict[int, int] = {}
        for layer in layers:
            self._dev_index.setdefault(layer.dev, len(self._dev_index))
        self._origins = origins
        # Upper entries' numbers, once known: (dev, ino) of the upper file -> merged number.
        self._upper: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def number(self, st: os.stat_result) -> int:
        """The merged inode number of the real entry ``st``, where it is known without reading its origin
        (any lower entry, an upper one made or looked up through this union)."""
        return self.number_for(st.st_dev, st.st_ino)

    def number_for(self, dev: int, ino: int) -> int:
        known = self._upper.get((dev, ino))
        if known is not None:
            return known
        return self.raw_number(dev, ino)

    def number_of_upper(self, rel: str, dev: int, ino: int) -> int:
        """The merged inode number of the upper layer's entry ``rel``, the real file ``ino`` of ``dev``."""
        key = (dev, ino)
        known = self._upper.get(key)
        if known is None:
            lower = self._origins.lower_of(rel) if self._origins is not None else None
            known = self._upper[key] = self._copy_number(lower, key)
        return known

    def raw_number(self, dev: int, ino: int) -> int:
        index = self._dev_index.get(dev)
        if index is None:
            with self._lock:
                index = self._dev_index.setdefault(dev, len(self._dev_index))
        return ino if index == 0 else (index << _XINO_SHIFT) | ino

    def copied_up(self, lower: os.stat_result, upper: os.stat_result) -> None:
        """Record that ``upper`` is the copy-up of ``lower``."""
        key = (upper.st_dev, upper.st_ino)
        self._upper[key] = self._copy_number(lower, key)

    def _copy_number(self, lower: os.stat_result | None, key: tuple[int, int]) -> int:
        """The number of the upper file ``key`` (dev, ino) copied up from ``lower`` (None: not a copy)."""
        if lower is not None and _keeps_origin_number(lower):
            return self.number(lower)
        return self.raw_number(*key)

    def removed(self, st: os.stat_result) -> None:
        """The real entry ``st`` lost its last name: the filesystem may give its number to a new entry,
        which must not be shown with the old one's origin."""
        self._upper.pop((st.st_dev, st.st_ino), None)
