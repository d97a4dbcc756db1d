"""The union filesystem: read-only lower layers merged under one writable upper layer.

Every operation takes merged-view paths and raises OSError with the errno kernel overlayfs gives. There
is no FUSE in here; the FUSE adapter only translates calls.

How changes are written, and why:

- Every new entry (a created file, a copy-up, a directory, a whiteout) is built in the work directory
  with its final ownership and mode, then renamed into the upper layer. A reader, or a crash, sees it
  whole or not at all, and an entry can replace a whiteout atomically.
- Removing something a lower layer also has leaves a whiteout (a 0/0 character device); nothing is
  left where no lower layer needs hiding. A directory made where a lower one was deleted is opaque.
- Renaming a directory that has lower parts copies up the directory alone and records where its lower
  parts are (a redirect, as kernel overlayfs's ``redirect_dir`` does): constant time, whatever it holds.
  With ``redirect_dir=False`` its whole merged subtree is copied up first instead, for an upper that a
  union without redirects must read (kernel overlayfs without them answers EXDEV, and many programs
  then fail).
- With ``metacopy``, a metadata change of a lower regular file (chown, chmod, times, xattrs; a rename
  or a link) copies up its metadata alone (``metacopy.py``), and its data stays below until the file is
  opened for writing or truncated. A renamed or linked metadata-only copy finds its data through a
  redirect, as a renamed directory does.
- Copy-up keeps the parent directory's timestamps, so copying up changes nothing a user can see.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from .. import syscalls
from . import confined, copyup, forms, metacopy, overridestat, redirect, whiteout, xattr
from .inodes import InodeMap
from .journal import ChangeJournal
from .layer import Layer
from .lookup import Entry, Resolver, join, split
from .origin import Origins
from .overridestat import Override
from .work import WorkDir, remove_tree

INDEX_DIR = "layerfs-index"  # in the work directory: the change index's snapshot and journal


# Flags of an open(2) that only opens: the entry exists by then (create made it, or lookup found it).
_OPENING_ONLY = ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)


def _error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _fill_times(times_ns: tuple[int | None, int | None], current) -> tuple[int, int]:
    """(atime, mtime) in ns with an omitted one (None) taken from ``current()``, an lstat called only then."""
    atime_ns, mtime_ns = times_ns
    if atime_ns is None or mtime_ns is None:
        st = current()
        atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
        mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
    return atime_ns, mtime_ns


def _refuse_marker_name(path: str) -> None:
    """A ``.wh.*`` entry in the upper layer would be read as a whiteout (and hide its namesake), and
    would become one in an exported OCI layer: such names cannot be created through the mount."""
    if whiteout.is_marker_name(split(path)[1]):
        raise _error(errno.EINVAL, path)


class Attributes:
    """What getattr reports: the real lstat, with the merged view's inode number and link count (and
    for a metadata-only copy its data's blocks, as overlayfs shows them; an owner and permission bits
    an override_stat record gives, ``overridestat.py``)."""

    __slots__ = ("st", "ino", "nlink", "blocks", "uid", "gid", "mode")

    def __init__(
        self, st: os.stat_result, ino: int, nlink: int, blocks: int | None = None, shown: Override | None = None
    ) -> None:
        self.st = st
        self.ino = ino
        self.nlink = nlink
        self.blocks = blocks
        self.uid, self.gid = (st.st_uid, st.st_gid) if shown is None else (shown.uid, shown.gid)
        self.mode = st.st_mode if shown is None else stat.S_IFMT(st.st_mode) | shown.mode


class Union:
    """Lower layers ``lowers`` (top first) under ``upper``; without an upper the union is read-only.

    ``work`` is a directory on the upper's filesystem for building entries before they appear.
    ``sync=False`` (overlay's ``volatile``) skips every fsync. ``redirect_dir=False`` renames directories
    with lower parts by copying their trees up; ``metacopy`` makes metadata-only copies (see above).
    The upper's records and whiteouts are written in the forms the work directory's probe allows
    (``forms.py``); ``userxattr`` asks for the user.* records, as overlayfs's option does. Owners and
    modes are shown as the first of the ``override_stat`` xattrs says, where an entry has one.
    """

    def __init__(
        self,
        lowers: list[str],
        upper: str | None = None,
        work: str | None = None,
        *,
        sync: bool = True,
        redirect_dir: bool = True,
        metacopy: bool = False,
        userxattr: bool = False,
        override_stat: tuple[str, ...] = (),
    ) -> None:
        if metacopy and not redirect_dir:
            raise ValueError("metadata-only copies need redirects")
        self.upper = Layer(upper, writable=True) if upper else None
        layers = ([self.upper] if self.upper else []) + [Layer(p, writable=False) for p in lowers]
        self.resolver = Resolver(layers)
        if self.upper and not work:
            raise ValueError("an upper layer needs a work directory")
        self._work: WorkDir  # (only with an upper layer: every change checks for one first, with _writable_upper)
        self.forms = forms.DEFAULT
        if self.upper and work:
            self._work = WorkDir(work)
            self.forms = forms.probe(self._work, userxattr=userxattr)
        self._origins = Origins(self.upper, layers[1:], self.forms) if self.upper else None
        self.inodes = InodeMap(layers, self._origins)
        self.sync = sync
        self._override_stat = override_stat
        self.redirect_dir = redirect_dir
        self._metadata_copy = copyup.METADATA if metacopy else copyup.DATA  # of a lower file whose metadata changes
        self._lock = threading.RLock()
        # open fd -> (merged inode number, whether it is an upper file)
        self._handles: dict[int, tuple[int, bool]] = {}
        self._handles_lock = threading.Lock()
        self.index: ChangeJournal | None = None
        self._copy: copyup.CopyUp  # (only with an upper layer)
        if self.upper and work:
            self._copy = copyup.CopyUp(
                self.resolver, self.upper, self._work, self._origin_records(), self.inodes, sync=sync
            )
            self.index = ChangeJournal(
                self.upper.root,
                os.path.join(work, INDEX_DIR),
                lowers=lowers,
                lower_layers=layers[1:],
                upper_fd=self._writable_upper().fd,
            )

    def descriptors(self) -> list[int]:
        """The descriptors the union holds (layers, work directory): a daemonizing caller keeps them."""
        held = [fd for layer in self.resolver.layers for fd in layer.descriptors()]
        if self.upper:
            held.append(self._work.fd)
        if self.index is not None:
            held.extend(self.index.descriptors())
        return held

    @property
    def readonly(self) -> bool:
        return self.upper is None

    def _note(self, *paths: str) -> None:
        """``paths`` are about to change in the upper, and so are their directories."""
        if self.index is not None:
            self.index.note(*paths, *(split(p)[0] for p in paths))

    def _writable_upper(self) -> Layer:
        if self.upper is None:
            raise _error(errno.EROFS, "/")
        return self.upper

    def _origin_records(self) -> Origins:
        if self._origins is None:
            raise _error(errno.EROFS, "/")
        return self._origins

    # -- reading --------------------------------------------------------------------------------

    def _number(self, entry: Entry) -> int:
        if entry.in_upper:
            return self.inodes.number_of_upper(entry.rel, entry.st.st_dev, entry.st.st_ino)
        return self.inodes.number(entry.st)

    def attributes(self, entry: Entry) -> Attributes:
        st = entry.st
        data = entry.data
        blocks = None if data is None else data.layer.lstat(data.path).st_blocks
        shown = (
            overridestat.read(entry.rel, self._override_stat, dir_fd=entry.layer.fd) if self._override_stat else None
        )
        # overlayfs reports nlink 1 for a directory merged from several layers: its real count is unknown.
        return Attributes(st, self._number(entry), 1 if entry.merged else st.st_nlink, blocks, shown)

    def getattr(self, path: str) -> Attributes:
        return self.attributes(self.resolver.get(path))

    def lookup(self, path: str) -> Entry | None:
        return self.resolver.lookup(path)

    def listdir(self, path: str) -> dict[str, tuple[int, int]]:
        """The merged directory ``path``: name -> (inode number, file type bits)."""
        merged: dict[str, tuple[int, int]] = {}
        impure: bool | None = None  # (the upper's directory; asked once)
        for name, (part, info) in self.resolver.listing(path).items():
            layer, real = part
            if layer.writable and impure is None:
                impure = Origins.is_impure(layer, real)
            if layer.writable and impure:
                # In an "impure" upper directory some entries are copies that show their origin's number.
                number = self.inodes.number_of_upper(Layer.rel(join(real, name)), info.dev, info.ino)
            else:
                number = self.inodes.number_for(info.dev, info.ino)
            merged[name] = (number, info.type_bits)
        return merged

    def readlink(self, path: str) -> str:
        entry = self.resolver.get(path)
        return entry.layer.readlink(entry.real)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.resolver.layers[0].fd)

    def getxattr(self, path: str, name: str) -> bytes:
        entry = self.resolver.get(path)
        if whiteout.is_private_xattr(name):
            raise _error(errno.ENODATA, path)
        return entry.layer.getxattr(entry.real, name)

    def listxattr(self, path: str) -> list[str]:
        entry = self.resolver.get(path)
        return [n for n in entry.layer.listxattr(entry.real) if not whiteout.is_private_xattr(n)]

    def access(self, path: str, mode: int) -> None:
        self.resolver.get(path)
        if mode & os.W_OK and self.readonly:
            raise _error(errno.EROFS, path)

    # -- open files -----------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """Open ``path``; opening for writing (or truncating) copies a lower file up first, and gives a
        metadata-only copy its data. Read, a metadata-only copy opens its data below."""
        entry = self.resolver.get(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._note(path)
        if writing and (not entry.in_upper or entry.chain):
            self._writable_upper()
            with self._lock:
                entry = self._copy.with_data(path, 0 if flags & os.O_TRUNC else None)
        data = entry.data
        if data is None:
            fd = confined.open_beneath(entry.rel, flags & _OPENING_ONLY, dir_fd=entry.layer.fd)
        else:
            fd = confined.open_beneath(Layer.rel(data.path), flags & _OPENING_ONLY, dir_fd=data.layer.fd)
        if writing and stat.S_ISREG(entry.st.st_mode) and entry.st.st_size == 0 and metacopy.is_marked(fd):
            # An empty metadata-only copy (never read as one: there is no data to fetch): unmarked, or
            # overlayfs would go on reading the empty file below, whatever is written to this one.
            metacopy.unmark(fd)
        self._remember(fd, self._number(entry), entry.in_upper and data is None)
        return fd

    def _remember(self, fd: int, number: int, in_upper: bool) -> None:
        with self._handles_lock:
            self._handles[fd] = (number, in_upper)

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> int:
        """Create and open a new regular file owned by ``uid``/``gid``."""
        keep = flags & (os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK | os.O_DIRECT)
        self._note(path)
        with self._lock:
            tmp, uid, gid, mode = self._prepare_new(path, uid, gid, mode, is_dir=False)
            fd = os.open(tmp, keep | os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self._work.fd)
            try:
                self._give_owner(tmp, uid, gid, mode)
                self._install_new(tmp, path)
            except BaseException:
                os.close(fd)
                self._work.discard(tmp)
                raise
        self._remember(fd, self.inodes.number(os.fstat(fd)), True)
        return fd

    def read(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def write(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        return os.lseek(fd, offset, whence)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        syscalls.fallocate(fd, mode, offset, length)

    def drop_setid(self, fd: int) -> None:
        """Clear setuid (and setgid where group-executable) on the open file, as the kernel does when
        someone without CAP_FSETID writes to it."""
        shown = self.fstat(fd)
        mode = shown.mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill and not self._recorded(fd, shown.st, None, stat.S_IMODE(mode) & ~kill):
            os.fchmod(fd, stat.S_IMODE(mode) & ~kill)

    def fstat(self, fd: int) -> Attributes:
        st = os.fstat(fd)
        known = self._handles.get(fd)
        shown = overridestat.read(fd, self._override_stat) if self._override_stat else None
        return Attributes(st, known[0] if known else self.inodes.number(st), st.st_nlink, shown=shown)

    def is_upper_file(self, fd: int) -> bool:
        """Whether ``fd`` is open on a file of the upper layer (else a lower one, never written)."""
        known = self._handles.get(fd)
        return known is not None and known[1]

    def reopen(self, fd: int, flags: int) -> int:
        """Open again the file open at ``fd`` (a file whose last name went, opened again through
        /proc/PID/fd). A lower one is only read: there is no copy of it to write."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY and not self.is_upper_file(fd):
            raise _error(errno.ENOENT, "(a file with no name left)")
        new = os.open(f"/proc/self/fd/{fd}", (flags & _OPENING_ONLY) | os.O_CLOEXEC)
        with self._handles_lock:
            self._handles[new] = self._handles[fd]
        return new

    def reopen_whole(self, fd: int) -> int:
        """A descriptor of the file open at ``fd`` that takes every access the mount's users may make
        through it (read-write for an upper file, read-only for a lower one, never written); ``release``
        it like any other."""
        access = os.O_RDWR if self.is_upper_file(fd) else os.O_RDONLY
        try:
            new = os.open(f"/proc/self/fd/{fd}", access | os.O_CLOEXEC)
        except OSError:  # (an upper file being executed refuses writers)
            new = os.dup(fd)
        with self._handles_lock:
            self._handles[new] = self._handles[fd]
        return new

    def fchange(
        self,
        fd: int,
        *,
        mode: int | None = None,
        owner: tuple[int, int] | None = None,
        times_ns: tuple[int | None, int | None] | None = None,
    ) -> None:
        """chmod, chown or utimens of an open file that has no name left. A lower file is never changed:
        one that was deleted while open read-only has no copy in the upper to change."""
        if mode is None and owner is None and times_ns is None:
            return
        if not self.is_upper_file(fd):
            raise _error(errno.ENOENT, "(a file with no name left)")
        if not self._recorded(fd, os.fstat(fd), owner, mode):
            if owner is not None:
                os.fchown(fd, *owner)
            if mode is not None:
                os.fchmod(fd, stat.S_IMODE(mode))
        if times_ns is not None:
            os.utime(fd, ns=_fill_times(times_ns, lambda: os.fstat(fd)))

    def ftruncate(self, fd: int, length: int) -> None:
        """Truncate an open file. A lower file is never changed: one reached this way has no name left
        (a writable open copies up), so there is no copy to change."""
        if not self.is_upper_file(fd):
            raise _error(errno.ENOENT, "(a file with no name left)")
        os.ftruncate(fd, length)

    def fsync(self, fd: int, datasync: bool) -> None:
        if self.sync:
            (os.fdatasync if datasync else os.fsync)(fd)

    def fsync_dir(self, path: str) -> None:
        """fsync of a directory: its upper copy's entries reach the disk (a lower one never changes)."""
        entry = self.resolver.get(path)
        if self.sync and entry.in_upper:
            fd = confined.open_beneath(entry.rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=entry.layer.fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def release(self, fd: int) -> None:
        with self._handles_lock:
            self._handles.pop(fd, None)
        os.close(fd)  # (after: its number may come back to an open at once, which records it anew)

    def close(self) -> None:
        """Close every open file and the change index's journal (on unmount)."""
        for fd in list(self._handles):
            self.release(fd)
        if self.index is not None:
            self.index.close()
            self.index = None

    # -- changing metadata ----------------------------------------------------------------------

    def _copied_up(self, path: str) -> Entry:
        """``path`` in the upper layer, for a change of its metadata."""
        self._writable_upper()
        self._note(path)
        with self._lock:
            return self._copy.path(path, self._metadata_copy)

    def change(
        self,
        path: str,
        *,
        mode: int | None = None,
        owner: tuple[int, int] | None = None,
        times_ns: tuple[int | None, int | None] | None = None,
    ) -> Attributes:
        """chown, chmod and utimens of ``path`` (None: not that one; -1 in ``owner`` or None in
        ``times_ns``: that id or time left as it is), in setattr's order; returns what it is then."""
        if mode is None and owner is None and times_ns is None:
            return self.getattr(path)
        entry = self._copied_up(path)
        with entry.layer.at(entry.rel) as (dir_fd, name):
            if not self._recorded(name, entry.st, owner, mode, dir_fd=dir_fd):
                if owner is not None:
                    os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
                if mode is not None:
                    os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)
            if times_ns is not None:
                times = _fill_times(times_ns, lambda: os.lstat(name, dir_fd=dir_fd))
                os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)
            entry.st = os.lstat(name, dir_fd=dir_fd)
        return self.attributes(entry)

    def _recorded(
        self,
        target: str | int,
        st: os.stat_result,
        owner: tuple[int, int] | None,
        mode: int | None,
        *,
        dir_fd: int | None = None,
    ) -> bool:
        """With xattr_permissions, a chown or chmod of a directory or regular file of the upper (a name in
        ``dir_fd``, or an open file; ``st`` its lstat) is kept in its override_stat record instead of made, as
        fuse-overlayfs does; whether it was."""
        if not self._override_stat or not overridestat.is_recorded(st.st_mode) or (owner is None and mode is None):
            return False
        now = overridestat.read(target, self._override_stat, dir_fd=dir_fd)
        if now is None:
            now = Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        file_type = stat.S_IFMT(st.st_mode)
        overridestat.write(target, self._override_stat, now.changed(owner, mode, file_type), file_type, dir_fd=dir_fd)
        return True

    def truncate(self, path: str, length: int) -> None:
        self._writable_upper()
        self._note(path)
        with self._lock:
            entry = self._copy.with_data(path, length)
        fd = confined.open_beneath(entry.rel, os.O_WRONLY, dir_fd=entry.layer.fd)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        if whiteout.is_private_xattr(name):
            raise _error(errno.EOPNOTSUPP, path)
        entry = self._copied_up(path)
        with entry.layer.at(entry.rel) as (dir_fd, last):
            xattr.set(last, name, value, flags, dir_fd=dir_fd)

    def removexattr(self, path: str, name: str) -> None:
        if whiteout.is_private_xattr(name):
            raise _error(errno.EOPNOTSUPP, path)
        entry = self.resolver.get(path)
        if name not in entry.layer.listxattr(entry.real):
            raise _error(errno.ENODATA, path)
        entry = self._copied_up(path)
        with entry.layer.at(entry.rel) as (dir_fd, last):
            xattr.remove(last, name, dir_fd=dir_fd)

    # -- creating entries -----------------------------------------------------------------------

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        self._note(path)
        with self._lock:
            tmp, uid, gid, mode = self._prepare_new(path, uid, gid, mode, is_dir=True)
            os.mkdir(tmp, 0o700, dir_fd=self._work.fd)
            self._finish_new(tmp, uid, gid, mode)
            if self._lower_has(path):
                whiteout.mark_opaque(tmp, dir_fd=self._work.fd, xattrs=self.forms.written("opaque"))
            self._install_new(tmp, path)

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
        if stat.S_ISCHR(mode) and rdev == 0:
            # A 0/0 device is a whiteout: overlayfs refuses to create one through the merged view.
            raise _error(errno.EPERM, path)
        self._note(path)
        with self._lock:
            tmp, uid, gid, mode = self._prepare_new(path, uid, gid, mode, is_dir=False)
            os.mknod(tmp, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=self._work.fd)
            self._finish_new(tmp, uid, gid, mode)
            self._install_new(tmp, path)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> None:
        self._note(path)
        with self._lock:
            tmp, uid, gid, _ = self._prepare_new(path, uid, gid, 0o777, is_dir=False)
            os.symlink(target, tmp, dir_fd=self._work.fd)
            self._finish_new(tmp, uid, gid, None)
            self._install_new(tmp, path)

    def link(self, existing: str, path: str) -> None:
        source = self.resolver.get(existing)
        if source.is_dir:
            raise _error(errno.EPERM, existing)
        self._note(existing, path)
        with self._lock:
            self._prepare_new(path, 0, 0, 0, is_dir=False)
            source = self._copy.path(existing, self._metadata_copy)
            if source.chain and not self._lead_to_data(source, existing, None):
                raise _error(errno.EXDEV, existing)  # (as on overlayfs: the copy-up stays)
            tmp = self._work.tmp()
            with source.layer.at(source.rel) as (dir_fd, name):
                os.link(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=self._work.fd, follow_symlinks=False)
            self._install_new(tmp, path)

    def _prepare_new(self, path: str, uid: int, gid: int, mode: int, *, is_dir: bool) -> tuple[str, int, int, int]:
        """Check that ``path`` can be created and copy its parent up; returns a temporary name and the
        owner and mode the entry gets (a setgid parent passes on its group, and to directories its bit)."""
        upper = self._writable_upper()
        _refuse_marker_name(path)
        parent, _ = split(path)
        if self.resolver.lookup(path) is not None:
            raise _error(errno.EEXIST, path)
        self._copy.parents(parent)
        pst = upper.lstat(parent)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if is_dir:
                mode |= stat.S_ISGID
        return self._work.tmp(), uid, gid, mode

    def _finish_new(self, tmp: str, uid: int, gid: int, mode: int | None) -> None:
        try:
            self._give_owner(tmp, uid, gid, mode)
        except BaseException:
            self._work.discard(tmp)
            raise

    def _give_owner(self, tmp: str, uid: int, gid: int, mode: int | None) -> None:
        """The new entry ``tmp`` of the work directory gets its owner and mode (None: a symlink's, left as
        it is); with xattr_permissions a directory or regular file keeps its owner in its record instead."""
        recorded = False
        if self._override_stat and mode is not None:  # (its type looked at only then: creates are hot)
            kind = stat.S_IFMT(os.lstat(tmp, dir_fd=self._work.fd).st_mode)
            if overridestat.is_recorded(kind):
                overridestat.write(
                    tmp, self._override_stat, Override(uid, gid, stat.S_IMODE(mode)), kind, dir_fd=self._work.fd
                )
                recorded = True
        if not recorded:
            os.chown(tmp, uid, gid, dir_fd=self._work.fd, follow_symlinks=False)
        if mode is not None:
            os.chmod(tmp, stat.S_IMODE(mode), dir_fd=self._work.fd)

    def _install_new(self, tmp: str, path: str) -> None:
        """Move the new entry ``tmp`` into place, replacing a whiteout of the upper layer if there is one."""
        try:
            displaced = self._install(self._work.fd, tmp, path)
        except BaseException:
            self._work.discard(tmp)
            raise
        if displaced:
            self._work.discard(tmp)  # what the upper had there (a whiteout) now sits at tmp

    # -- removing and renaming ------------------------------------------------------------------

    def unlink(self, path: str) -> None:
        entry = self.resolver.get(path)
        if entry.is_dir:
            raise _error(errno.EISDIR, path)
        self._writable_upper()
        self._note(path)
        with self._lock:
            self._copy.parents(split(path)[0])
            if self._lower_has(path):
                self._whiteout(path)
            else:
                with entry.layer.at(entry.rel) as (dir_fd, name):
                    os.unlink(name, dir_fd=dir_fd)
            if entry.in_upper and entry.st.st_nlink == 1:
                self.inodes.removed(entry.st)

    def rmdir(self, path: str) -> None:
        if path == "/":
            raise _error(errno.EBUSY, path)
        entry = self.resolver.get(path)
        if not entry.is_dir:
            raise _error(errno.ENOTDIR, path)
        self._writable_upper()
        self._note(path)
        with self._lock:
            if self.listdir(path):
                raise _error(errno.ENOTEMPTY, path)
            self._copy.parents(split(path)[0])
            if self._lower_has(path):
                self._whiteout(path)
            elif entry.in_upper:
                with entry.layer.at(entry.rel) as (dir_fd, name):
                    try:
                        os.rmdir(name, dir_fd=dir_fd)
                    except OSError as e:
                        if e.errno != errno.ENOTEMPTY:
                            raise
                        # Only whiteouts are left inside: take it out of view first, then empty it.
                        tmp = self._work.tmp()
                        os.rename(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=self._work.fd)
                        self._work.discard(tmp)
            if entry.in_upper:
                self.inodes.removed(entry.st)
            self.resolver.invalidate()

    def rename(self, old: str, new: str, *, replace: bool = True) -> None:
        """rename(2); with ``replace`` False, renameat2's RENAME_NOREPLACE (EEXIST if ``new`` exists)."""
        source = self.resolver.get(old)
        target = self.resolver.lookup(new)
        if target is not None and not replace:
            raise _error(errno.EEXIST, new)
        if old == new:
            return
        if source.is_dir and (new + "/").startswith(old + "/"):
            raise _error(errno.EINVAL, new)
        _refuse_marker_name(new)
        if target is not None:
            if source.is_dir and not target.is_dir:
                raise _error(errno.ENOTDIR, new)
            if target.is_dir and not source.is_dir:
                raise _error(errno.EISDIR, new)
            if target.is_dir and self.listdir(new):
                raise _error(errno.ENOTEMPTY, new)
            if source.in_upper and target.in_upper and target.st.st_ino == source.st.st_ino:
                # Two names of one upper file: rename(2) does nothing. Names of a lower hard link are
                # separate files in the merged view (copy-up breaks the link), as on overlayfs.
                return
        upper = self._writable_upper()
        self._note(old, new)
        with self._lock:
            self._copy.parents(split(old)[0])
            self._copy.parents(split(new)[0])
            whole_tree, opaque_at_target = self._prepare_move(old, new, source)
            with upper.at(Layer.rel(old)) as (source_dir, source_name):
                self._mark_impure_for(old, new)
                if not self._rename_leaving_whiteout(old, new):
                    displaced = self._install(source_dir, source_name, new)
                    if self._lower_has(old):
                        self._whiteout(old)
                    elif displaced:
                        remove_tree(source_dir, source_name)
            if whole_tree:
                self._drop_markers_below(Layer.rel(new), keep_opaque=opaque_at_target)
            if target is not None and target.in_upper and (target.is_dir or target.st.st_nlink == 1):
                self.inodes.removed(target.st)  # its number may come back for a new file
            if source.is_dir:
                self.resolver.invalidate()

    def _rename_leaving_whiteout(self, old: str, new: str) -> bool:
        """Rename in the upper layer leaving a whiteout at ``old`` in the same step, when ``old`` needs one
        and the target needs no exchange. False when it was not done."""
        if not self._lower_has(old) or not self.forms.device_whiteouts:
            return False
        upper = self._writable_upper()
        with upper.at(Layer.rel(old)) as (old_dir, old_name), upper.at(Layer.rel(new)) as (new_dir, new_name):
            try:
                syscalls.rename_whiteout(old_name, new_name, a_dir_fd=old_dir, b_dir_fd=new_dir)
            except OSError as e:
                if e.errno in (
                    errno.EINVAL,
                    errno.EPERM,
                    errno.ENOSYS,
                    errno.ENOTDIR,
                    errno.EISDIR,
                    errno.ENOTEMPTY,
                    errno.EEXIST,
                    errno.EOPNOTSUPP,
                ):
                    return False
                raise
            self._drop_oci_whiteout(new_dir, new_name)
        return True

    def exchange(self, a: str, b: str) -> None:
        """renameat2's RENAME_EXCHANGE: the entries at ``a`` and ``b`` (both must exist) swap places.

        As overlayfs does it: both are copied up, then exchanged in the upper layer in one step. Both
        names go on existing, so no whiteout is needed; each side is marked for where it lands as a
        rename would mark it (``_prepare_move``): a directory with lower parts gets a redirect (or, without
        redirects, its tree copied up and an opaque mark where a lower has the name, the markers inside,
        which referred to its old name, gone), a directory of the upper alone turns opaque in a merged
        directory, and a non-directory hides what the lowers have at its new name by itself.
        """
        for path in (a, b):
            if path == "/":
                raise _error(errno.EBUSY, path)
        # The kernel's order: a missing or non-directory parent, then a read-only mount, then the names.
        self.resolver.stack_of(split(a)[0])
        self.resolver.stack_of(split(b)[0])
        upper = self._writable_upper()
        first, second = self.resolver.get(a), self.resolver.get(b)
        if a == b:
            return
        if (b + "/").startswith(a + "/"):
            raise _error(errno.EINVAL, b)
        if (a + "/").startswith(b + "/"):
            raise _error(errno.EINVAL, a)
        if first.in_upper and second.in_upper and first.st.st_ino == second.st.st_ino:
            # Two names of one upper file: one inode, and the kernel does nothing. Names of a lower hard
            # link are separate files in the merged view (copy-up breaks the link): they are exchanged.
            return
        self._note(a, b)
        with self._lock:
            self._copy.parents(split(a)[0])
            self._copy.parents(split(b)[0])
            moves = [(a, b, *self._prepare_move(a, b, first)), (b, a, *self._prepare_move(b, a, second))]
            self._mark_impure_for(a, b)
            self._mark_impure_for(b, a)
            with upper.at(Layer.rel(a)) as (a_dir, a_name), upper.at(Layer.rel(b)) as (b_dir, b_name):
                syscalls.exchange(a_name, b_name, a_dir_fd=a_dir, b_dir_fd=b_dir)
                self._drop_oci_whiteout(a_dir, a_name)
                self._drop_oci_whiteout(b_dir, b_name)
            for _, new, whole_tree, opaque in moves:
                if whole_tree:
                    self._drop_markers_below(Layer.rel(new), keep_opaque=opaque)
            if first.is_dir or second.is_dir:
                self.resolver.invalidate()

    def _prepare_move(self, old: str, new: str, entry: Entry) -> tuple[bool, bool]:
        """Bring ``entry`` (at ``old``, about to move to ``new``) into the upper layer as overlayfs does,
        marked as it must be where it lands. Returns whether its whole tree was copied up, and whether it
        lands opaque.

        - A directory with lower parts is copied up alone and records where they are (a redirect, with
          ``redirect_dir``, the default); without redirects its merged subtree is copied up (kernel
          overlayfs answers EXDEV), and it is opaque where a lower layer has the new name.
        - A directory of the upper alone turns opaque when it lands in a merged directory.
        - A non-directory hides whatever the lowers have at its new name by itself. A regular file is
          copied up as its metadata alone with ``metacopy``, and one that has its data below gets a
          redirect to it.

        The marks go on before the move: at ``old`` they change nothing (a redirect made for ``new``
        names the lower parts it has there too, and an opaque mark is set only on a directory whose
        content is all in the upper).
        """
        upper = self._writable_upper()
        has_lower = entry.is_dir and (not entry.in_upper or entry.merged)
        current = redirect.read(Layer.rel(old), dir_fd=upper.fd) if has_lower and entry.in_upper else None
        target = None
        if has_lower and self.redirect_dir:
            first_lower = next(part.path for part in entry.stack if not part.layer.writable)
            target = self._redirect_target(first_lower, current, old, new)
        whole_tree = has_lower and target is None
        if whole_tree:
            self._copy.tree(old)
            opaque = self._lower_has(new)
        else:
            if not entry.in_upper:
                entry = self._copy.entry(entry, self._metadata_copy)
            if entry.chain and not self._lead_to_data(entry, old, new):
                self._copy.fill(entry, None, keep_times=True)  # (overlayfs answers EXDEV, and mv copies)
            opaque = entry.is_dir and not has_lower and len(self.resolver.stack_of(split(new)[0])) > 1
        if target is not None or opaque:
            with upper.at(Layer.rel(old)) as (dir_fd, name):
                if target is not None and target != current:
                    redirect.write(name, target, dir_fd=dir_fd, forms=self.forms)
                if opaque and not whiteout.is_opaque_dir(name, dir_fd=dir_fd):
                    whiteout.mark_opaque(name, dir_fd=dir_fd, xattrs=self.forms.written("opaque"))
        return whole_tree, opaque

    @staticmethod
    def _redirect_target(first_lower: str, current: str | None, old: str, new: str | None) -> str | None:
        """Where an entry with lower parts (at ``old``, its first lower part at ``first_lower`` in its
        layer, its redirect ``current``) must say they are once at ``new`` (None: from any name, as a
        linked file must): its old name if it stays in its parent, else the absolute path of its first
        lower part; ``current`` is kept where it still leads there. None for an absolute path longer than
        kernel overlayfs takes (it answers EXDEV): the entry's content is copied up instead."""
        same_parent = new is not None and split(old)[0] == split(new)[0]
        if current is not None and (same_parent or current.startswith("/")):
            return current
        if same_parent:
            return split(old)[1]
        return first_lower if len(os.fsencode(first_lower)) <= redirect.MAX_LENGTH else None

    def _lead_to_data(self, entry: Entry, old: str, new: str | None) -> bool:
        """Make the metadata-only copy ``entry`` (at ``old``) find its data once at ``new`` (None: from
        a second name, a link's, wherever it is): a redirect. False where it would be too long."""
        current = redirect.read(entry.rel, dir_fd=self._writable_upper().fd)
        target = self._redirect_target(entry.chain[0].path, current, old, new)
        if target is None:
            return False
        if target != current:
            with self._writable_upper().at(entry.rel) as (dir_fd, name):
                redirect.write(name, target, dir_fd=dir_fd, forms=self.forms)
        return True

    # -- copy-up and upper-layer plumbing -------------------------------------------------------

    def _mark_impure_for(self, old: str, new: str) -> None:
        """The upper entry at ``old`` is about to move to ``new``: if it is a copy that shows its origin's
        number, the directory it moves into is marked as holding such entries (overlayfs does the same)."""
        if self._origin_records().has_record(Layer.rel(old)):
            with self._writable_upper().at(Layer.rel(new)) as (dir_fd, _):
                self._origin_records().mark_impure(".", dir_fd=dir_fd)

    def _drop_markers_below(self, rel: str, *, keep_opaque: bool) -> None:
        """After a subtree was copied up and moved, the whiteouts and opaque marks inside it refer to
        nothing: remove them, so the upper layer reads the same with any overlay implementation."""
        with self._writable_upper().at(rel) as (parent, top):
            if not keep_opaque:
                whiteout.clear_opaque(top, dir_fd=parent)
            for _, dirs, files, dir_fd in os.fwalk(top, dir_fd=parent):
                for name in dirs:
                    # fwalk counts a symlink to a directory among the directories; it has no marks to clear.
                    if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                        whiteout.clear_opaque(name, dir_fd=dir_fd)
                markers = [
                    name
                    for name in files
                    if whiteout.is_marker_name(name) or whiteout.is_whiteout_stat(os.lstat(name, dir_fd=dir_fd))
                ]
                if markers:
                    st = os.fstat(dir_fd)
                    for name in markers:
                        os.unlink(name, dir_fd=dir_fd)
                    # Bookkeeping, not a change the user made: the directory keeps its times.
                    os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _lower_has(self, path: str) -> bool:
        """Whether a lower layer shows something at ``path`` when the upper layer has nothing there."""
        parent, name = split(path)
        lowers = tuple(part for part in self.resolver.stack_of(parent) if not part.layer.writable)
        return bool(lowers) and self.resolver.find_in(lowers, name, path) is not None

    def _install(self, src_dir_fd: int, src: str, path: str) -> bool:
        """Rename ``src`` (relative to ``src_dir_fd``) to ``path`` in the upper layer, replacing what the
        upper has there.

        rename(2) cannot replace a directory holding whiteouts, nor put a directory over a whiteout:
        then the two are exchanged atomically, and True says the old entry is now at ``src`` for the
        caller to dispose of.
        """
        displaced = False
        with self._writable_upper().at(Layer.rel(path)) as (dir_fd, name):
            try:
                os.rename(src, name, src_dir_fd=src_dir_fd, dst_dir_fd=dir_fd)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                syscalls.exchange(src, name, a_dir_fd=src_dir_fd, b_dir_fd=dir_fd)
                displaced = True
            self._drop_oci_whiteout(dir_fd, name)
        return displaced

    @staticmethod
    def _drop_oci_whiteout(dir_fd: int, name: str) -> None:
        try:
            os.unlink(whiteout.oci_whiteout_name(name), dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:  # a name too long to have a ".wh." twin
                raise

    def _whiteout(self, path: str) -> None:
        """Make ``path`` a whiteout in the upper layer, replacing atomically whatever the upper has there
        (the OCI form, where the mount writes no devices, in two steps)."""
        if not self.forms.device_whiteouts:
            with self._writable_upper().at(Layer.rel(path)) as (dir_fd, name):
                remove_tree(dir_fd, name)
                whiteout.make_whiteout(name, dir_fd=dir_fd, device=False)
            return
        tmp = self._work.tmp()
        os.mknod(tmp, stat.S_IFCHR, os.makedev(0, 0), dir_fd=self._work.fd)
        self._install_new(tmp, path)
