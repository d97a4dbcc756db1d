"""What a filesystem served by a ``Session`` implements, and the values it answers with.

Files are named by the kernel's node ids: a lookup (or a create, mkdir, mknod, symlink, link, or an entry
of readdirplus) returns an ``Entry`` whose node id the kernel then uses, and every one of those answers
counts one reference the kernel will give back by ``forget``. The root is node 1. Names are bytes, as
the kernel sends them. Errors are OSErrors with the errno to answer; anything not implemented answers
ENOSYS, which the kernel remembers for several operations (flush, fsyncdir, access...) and stops sending.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from . import abi


class Request:
    """Who asks: the caller's ids and pid as the kernel saw them; ``interrupted`` is set when the caller
    was signalled while the request ran (a long operation may give up with EINTR)."""

    __slots__ = ("unique", "nodeid", "uid", "gid", "pid", "interrupted")

    def __init__(self, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> None:
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.interrupted = False


@dataclass(slots=True)
class Entry:
    nodeid: int
    attr: bytes  # from pack_attr
    generation: int = 0


@dataclass(slots=True)
class Opened:
    fh: int
    flags: int = 0  # FOPEN_* bits
    backing_id: int = 0  # with FOPEN_PASSTHROUGH


@dataclass(slots=True)
class SetAttr:
    """The attributes a SETATTR changes; None leaves one as it is. Times are ns since the epoch."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    kill_suidgid: bool = False  # the caller may not keep setuid/setgid bits (a truncate or chown)


_U64 = (1 << 64) - 1


def pack_attr(
    ino: int, st: os.stat_result, nlink: int, uid: int, gid: int, blocks: int | None = None, mode: int | None = None
) -> bytes:
    """The kernel's ``fuse_attr`` for ``st``, with the inode number, link count, owner (and blocks,
    where they are another file's, and a mode, where it is not the file's own) shown."""
    atime, atime_ns = divmod(st.st_atime_ns, 1_000_000_000)
    mtime, mtime_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    ctime, ctime_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    blocks = st.st_blocks if blocks is None else blocks
    return abi.attr.pack(
        ino,
        st.st_size,
        blocks,
        atime & _U64,
        mtime & _U64,
        ctime & _U64,
        atime_ns,
        mtime_ns,
        ctime_ns,
        st.st_mode if mode is None else mode,
        nlink,
        uid,
        gid,
        st.st_rdev & 0xFFFFFFFF,
        st.st_blksize,
        0,
    )


def _unsupported(*_args, **_kwargs) -> NoReturn:
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


class Operations:
    """Every method answers one request; the defaults answer ENOSYS."""

    def lookup(self, req: Request, parent: int, name: bytes) -> Entry | None:
        """None: no such entry (cached by the kernel as a negative entry)."""
        _unsupported()

    def forget(self, nodes: list[tuple[int, int]]) -> None:
        """(node id, lookups to forget) pairs; the node is gone when its count reaches 0."""

    def getattr(self, req: Request, nodeid: int, fh: int | None) -> bytes:
        _unsupported()

    def setattr(self, req: Request, nodeid: int, fh: int | None, changes: SetAttr) -> bytes:
        _unsupported()

    def readlink(self, req: Request, nodeid: int) -> bytes:
        _unsupported()

    def symlink(self, req: Request, parent: int, name: bytes, target: bytes) -> Entry:
        _unsupported()

    def mknod(self, req: Request, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        _unsupported()

    def mkdir(self, req: Request, parent: int, name: bytes, mode: int) -> Entry:
        _unsupported()

    def unlink(self, req: Request, parent: int, name: bytes) -> None:
        _unsupported()

    def rmdir(self, req: Request, parent: int, name: bytes) -> None:
        _unsupported()

    def rename(self, req: Request, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        _unsupported()

    def link(self, req: Request, nodeid: int, newparent: int, newname: bytes) -> Entry:
        _unsupported()

    def open(self, req: Request, nodeid: int, flags: int, kill_suidgid: bool) -> Opened:
        """``kill_suidgid``: an O_TRUNC open by a caller that may not keep setuid/setgid bits."""
        _unsupported()

    def create(self, req: Request, parent: int, name: bytes, flags: int, mode: int) -> tuple[Entry, Opened]:
        _unsupported()

    def read(self, req: Request, fh: int, offset: int, size: int) -> bytes:
        _unsupported()

    def write(self, req: Request, fh: int, offset: int, data: memoryview, kill_suidgid: bool) -> int:
        """``kill_suidgid``: the caller may not keep the file's setuid/setgid bits."""
        _unsupported()

    def release(self, req: Request, fh: int) -> None:
        pass

    def fsync(self, req: Request, fh: int, datasync: bool) -> None:
        _unsupported()

    def statfs(self, req: Request, nodeid: int) -> os.statvfs_result:
        _unsupported()

    def setxattr(self, req: Request, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        _unsupported()

    def getxattr(self, req: Request, nodeid: int, name: bytes) -> bytes:
        _unsupported()

    def listxattr(self, req: Request, nodeid: int) -> list[bytes]:
        _unsupported()

    def removexattr(self, req: Request, nodeid: int, name: bytes) -> None:
        _unsupported()

    def opendir(self, req: Request, nodeid: int, flags: int) -> Opened:
        _unsupported()

    def readdir(self, req: Request, nodeid: int, fh: int, offset: int) -> Iterable[tuple[bytes, int, int, int]]:
        """(name, inode number, DT_* type, offset of the next entry) from ``offset`` on."""
        _unsupported()

    def releasedir(self, req: Request, fh: int) -> None:
        pass

    def fsyncdir(self, req: Request, nodeid: int, datasync: bool) -> None:
        _unsupported()

    def lseek(self, req: Request, fh: int, offset: int, whence: int) -> int:
        _unsupported()

    def fallocate(self, req: Request, fh: int, offset: int, length: int, mode: int) -> None:
        _unsupported()

    def destroy(self) -> None:
        """The session ended (unmounted or aborted)."""
