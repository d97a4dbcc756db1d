"""What a snapshot's own directory holds, in bytes and inodes (containerd's Usage), counted as containerd's
overlay snapshotter counts it: every inode once (directories and the root too), by the blocks it takes.

From the change index where the snapshot has one: a layerfs mount kept it, and Commit builds it for a
layer containerd unpacked straight into the directory. Else (an active snapshot no layerfs mount has
served) from a walk of the directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from ..core.index import ChangeIndex, read_index
from ..core.union import INDEX_DIR


class Usage(NamedTuple):
    size: int
    inodes: int


def usage(upper: str, work: str) -> Usage:
    state = os.path.join(work, INDEX_DIR)
    if os.path.isdir(state):
        with read_index(upper, state) as index:
            return _of_index(index)
    return _walk(upper)


def index_for_commit(upper: str, work: str) -> Usage:
    """Bring the snapshot's change index up to date and save it, once, as its layer is frozen: built by a
    walk for a layer containerd unpacked (no daemon journaled it), folded with its journal for one a mount
    kept. Its Usage, and any later diff of it, then read the records alone."""
    with read_index(upper, os.path.join(work, INDEX_DIR)) as index:
        index.save()
        return _of_index(index)


def _of_index(index: ChangeIndex) -> Usage:
    return _counted((record.ino, record.blocks) for _, record in index.items())


def _walk(top: str) -> Usage:
    """What a walk of ``top`` finds, as containerd's fs.DiskUsage counts it."""
    found = [os.lstat(top)]
    for directory, dirs, files in os.walk(top):
        found.extend(os.lstat(os.path.join(directory, name)) for name in (*dirs, *files))
    return _counted((st.st_ino, st.st_blocks) for st in found)


def _counted(inodes: Iterable[tuple[int, int]]) -> Usage:
    blocks = dict(inodes)  # (an inode met again through a hard link counts once)
    return Usage(sum(blocks.values()) * 512, len(blocks))
