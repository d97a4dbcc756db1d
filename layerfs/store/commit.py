"""A container's changes frozen into a layer directory: the entries ``oci.entries`` finds for them (the
ones ``layerfs export`` writes as a tar), written in overlay form instead, so the directory is the layer
its diff_id (that tar's) names. A whiteout entry is an overlay whiteout, an opaque directory gets the
opaque mark, a file's other names are hard links to its first, and a metadata-only copy gets its data
from the lower that holds it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, cast

from ..core import confined, copyup, whiteout
from ..errors import LayerfsError
from ..oci.entries import Entry, FirstNames, Upper
from ..oci.layertar import ProgressFn, write_entries

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Committed:
    path: str  # the layer directory
    diff_id: str
    new: bool  # False when the store had this layer already


class _Discard:
    """A file object that keeps nothing: the layer tar is written only to be hashed."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def layer_diff_id(tree: Upper, found: list[Entry], progress: ProgressFn | None) -> str:
    """The diff_id of the layer of ``found``: the digest of the tar ``layerfs export`` writes for it."""
    return write_entries(cast(BinaryIO, _Discard()), tree, found, progress=progress).diff_id


def build_layer(tree: Upper, found: list[Entry], build: str) -> None:
    """Write the layer of ``found`` into the empty directory ``build``, in overlay form."""
    build_fd = os.open(build, _DIR)
    first_names = FirstNames()
    dirs: list[tuple[str, os.stat_result]] = []
    try:
        if tree.root_opaque():
            whiteout.mark_opaque(".", dir_fd=build_fd)
        for entry in found:
            with confined.beneath(entry.path[1:], dir_fd=build_fd) as (parent, name):
                try:
                    _write(tree, entry, parent, name, build_fd, first_names)
                except FileNotFoundError as e:
                    raise LayerfsError(f"cannot commit {entry.path}: it is no longer in the upper directory") from e
            if entry.st is not None and stat.S_ISDIR(entry.st.st_mode):
                dirs.append((entry.path, entry.st))
        for path, st in reversed(dirs):  # times last: making children changes a directory's mtime
            with confined.beneath(path[1:], dir_fd=build_fd) as (parent, name):
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(build_fd)


def _write(tree: Upper, entry: Entry, parent: int, name: str, build_fd: int, first_names: FirstNames) -> None:
    """Write ``entry`` as ``name`` in ``parent``, a directory of the layer being built at ``build_fd``."""
    if entry.st is None:
        whiteout.make_whiteout(name, dir_fd=parent)
        return
    first = first_names.link_target(entry.path, entry.st)
    if first is not None:  # another name of a file this layer has already: a hard link, as in the upper
        with confined.beneath(first[1:], dir_fd=build_fd) as (first_parent, first_name):
            os.link(first_name, name, src_dir_fd=first_parent, dst_dir_fd=parent, follow_symlinks=False)
        return
    with tree.directory_of(entry) as (src_parent, src_name):
        copyup.copy_entry(
            src_name, entry.st, name, src_dir_fd=src_parent, dst_dir_fd=parent, data_at=tree.data_at(entry), sync=False
        )
    if entry.opaque:
        whiteout.mark_opaque(name, dir_fd=parent)
