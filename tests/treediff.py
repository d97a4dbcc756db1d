"""Docker's full two-tree comparison, the independent way to get a container's changes.

Compares an old tree (the image: the lowers mounted) with a new one (the container: lowers + upper
mounted) entry by entry, the way Docker does when it cannot walk an upper dir: ``A`` only in the new
tree (everything below a new directory too), ``D`` only in the old one (not recursed), ``C`` present in
both but different (type, mode, owner, for a directory its mtime, for a file its size, mtime and data,
a symlink's target, a device number), and every ancestor directory of a change ``C`` except ``/``.
It reads two mounted trees and knows nothing of layers, so it checks layerfs.core.changes from outside.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _signature(path: Path, st: os.stat_result) -> tuple:
    common = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid)
    if stat.S_ISDIR(st.st_mode):
        return common + (st.st_mtime_ns,)
    if stat.S_ISREG(st.st_mode):
        return common + (st.st_size, st.st_mtime_ns, path.read_bytes())
    if stat.S_ISLNK(st.st_mode):
        return common + (os.readlink(path),)
    return common + (st.st_rdev,)


def _entries(directory: Path | None) -> dict[str, os.stat_result]:
    if directory is None:
        return {}
    return {e.name: e.stat(follow_symlinks=False) for e in os.scandir(directory)}


def _compare(old: Path | None, new: Path, rel: str, out: dict[str, str]) -> None:
    before, after = _entries(old), _entries(new)
    for name, st in after.items():
        path = f"{rel}/{name}"
        was = before.get(name)
        if was is None:
            out[path] = "A"
        elif _signature(old / name, was) != _signature(new / name, st):
            out[path] = "C"
        if stat.S_ISDIR(st.st_mode):
            still_dir = was is not None and stat.S_ISDIR(was.st_mode)
            _compare(old / name if still_dir else None, new / name, path, out)
    for name in before.keys() - after.keys():
        out[f"{rel}/{name}"] = "D"


def two_tree_changes(old: Path, new: Path) -> list[str]:
    """``["C /etc", "A /etc/new", ...]``: what turns tree ``old`` into tree ``new``, sorted by path."""
    found: dict[str, str] = {}
    _compare(old, new, "", found)
    for path in list(found):
        parent = os.path.dirname(path)
        while parent != "/" and parent not in found:
            found[parent] = "C"
            parent = os.path.dirname(parent)
    return [f"{found[p]} {p}" for p in sorted(found, key=lambda p: p.split("/"))]
