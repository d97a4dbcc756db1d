"""System calls Python's os module lacks, in one place: renameat2 exchange, FICLONE, umount2."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
MNT_DETACH = 2

_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int

_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _raise_errno(path: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


def _rename2(a: str, b: str, flags: int, a_dir_fd: int, b_dir_fd: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", a)
    if _renameat2(a_dir_fd, os.fsencode(a), b_dir_fd, os.fsencode(b), flags) != 0:
        _raise_errno(a)


def exchange(a: str, b: str, *, a_dir_fd: int = AT_FDCWD, b_dir_fd: int = AT_FDCWD) -> None:
    """Atomically swap the entries at ``a`` and ``b`` (renameat2 RENAME_EXCHANGE); both must exist."""
    _rename2(a, b, RENAME_EXCHANGE, a_dir_fd, b_dir_fd)


def rename_whiteout(a: str, b: str, *, a_dir_fd: int = AT_FDCWD, b_dir_fd: int = AT_FDCWD) -> None:
    """Rename ``a`` to ``b`` and leave an overlay whiteout at ``a`` in the same step (needs CAP_MKNOD)."""
    _rename2(a, b, RENAME_WHITEOUT, a_dir_fd, b_dir_fd)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Share the data extents of ``src_fd`` with ``dst_fd`` (reflink). False where the filesystem can't."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF):
            return False
        raise


def umount(path: str, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
        _raise_errno(path)
