"""What a snapshot's own directory holds, in bytes and inodes (containerd's Usage).

From the change index when layerfs has mounted the snapshot (its records: O(changes)); else from a walk
of the directory, counting each inode once, as containerd's overlay snapshotter does.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from ..core.index import read_index
from ..core.union import INDEX_DIR


class Usage(NamedTuple):
    size: int
    inodes: int


def usage(upper: str, work: str) -> Usage:
    state = os.path.join(work, INDEX_DIR)
    if os.path.isdir(state):
        with read_index(upper, state) as index:
            seen = {record.ino: record.size for _, record in index.items() if not stat.S_ISDIR(record.mode)}
            return Usage(sum(seen.values()), len(index))
    return _walk(upper)


def _walk(top: str) -> Usage:
    sizes: dict[tuple[int, int], int] = {}
    for directory, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            sizes[st.st_dev, st.st_ino] = 0 if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return Usage(sum(sizes.values()), len(sizes))
