"""The union served over FUSE: the kernel's requests by node id turned into the core Union's calls.

- One kernel inode per file (``nodes.py``): hard links share the page cache and attributes, so a change
  through one name is seen through every other at once, with nothing to invalidate.
- File data is passed through where the kernel grants it (root, ``FUSE_PASSTHROUGH``): each node's open
  files share one backing file registered with the kernel, and reads and writes never reach the daemon.
  The kernel wants every open file of a node to use the same backing; a writable open that copies up a
  file that is still open on its lower copy therefore gets ESTALE after the copy-up, having retired the
  node: the kernel looks the name up again (open(2) retries a stale answer once, revalidating), finds the
  copy, a new node, and opens that. The old opens keep reading the lower file, as ``O_RDONLY``
  descriptors opened before a copy-up do on overlayfs without ``metacopy``.
- Without passthrough (and for small files opened read-only, see _PASSTHROUGH_MIN_READ), file pages
  stay cached across opens (``FOPEN_KEEP_CACHE``): every change to a file's data goes through its one
  kernel inode, except writes passed through, after which the next such open drops the cached pages.
- Directory listings are cached by the kernel across opens (``FOPEN_CACHE_DIR``): lowers never change,
  and the kernel drops a directory's cached listing itself when an entry is made, removed or renamed
  through the mount.
- Owners are shown through the mount's id mapping and stored through it (``core.idmap``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator

from ..core import copyup
from ..core.idmap import AS_STORED, Owners
from ..core.union import Attributes, Union
from ..fuse import Config, Entry, Opened, Operations, Request, Session, SetAttr, abi, pack_attr
from .nodes import NameLock, Node, Nodes

log = logging.getLogger("layerfs")

# A file opened read-only and smaller than this is read through the daemon with its pages cached across
# opens: a passthrough read makes the kernel drop the file's access time, so that the next stat of it
# costs a GETATTR, and a backing registered for a small file costs more than reading it.
_PASSTHROUGH_MIN_READ = 64 << 10
_RENAME_NOREPLACE = 1 << 0
_RENAME_EXCHANGE = 1 << 1
_NO_ID = 0xFFFFFFFF  # (uid_t)-1
_DT_DIR = stat.S_IFDIR >> 12
# The daemon's own descriptors take no O_DIRECT: the data it moves sits at any offset of its buffers,
# and the kernel has bypassed the page cache for such a caller already.
_DAEMON_FLAGS = ~os.O_DIRECT
_FILE_TIMES_CLOCK = 5  # CLOCK_REALTIME_COARSE, which the kernel stamps files with (Python has no name for it)


class _File:
    __slots__ = ("fd", "node")

    def __init__(self, fd: int, node: Node) -> None:
        self.fd = fd
        self.node = node


def _key(a: Attributes) -> int:
    """What finds a file's node again: its merged inode number, and its type, so that a number a new
    entry reuses can never give the kernel an inode whose type changed (it would call it bad: EIO)."""
    return a.ino << 4 | stat.S_IFMT(a.st.st_mode) >> 12


def _type_of(key) -> int:
    """The file type (S_IFMT >> 12) a node's key records (a name key: (parent, name, type))."""
    return key[2] if isinstance(key, tuple) else key & 0xF


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _refuse_dot_names(name: str) -> None:
    if name in (".", ".."):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)


def _interruptible(method):
    """A request that may copy data up: a signal to its caller stops the copy (EINTR, nothing left)."""

    @functools.wraps(method)
    def wrapper(self, req: Request, *args):
        token = copyup.CANCELLED.set(lambda: req.interrupted)
        try:
            return method(self, req, *args)
        finally:
            copyup.CANCELLED.reset(token)

    return wrapper


def _sharing_names(method):
    """A request that names files by path (see NameLock)."""

    @functools.wraps(method)
    def wrapper(self, *args):
        self._names.acquire_shared()
        try:
            return method(self, *args)
        finally:
            self._names.release_shared()

    return wrapper


def _changing_names(method):
    """A request that moves or removes names: the union's change and the node table's are one step."""

    @functools.wraps(method)
    def wrapper(self, *args):
        self._names.acquire()
        try:
            return method(self, *args)
        finally:
            self._names.release()

    return wrapper


class UnionOperations(Operations):
    def __init__(self, union: Union, owners: Owners = AS_STORED, static_nlink: bool = False) -> None:
        self.union = union
        self.nodes = Nodes(_key(union.getattr("/")))
        self._names = NameLock()
        self._owners = None if owners.identity else owners  # None: shown as stored, the common case
        self._static_nlink = static_nlink
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, list[tuple[bytes, int, int]] | None] = {}
        self._dir_numbers = iter(range(1, 1 << 62))
        self._io_lock = threading.Lock()  # a node's open-file state, and backing ids
        self._session: Session | None = None
        self._passthrough = False

    def attach(self, session: Session) -> None:
        """Called once INIT is answered: what the kernel granted decides how files are opened."""
        self._session = session
        self._passthrough = session.passthrough

    @property
    def session(self) -> Session:
        """The session serving this filesystem (requests come only once it is attached)."""
        if self._session is None:
            raise RuntimeError("no session attached yet")
        return self._session

    # -- what is shown ----------------------------------------------------------------------------

    def _attr(self, a: Attributes) -> bytes:
        uid, gid, nlink = a.uid, a.gid, a.nlink
        if self._owners is not None:
            uid, gid = self._owners.uid.shown(uid), self._owners.gid.shown(gid)
        if self._static_nlink and stat.S_ISDIR(a.mode):
            nlink = 1
        return pack_attr(a.ino, a.st, nlink, uid, gid, a.blocks, a.mode)

    def _caller(self, req: Request) -> tuple[int, int]:
        """The caller's uid and gid as the layers store them."""
        if self._owners is None:
            return req.uid, req.gid
        return self._owners.uid.stored(req.uid), self._owners.gid.stored(req.gid)

    def _entry(self, parent: Node, name: str, path: str) -> Entry | None:
        entry = self.union.lookup(path)
        if entry is None:
            return None
        a = self.union.attributes(entry)
        # A lower file with several links: each name becomes a file of its own on copy-up (overlayfs
        # without index), so each name is a node of its own.
        shared = entry.in_upper or entry.is_dir or entry.st.st_nlink == 1
        node = self.nodes.found(parent, name, _key(a) if shared else (parent.nodeid, name, _key(a) & 0xF))
        return Entry(node.nodeid, self._attr(a))

    def _made(self, parent: Node, name: str, path: str) -> Entry:
        entry = self._entry(parent, name, path)
        if entry is None:  # removed again by someone else in between
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return entry

    @contextlib.contextmanager
    def _fd_of(self, node: Node, fh: int | None, *, usable: bool = False) -> Iterator[int]:
        """A descriptor open on ``node``'s file (a file with no name left): the request's own, else any,
        held open meanwhile (a release of another open could close it, and an open reuse its number).
        ``usable``: one that takes fchmod and ftruncate (a held one may be O_PATH or read-only)."""
        if fh is not None and fh in self._files and not usable:
            yield self._files[fh].fd  # the kernel releases no file while a request uses it
            return
        with self._io_lock:
            fds = [file.fd for file in self._files.values() if file.node is node]
            if node.keeper >= 0:
                fds.append(node.keeper)
            if not fds:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), "(a file with no name left)")
            if not usable:
                yield fds[0]
                return
            fd = self.union.reopen_whole(fds[0])
        try:
            yield fd
        finally:
            self.union.release(fd)

    # -- lookups and attributes ---------------------------------------------------------------------

    @_sharing_names
    def lookup(self, req: Request, parent: int, name: bytes) -> Entry | None:
        pnode = self.nodes[parent]
        text = _name(name)
        return self._entry(pnode, text, self.nodes.child_path(pnode, text))

    def forget(self, nodes: list[tuple[int, int]]) -> None:
        for nodeid, count in nodes:
            gone = self.nodes.forget(nodeid, count)
            if gone is not None and (gone.keeper >= 0 or gone.backing):
                with self._io_lock:
                    self._drop_backing(gone)
                    if gone.keeper >= 0:
                        self.union.release(gone.keeper)
                        gone.keeper = -1

    @_sharing_names
    def getattr(self, req: Request, nodeid: int, fh: int | None) -> bytes:
        node = self.nodes[nodeid]
        try:
            a = self.union.getattr(self.nodes.path(node))
            # Another type under its name: an unlink and a create raced this request (the node table is
            # told of an unlink just after it). The kernel would call its inode bad.
            if _type_of(node.key) == stat.S_IFMT(a.st.st_mode) >> 12:
                return self._attr(a)
        except FileNotFoundError:
            pass  # a file with no name left (or not yet known to have none): its descriptors answer
        with self._fd_of(node, fh) as fd:
            a = self.union.fstat(fd)
            if not self.union.is_upper_file(fd):
                a.nlink = 0  # a lower file lives on in its layer, but has no name left here
        return self._attr(a)

    @_sharing_names
    @_interruptible
    def setattr(self, req: Request, nodeid: int, fh: int | None, changes: SetAttr) -> bytes:
        node = self.nodes[nodeid]
        owner: tuple[int, int] | None = None
        if changes.uid is not None or changes.gid is not None:
            uid, gid = (-1 if i is None or i == _NO_ID else i for i in (changes.uid, changes.gid))
            if self._owners is not None:
                uid = -1 if uid == -1 else self._owners.uid.stored(uid)
                gid = -1 if gid == -1 else self._owners.gid.stored(gid)
            owner = (uid, gid)
        times = None
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            times = (changes.atime_ns, changes.mtime_ns)
        if not node.named:  # open, but unlinked: only its descriptors reach it
            with self._fd_of(node, fh, usable=True) as fd:
                if changes.size is not None:
                    self.union.ftruncate(fd, changes.size)
                    if changes.kill_suidgid:
                        self.union.drop_setid(fd)
                self.union.fchange(fd, mode=changes.mode, owner=owner, times_ns=times)
                return self._attr(self.union.fstat(fd))
        path = self.nodes.path(node)
        if changes.size is not None:
            if fh is not None and fh in self._files:
                self.union.ftruncate(self._files[fh].fd, changes.size)
            else:
                self.union.truncate(path, changes.size)
            if changes.kill_suidgid:
                self._kill_setid(path)
        # (A chown clears setuid and setgid itself: the upper layer's filesystem does it.)
        a = self.union.change(path, mode=changes.mode, owner=owner, times_ns=times)
        self._copied_up(node, a)
        return self._attr(a)

    def _copied_up(self, node: Node, a: Attributes) -> None:
        """``node``'s file was just changed, so copied up if it was a lower one (``a``: what it is now). A
        lower file with several links becomes a file of its own: another number and one link, which the
        kernel must learn (no reply to an xattr change carries attributes)."""
        if isinstance(node.key, tuple):
            self.nodes.rekey(node, _key(a))
            self.session.invalidate_inode(node.nodeid)

    def _maybe_copied_up(self, node: Node, path: str) -> None:
        """``_copied_up`` after a change that may have failed once the file was copied up."""
        if isinstance(node.key, tuple):
            with contextlib.suppress(OSError):
                self._copied_up(node, self.union.getattr(path))

    def _kill_setid(self, path: str) -> None:
        """A truncate by a caller without CAP_FSETID clears setuid, and setgid where group-executable
        (with HANDLE_KILLPRIV_V2 the kernel leaves that to the server)."""
        mode = self.union.getattr(path).st.st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            self.union.change(path, mode=stat.S_IMODE(mode) & ~kill)

    @_sharing_names
    def readlink(self, req: Request, nodeid: int) -> bytes:
        return os.fsencode(self.union.readlink(self.nodes.path(self.nodes[nodeid])))

    def statfs(self, req: Request, nodeid: int) -> os.statvfs_result:
        return self.union.statvfs()

    # -- making and removing entries ------------------------------------------------------------

    @_sharing_names
    def mkdir(self, req: Request, parent: int, name: bytes, mode: int) -> Entry:
        pnode, text, path = self._child(parent, name)
        self.union.mkdir(path, mode, *self._caller(req))
        return self._made(pnode, text, path)

    @_sharing_names
    def mknod(self, req: Request, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        pnode, text, path = self._child(parent, name)
        self.union.mknod(path, mode, rdev, *self._caller(req))
        return self._made(pnode, text, path)

    @_sharing_names
    def symlink(self, req: Request, parent: int, name: bytes, target: bytes) -> Entry:
        pnode, text, path = self._child(parent, name)
        self.union.symlink(os.fsdecode(target), path, *self._caller(req))
        return self._made(pnode, text, path)

    @_sharing_names
    @_interruptible
    def link(self, req: Request, nodeid: int, newparent: int, newname: bytes) -> Entry:
        node = self.nodes[nodeid]
        pnode, text, path = self._child(newparent, newname)
        existing = self.nodes.path(node)
        try:
            self.union.link(existing, path)
        except OSError:
            self._maybe_copied_up(node, existing)  # (EXDEV after a metadata-only copy-up, as on overlayfs)
            raise
        # A lower file was copied up to take the link: its node is now found by the copy's number.
        self.nodes.rekey(node, _key(self.union.getattr(path)))
        return self._made(pnode, text, path)

    def _child(self, parent: int, name: bytes) -> tuple[Node, str, str]:
        pnode = self.nodes[parent]
        text = _name(name)
        _refuse_dot_names(text)
        return pnode, text, self.nodes.child_path(pnode, text)

    @_changing_names
    def unlink(self, req: Request, parent: int, name: bytes) -> None:
        pnode, text, path = self._child(parent, name)
        shown = self.union.getattr(path)
        last = shown.nlink <= 1
        if last:
            self._keep(pnode, text, path, shown.st.st_mode)
        self.union.unlink(path)
        self.nodes.removed(pnode, text, last=last)

    def _keep(self, parent: Node, name: str, path: str, mode: int) -> None:
        """``path`` (of file type ``mode``) is about to lose its file for good: if the kernel knows its
        node, hold the file for it (see Node.keeper): its open files may all be closed before the node
        is forgotten."""
        node = self.nodes.child(parent, name)
        if node is not None and node.keeper < 0 and not stat.S_ISDIR(mode):
            node.keeper = self.union.open(path, os.O_PATH)

    @_changing_names
    def rmdir(self, req: Request, parent: int, name: bytes) -> None:
        pnode, text, path = self._child(parent, name)
        self.union.rmdir(path)
        self.nodes.removed(pnode, text, last=True)

    @_changing_names
    @_interruptible
    def rename(self, req: Request, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        pnode, text, old = self._child(parent, name)
        newpnode, newtext, new = self._child(newparent, newname)
        if flags & _RENAME_EXCHANGE:
            if flags & ~_RENAME_EXCHANGE:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), new)
            sides = [(self.union.lookup(old), newpnode, newtext), (self.union.lookup(new), pnode, text)]
            self.union.exchange(old, new)
            self.nodes.exchanged(pnode, text, newpnode, newtext)
            for entry, parent_node, landed in sides:
                if entry is not None and entry.is_dir and (not entry.in_upper or entry.merged):
                    self._copied_below(parent_node, landed)
            return
        if flags & ~_RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), new)  # RENAME_WHITEOUT: not through a union
        source, target = self.union.lookup(old), self.union.lookup(new)
        replaced_last = target is None or target.is_dir or self.union.attributes(target).nlink <= 1
        if target is not None and replaced_last and old != new:
            self._keep(newpnode, newtext, new, target.st.st_mode)
        self.union.rename(old, new, replace=not flags & _RENAME_NOREPLACE)
        self.nodes.renamed(pnode, text, newpnode, newtext, replaced_last=replaced_last)
        if source is not None and source.is_dir and (not source.in_upper or source.merged):
            self._copied_below(newpnode, newtext)

    def _copied_below(self, parent: Node, name: str) -> None:
        """The directory ``name`` was copied up with all it holds (a rename of a directory with lower
        parts): files that had several links in a lower layer are files of their own now, with other
        numbers and link counts than the kernel has cached."""
        moved = self.nodes.child(parent, name)
        if moved is not None:
            for node in self.nodes.below(moved):
                self.session.invalidate_inode(node.nodeid)

    # -- open files ----------------------------------------------------------------------------------

    @_sharing_names
    @_interruptible
    def open(self, req: Request, nodeid: int, flags: int, kill_suidgid: bool) -> Opened:
        node = self.nodes[nodeid]
        flags &= _DAEMON_FLAGS
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        # (the clock file times are taken from: a change made by this open shows a ctime not before it)
        started = time.clock_gettime_ns(_FILE_TIMES_CLOCK) if writable else 0
        try:
            fd = self.union.open(self.nodes.path(node), flags)
        except FileNotFoundError:
            # Its name went after the kernel looked it up (an unlink may not have reached the node
            # table yet), or it is reopened through /proc/PID/fd.
            with self._fd_of(node, None) as held:
                fd = self.union.reopen(held, flags)
        try:
            if kill_suidgid:
                self.union.drop_setid(fd)
            if writable:
                a = self.union.fstat(fd)
                if isinstance(node.key, tuple):
                    self._copied_up(node, a)  # (which drops the attributes the kernel holds too)
                elif a.st.st_ctime_ns >= started:
                    # Copied up, or its data copied in from below (a new mtime, as on overlayfs): the
                    # attributes the kernel holds are out of date.
                    self.session.invalidate_inode(node.nodeid)
            return self._opened(node, fd, writable, passthrough=self._may_pass_through(req, flags, fd))
        except BaseException:
            self.union.release(fd)
            raise

    @_sharing_names
    def create(self, req: Request, parent: int, name: bytes, flags: int, mode: int) -> tuple[Entry, Opened]:
        pnode, text, path = self._child(parent, name)
        fd = self.union.create(path, flags & _DAEMON_FLAGS, mode, *self._caller(req))
        try:
            a = self.union.fstat(fd)
            node = self.nodes.found(pnode, text, _key(a))
            return Entry(node.nodeid, self._attr(a)), self._opened(
                node, fd, True, passthrough=self._may_pass_through(req, flags, fd)
            )
        except BaseException:
            self.union.release(fd)
            raise

    def _may_pass_through(self, req: Request, flags: int, fd: int) -> bool:
        """A write by a caller without CAP_FSETID must clear setuid/setgid: the kernel says so in each
        WRITE request, but a write passed through never comes here. Such files are served by the daemon."""
        if flags & os.O_ACCMODE == os.O_RDONLY or req.uid == 0:
            return True
        mode = self.union.fstat(fd).st.st_mode
        return not (mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP))

    def _opened(self, node: Node, fd: int, writable: bool, *, passthrough: bool = True) -> Opened:
        st = os.fstat(fd)  # (the real file: what the backing and the node's open files are keyed by)
        key = (st.st_dev, st.st_ino)
        with self._io_lock:
            if node.io_count and node.io_key != key:
                # A copy-up gave the name a new file while this node's open files hold the old one; the
                # kernel lets one node's opens share one backing only. See the module's docstring.
                self.nodes.retire(node)
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            if not node.io_count:
                if node.io_key != key or (writable and not node.backing_writable):
                    self._drop_backing(node)  # registered for the lower copy, or read-only
                    node.io_key = key
                passthrough = (
                    passthrough
                    and self._passthrough
                    and stat.S_ISREG(st.st_mode)
                    and (writable or st.st_size >= _PASSTHROUGH_MIN_READ)
                )
                if passthrough and not node.backing:
                    node.backing, node.backing_writable = self._backing(fd)
                node.passing = passthrough and node.backing != 0
            elif node.passing and not passthrough:
                self.union.drop_setid(fd)  # it must share the others' backing: clear them now, not on write
            node.io_count += 1
            self._files[fd] = _File(fd, node)
            if node.passing:
                node.pages_stale = node.pages_stale or writable
                return Opened(fd, abi.FOPEN_PASSTHROUGH, node.backing)
            # Pages the kernel cached before a write passed through them are dropped at this open.
            keep, node.pages_stale = not node.pages_stale, False
        return Opened(fd, abi.FOPEN_KEEP_CACHE if keep else 0)

    def _backing(self, fd: int) -> tuple[int, bool]:
        """A passthrough backing id for the file open at ``fd`` (0 where the kernel refuses one), and
        whether it takes writes. It serves every open of the node, writable ones included: an upper file
        is registered opened for writing. It is kept when the node's last open file closes (registering
        one costs about as much as the rest of an open), until the kernel forgets the node."""
        backing_fd = self.union.reopen_whole(fd)
        try:
            writable = fcntl.fcntl(backing_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            return self.session.open_backing(backing_fd), writable
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning(
                    "passthrough refused by the kernel (%s): file data goes through the daemon", os.strerror(e.errno)
                )
                self._passthrough = False
            return 0, False  # (ELOOP: a layer stacked too deep for this file; it is served by the daemon)
        finally:
            self.union.release(backing_fd)

    def _drop_backing(self, node: Node) -> None:
        if node.backing:
            self.session.close_backing(node.backing)
            node.backing = 0

    def release(self, req: Request | None, fh: int) -> None:
        with self._io_lock:
            file = self._files.pop(fh, None)
            if file is None:
                return
            node = file.node
            node.io_count -= 1
            if node.io_count == 0:
                node.passing = False
        self.union.release(file.fd)

    def read(self, req: Request, fh: int, offset: int, size: int) -> bytes:
        return self.union.read(self._files[fh].fd, size, offset)

    def write(self, req: Request, fh: int, offset: int, data: memoryview, kill_suidgid: bool) -> int:
        fd = self._files[fh].fd
        if kill_suidgid:
            self.union.drop_setid(fd)
        return self.union.write(fd, data, offset)

    def fsync(self, req: Request, fh: int, datasync: bool) -> None:
        self.union.fsync(self._files[fh].fd, datasync)

    def lseek(self, req: Request, fh: int, offset: int, whence: int) -> int:
        return self.union.lseek(self._files[fh].fd, offset, whence)

    def fallocate(self, req: Request, fh: int, offset: int, length: int, mode: int) -> None:
        self.union.fallocate(self._files[fh].fd, mode, offset, length)

    # -- directories ---------------------------------------------------------------------------------

    def opendir(self, req: Request, nodeid: int, flags: int) -> Opened:
        self.nodes[nodeid]
        fh = next(self._dir_numbers)
        self._dirs[fh] = None  # listed at the first read
        return Opened(fh, abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE)

    @_sharing_names
    def readdir(self, req: Request, nodeid: int, fh: int, offset: int) -> Iterator[tuple[bytes, int, int, int]]:
        listing = self._dirs.get(fh)
        if listing is None or offset == 0:
            node = self.nodes[nodeid]
            path = self.nodes.path(node)
            ino = self.union.getattr(path).ino
            listing = [(b".", ino, _DT_DIR), (b"..", ino, _DT_DIR)]
            listing.extend(
                (os.fsencode(name), number, bits >> 12) for name, (number, bits) in self.union.listdir(path).items()
            )
            self._dirs[fh] = listing
        # Taken now, under the lock: the caller looks entries up as it goes (readdirplus).
        return ((name, ino, kind, index + 1) for index, (name, ino, kind) in enumerate(listing[offset:], offset))

    def releasedir(self, req: Request, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_sharing_names
    def fsyncdir(self, req: Request, nodeid: int, datasync: bool) -> None:
        self.union.fsync_dir(self.nodes.path(self.nodes[nodeid]))

    # -- extended attributes -------------------------------------------------------------------------

    @_sharing_names
    def getxattr(self, req: Request, nodeid: int, name: bytes) -> bytes:
        return self.union.getxattr(self.nodes.path(self.nodes[nodeid]), _name(name))

    @_sharing_names
    def listxattr(self, req: Request, nodeid: int) -> list[bytes]:
        names = self.union.listxattr(self.nodes.path(self.nodes[nodeid]))
        if req.uid != 0:
            # The daemon reads as root; the filesystem below would not list trusted.* to anyone else.
            names = [n for n in names if not n.startswith("trusted.")]
        return [os.fsencode(n) for n in names]

    @_sharing_names
    @_interruptible
    def setxattr(self, req: Request, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        node = self.nodes[nodeid]
        path = self.nodes.path(node)
        try:
            self.union.setxattr(path, _name(name), value, flags)
        finally:  # (an XATTR_REPLACE of a missing name fails after the copy-up, as on overlayfs)
            self._maybe_copied_up(node, path)

    @_sharing_names
    @_interruptible
    def removexattr(self, req: Request, nodeid: int, name: bytes) -> None:
        node = self.nodes[nodeid]
        path = self.nodes.path(node)
        try:
            self.union.removexattr(path, _name(name))
        finally:
            self._maybe_copied_up(node, path)

    def summary(self) -> dict:
        """What the daemon holds, for ``layerfs stats``."""
        return {"nodes": len(self.nodes), "open files": len(self._files), "passthrough": self._passthrough}

    def destroy(self) -> None:
        for fh in list(self._files):
            self.release(None, fh)
        self.union.close()


def serve(
    union: Union,
    mountpoint: str,
    config: Config,
    *,
    on_ready=None,
    owners: Owners = AS_STORED,
    static_nlink: bool = False,
) -> Session:
    """Mount ``union`` at ``mountpoint`` and serve it until it is unmounted (blocks); ``on_ready`` gets the
    session once the kernel has initialised it. Returns the ended session."""
    operations = UnionOperations(union, owners, static_nlink)
    session = Session(operations, mountpoint, config)
    session.mount()

    def ready() -> None:
        operations.attach(session)
        if on_ready is not None:
            on_ready(session)

    session.run(on_ready=ready)
    return session
