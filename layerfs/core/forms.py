"""The forms one upper layer's markers are written in, chosen once per mount by a probe of the work directory.

Overlay's records (opaque, redirect, origin, impure, metacopy) go under ``trusted.overlay.*``, where kernel
overlayfs reads them by default, or under ``user.overlay.*``, where it reads them with ``-o userxattr``:
asked for with ``userxattr``, or taken where ``trusted.*`` is refused (a daemon in a user namespace gets
EPERM). Whiteouts are 0/0 character devices, or OCI ``.wh.NAME`` files where mknod is refused (a plain
user outside a namespace). A copy-up's origin is the lower's file handle, or empty where handles cannot be
opened (no CAP_DAC_READ_SEARCH, as in a user namespace: kernel overlayfs then records an empty origin,
"a copy, of something it cannot find"). Every record of a mount is written in one form, the one kernel overlayfs
mounted the same way reads; every form is read whatever a mount writes (``whiteout.py``, ``xattr.py``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .. import syscalls
from .work import WorkDir

TRUSTED = "trusted.overlay."
USER = "user.overlay."


@dataclass(frozen=True)
class Forms:
    user_xattrs: bool = False  # user.overlay.* (overlayfs's userxattr), not trusted.overlay.*
    device_whiteouts: bool = True  # 0/0 character devices, not .wh. files
    origin_handles: bool = True  # origins hold the lower's file handle, not nothing

    def written(self, record: str) -> tuple[str, ...]:
        """The xattr name the record (``opaque``, ``redirect``...) is written under, as ``xattr.set_first``
        takes names."""
        return ((USER if self.user_xattrs else TRUSTED) + record,)


DEFAULT = Forms()  # kernel overlayfs's, by root


def probe(work: WorkDir, *, userxattr: bool = False) -> Forms:
    """The forms the daemon may write in the work directory (and so in the upper, on the same filesystem);
    ``userxattr`` asks for the user.* records whatever it may."""
    return Forms(
        user_xattrs=userxattr or not _may_set_trusted(work),
        device_whiteouts=_may_mknod(work),
        origin_handles=_may_open_handles(work),
    )


def _allowed(attempt: Callable[[], object], refusals: tuple[int, ...]) -> bool:
    """Whether ``attempt()`` succeeds; False where it fails with one of ``refusals``."""
    try:
        attempt()
        return True
    except OSError as e:
        if e.errno in refusals:
            return False
        raise


def _may_set_trusted(work: WorkDir) -> bool:
    name = work.tmp()
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=work.fd)
    try:
        return _allowed(lambda: os.setxattr(fd, TRUSTED + "probe", b"y"), (errno.EPERM, errno.EACCES, errno.ENOTSUP))
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=work.fd)


def _may_mknod(work: WorkDir) -> bool:
    name = work.tmp()
    made = _allowed(lambda: os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=work.fd), (errno.EPERM,))
    if made:
        os.unlink(name, dir_fd=work.fd)
    return made


def _may_open_handles(work: WorkDir) -> bool:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work.fd)
    try:
        return _allowed(
            lambda: os.close(syscalls.open_by_handle(fd, *syscalls.file_handle("", dir_fd=fd), os.O_PATH)),
            (errno.EPERM, errno.ENOTSUP),
        )
    finally:
        os.close(fd)
