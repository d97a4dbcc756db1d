"""Owner ids as the layers store them and as the mount shows them: fuse-overlayfs's ``uidmapping``,
``gidmapping`` and ``squash_to_*`` options.

A mapping is a list of ``STORED:SHOWN:COUNT`` ranges (``uidmapping=0:100000:65536`` shows a file stored
as owned by 0 as owned by 100000, and stores what a caller 100000 creates as 0), the form of a user
namespace's ``uid_map`` read from inside. It lets one set of layers serve containers in different user
namespaces without chowning a file. An id outside every range is shown, and stored, as the kernel's
overflow id (65534), as fuse-overlayfs does. Squashing shows every entry as owned by one id, whatever
is stored; what a new file or a chown stores is unchanged by it.

The layers, the change index and every diff, export and commit keep the stored ids: mapping is how the
mount shows the tree, not what it holds. (``options`` reads the mount options into these.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


def overflow_id(kind: str) -> int:
    """The kernel's id for an owner it cannot show (``kind``: "uid" or "gid")."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


class Range(NamedTuple):
    stored: int
    shown: int
    length: int  # how many ids (a field named count would hide tuple.count)


class IdMap:
    """One kind of id (user or group): ranges, or a squash, or neither (ids as they are)."""

    def __init__(self, ranges: Sequence[Range] = (), squash: int | None = None, overflow: int = 65534) -> None:
        self.ranges = list(ranges)
        self.squash = squash
        self.overflow = overflow

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def shown(self, stored: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return stored
        for r in self.ranges:
            if r.stored <= stored < r.stored + r.length:
                return r.shown + (stored - r.stored)
        return self.overflow

    def stored(self, shown: int) -> int:
        """The id to store for a caller's (or a chown's) ``shown`` id. Squashing does not apply here."""
        if not self.ranges:
            return shown
        for r in self.ranges:
            if r.shown <= shown < r.shown + r.length:
                return r.stored + (shown - r.shown)
        return self.overflow


class Owners(NamedTuple):
    uid: IdMap
    gid: IdMap

    @property
    def identity(self) -> bool:
        return self.uid.identity and self.gid.identity


AS_STORED = Owners(IdMap(), IdMap())
