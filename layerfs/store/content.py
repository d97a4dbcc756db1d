"""File data shared between layers: ``STORE/content/<2 hex>/<key>``, one inode per distinct file.

Files alike in every respect (the key: the xxh3-128 of the data with mode, owner, times and xattrs) take
their space once, in one of two ways:

- ``reflink`` (the default): the layer's file shares the data extents of the store's copy (FICLONE), as
  containers-storage's dedup does. Nothing a container can see changes; a filesystem without reflinks
  (ext4) shares nothing.
- ``hardlink``: the layer's file is a hard link to the store's entry, as ostree does. Works everywhere,
  but a container sees it: ``st_nlink`` above 1, and two alike files in one layer share an inode number.

Only a layer being built, in the store's scratch space and not yet named, is changed here.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable

import xxhash

from .. import syscalls
from ..core import copyup, xattr
from ..core.index import file_digest
from ..errors import LayerfsError
from .root import Root

SHARING = ("reflink", "hardlink", "none")


class Content:
    def __init__(self, root: Root) -> None:
        self.pool = root.sub("content")

    def share(self, layer: str, how: str) -> None:
        """(Holding the lock.) Let each regular file of the layer being built at ``layer`` share its data
        with its alike in the pool, ``how`` (one of ``SHARING``)."""
        if how not in SHARING:
            raise LayerfsError(f"{how!r}: no way to share content (one of {', '.join(SHARING)})")
        if how == "none":
            return
        for parent, _, names in os.walk(layer):
            for name in names:
                path = os.path.join(parent, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    continue  # hard links inside the layer stay as the container made them
                key = _content_key(path, st)
                shared = os.path.join(self.pool, key[:2], key)
                os.makedirs(os.path.dirname(shared), exist_ok=True)
                if how == "hardlink":
                    try:
                        os.link(path, shared)
                    except FileExistsError:
                        _replace(path, functools.partial(os.link, shared))
                elif os.path.exists(shared):
                    _replace(path, functools.partial(_reflink, shared, st=st))
                elif not _reflink(path, shared, st):
                    return  # no reflinks on this filesystem: nothing to share

    def forget_unshared(self) -> None:
        """(Holding the lock.) Drop the pool's files no layer links any more."""
        for parent, _, names in os.walk(self.pool):
            for name in names:
                if os.lstat(os.path.join(parent, name)).st_nlink == 1:
                    os.unlink(os.path.join(parent, name))


def _replace(path: str, make: Callable[[str], object]) -> None:
    """Put what ``make`` creates at a temporary name in place of ``path``, unless it made nothing."""
    tmp = path + ".layerfs-share"
    if make(tmp) is False:
        return
    os.replace(tmp, path)


def _reflink(src: str, dst: str, st: os.stat_result) -> bool:
    """``dst``: a new file sharing ``src``'s data extents, with the metadata of ``st``; False (and
    nothing made) where the filesystem has no reflinks."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            cloned = syscalls.clone_file(src_fd, dst_fd)
            if cloned:
                os.fchown(dst_fd, st.st_uid, st.st_gid)  # first: it clears capabilities and setuid bits
                copyup.copy_xattrs(src, dst, src_dir_fd=None, dst_dir_fd=None)
                os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
                os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if not cloned:
        os.unlink(dst)
    return cloned


def _content_key(path: str, st: os.stat_result) -> str:
    h = xxhash.xxh3_128()
    h.update(file_digest(path).encode())
    h.update(repr((st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)).encode())
    for name in sorted(xattr.names(path)):
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + xattr.get(path, name))
    return h.hexdigest()
