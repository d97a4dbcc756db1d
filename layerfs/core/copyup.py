"""Copy-up: an entry of a lower layer copied, metadata and all, into a private temporary path, and a
union's copy-up (``CopyUp``) built on it.

The copy is renamed into the upper layer, so it appears there whole or not at all: a crash mid copy-up
leaves only a stray temporary in the work directory, which the next mount cleans.
Data is copied by the cheapest means the kernel offers: a reflink (FICLONE) shares the extents when
both sides are on a filesystem that can, else copy_file_range copies inside the kernel.

A regular file is copied whole (``DATA``), empty (``EMPTY``: a copy-up about to truncate), or as its
metadata alone (``METADATA``: overlayfs's metacopy, ``metacopy.py``) where its data can stay below.

A copy can be given up halfway (``CANCELLED``): the caller whose request it serves was interrupted by
a signal, and a copy of gigabytes should not keep it waiting. It raises InterruptedError (EINTR), and
the temporary copy goes like any failed one.
"""

from __future__ import annotations

import contextvars
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .. import syscalls
from . import confined, metacopy, whiteout, xattr
from .forms import DEFAULT, Forms
from .inodes import InodeMap
from .layer import Layer
from .lookup import Entry, Part, Resolver, join, split
from .origin import Origins
from .work import WorkDir

# Set, for the thread serving a request, to what tells whether its caller gave up.
CANCELLED: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("cancelled", default=None)
DATA, EMPTY, METADATA = "data", "empty", "metadata"  # what a copy of a regular file holds
_CAPABILITY = "security.capability"
_CHUNK = 1 << 30
_CANCELLABLE_CHUNK = 64 << 20  # between two looks at CANCELLED: about 50 ms of copying here


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes from the start of ``src_fd`` to ``dst_fd``."""
    if size == 0 or syscalls.clone_file(src_fd, dst_fd):
        return
    cancelled = CANCELLED.get()
    chunk = _CHUNK if cancelled is None else _CANCELLABLE_CHUNK
    offset = 0
    try:
        while offset < size:
            if cancelled is not None and cancelled():
                raise InterruptedError(errno.EINTR, "copy-up interrupted")
            n = os.copy_file_range(src_fd, dst_fd, min(chunk, size - offset), offset, offset)
            if n == 0:
                break
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while offset < size:
        if cancelled is not None and offset % _CANCELLABLE_CHUNK == 0 and cancelled():
            raise InterruptedError(errno.EINTR, "copy-up interrupted")
        data = os.pread(src_fd, min(1 << 20, size - offset), offset)
        if not data:
            break
        offset += os.pwrite(dst_fd, data, offset)


def copy_xattrs(src: str, dst: str | int, *, src_dir_fd: int | None, dst_dir_fd: int | None) -> None:
    """Copy the xattrs of ``src`` to ``dst`` (a path, or an open file; neither followed), except overlay
    bookkeeping."""
    try:
        names = xattr.names(src, dir_fd=src_dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if whiteout.is_private_xattr(name):
            continue
        try:
            xattr.set(dst, name, xattr.get(src, name, dir_fd=src_dir_fd), dir_fd=dst_dir_fd)
        except OSError as e:
            # A symlink cannot carry user.* xattrs on Linux; the lower can't have them either then.
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


Records = tuple[tuple[tuple[str, ...], bytes], ...]  # overlay records: (the forms of one xattr, its value)


def copy_entry(
    src: str,
    st: os.stat_result,
    dst: str,
    *,
    src_dir_fd: int,
    dst_dir_fd: int,
    content: str = DATA,
    data_at: tuple[int, str] | None = None,
    records: Records = (),
    sync: bool = True,
    forms: Forms = DEFAULT,
) -> bool:
    """Create at ``dst`` (which must not exist) a copy of ``src`` whose lstat is ``st``; each path is
    relative to its directory descriptor. Returns whether the copy holds metadata only.

    Ownership, mode (setuid bits included), xattrs and atime/mtime in ns are kept; ``records`` are set
    on the copy too, each in the first of its forms the upper takes. A directory is copied without its
    children. ``content`` says what a regular file's copy holds (``METADATA`` falls back to the data
    where the upper takes no metacopy mark in ``forms``); its data is read at ``data_at`` (a directory descriptor
    and a path in it) where ``src`` is a metadata-only copy itself. ``sync`` flushes a file's data
    before returning, so that once renamed into place the copy survives a crash.
    """
    kind = stat.S_IFMT(st.st_mode)
    if kind != stat.S_IFREG:
        if kind == stat.S_IFDIR:
            os.mkdir(dst, 0o700, dir_fd=dst_dir_fd)
        elif kind == stat.S_IFLNK:
            os.symlink(confined.readlink(src, dir_fd=src_dir_fd), dst, dir_fd=dst_dir_fd)
        else:
            os.mknod(dst, kind | 0o600, st.st_rdev, dir_fd=dst_dir_fd)
        _copy_metadata(src, st, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, records=records)
        return False
    metadata_only = False
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst_dir_fd)
    try:
        if content == METADATA:
            os.ftruncate(dst_fd, st.st_size)
            metadata_only = metacopy.mark(dst_fd, forms)
        if content == DATA or content == METADATA and not metadata_only:
            data_dir_fd, data_path = data_at or (src_dir_fd, src)
            src_fd = confined.open_beneath(data_path, os.O_RDONLY, dir_fd=data_dir_fd)
            try:
                copy_data(src_fd, dst_fd, st.st_size)
            finally:
                os.close(src_fd)
            if sync and st.st_size:
                os.fsync(dst_fd)
        # (through the open file: no lookup of its name for each change)
        _copy_metadata(src, st, dst_fd, src_dir_fd=src_dir_fd, dst_dir_fd=None, records=records)
    finally:
        os.close(dst_fd)
    return metadata_only


def _copy_metadata(
    src: str, st: os.stat_result, dst: str | int, *, src_dir_fd: int, dst_dir_fd: int | None, records: Records
) -> None:
    """Owner, xattrs, records, mode and times of ``src`` (its lstat ``st``) onto ``dst``, a path
    relative to ``dst_dir_fd`` or an open file."""
    times = (st.st_atime_ns, st.st_mtime_ns)
    # chown first: it clears setuid/setgid bits and file capabilities (security.capability), even for root.
    if isinstance(dst, int):
        os.chown(dst, st.st_uid, st.st_gid)
    else:
        os.chown(dst, st.st_uid, st.st_gid, dir_fd=dst_dir_fd, follow_symlinks=False)
    copy_xattrs(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    for names, value in records:
        xattr.set_first(dst, names, value, dir_fd=dst_dir_fd)
    if isinstance(dst, int):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=times)
        return
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode), dir_fd=dst_dir_fd)
    os.utime(dst, ns=times, dir_fd=dst_dir_fd, follow_symlinks=False)


def fill_in_place(fd: int, data_fd: int, length: int, *, sync: bool, keep_times: bool = False) -> None:
    """Give the metadata-only copy open at ``fd`` its data, read from ``data_fd``, cut at ``length``, and
    drop its mark, keeping its file capabilities (writing a file clears them). Its mtime becomes that of
    the copy, as on overlayfs when it is opened for writing, unless ``keep_times``. A crash halfway
    leaves the copy marked, its data still read from below."""
    st = os.fstat(fd)
    capability = xattr.get_first(fd, (_CAPABILITY,))
    copy_data(data_fd, fd, min(length, st.st_size))
    if length < st.st_size:
        os.ftruncate(fd, length)
    if capability is not None:
        xattr.set(fd, _CAPABILITY, capability)
    if keep_times:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    if sync:
        os.fsync(fd)
    metacopy.unmark(fd)


@dataclass
class CopyUp:
    """A union's copy-up: a lower entry made a real entry of the upper layer, its parent directories
    first, built in the work directory and renamed into place, with the origin record and inode number
    overlayfs gives it. The union calls it before changing an entry that is not in the upper yet."""

    resolver: Resolver
    upper: Layer
    work: WorkDir
    origins: Origins
    inodes: InodeMap
    sync: bool

    def path(self, path: str, content: str = DATA) -> Entry:
        """The entry at ``path``, copied up if it is not in the upper layer yet."""
        entry = self.resolver.get(path)
        if entry.in_upper:
            return entry
        return self.entry(entry, content)

    def entry(self, entry: Entry, content: str = DATA) -> Entry:
        """Copy the lower ``entry`` up; a regular file's copy holds what ``content`` says (DATA, EMPTY or
        METADATA). Returns the entry it is then."""
        self.parents(split(entry.path)[0])
        tmp = self.work.tmp()
        data = entry.data
        data_at = None if data is None else (data.layer.fd, Layer.rel(data.path))
        # (No origin for a lower file with several names, as on overlayfs: the copy breaks the link.)
        origin = self.origins.record(entry.layer, entry.rel) if entry.is_dir or entry.st.st_nlink == 1 else None
        # (The copy goes to the entry's merged path: below a redirect, the lower one is elsewhere.)
        with self.upper.at(Layer.rel(entry.path)) as (dir_fd, name):
            pst = os.fstat(dir_fd)
            try:
                metadata_only = copy_entry(
                    entry.rel,
                    entry.st,
                    tmp,
                    src_dir_fd=entry.layer.fd,
                    dst_dir_fd=self.work.fd,
                    content=content,
                    data_at=data_at,
                    records=() if origin is None else ((self.origins.forms.written("origin"), origin),),
                    sync=self.sync,
                    forms=self.origins.forms,
                )
                if origin is not None:
                    self.origins.mark_impure(".", dir_fd=dir_fd)
                os.rename(tmp, name, src_dir_fd=self.work.fd, dst_dir_fd=dir_fd)
            except BaseException:
                self.work.discard(tmp)
                raise
            os.utime(dir_fd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
            st = os.lstat(name, dir_fd=dir_fd)
        self.inodes.copied_up(entry.st, st)
        if entry.is_dir:
            # Its own stack gains the upper part; every other stands (nothing below it is in the upper yet).
            self.resolver.forget(entry.path)
            return Entry(entry.path, self.upper, st, (Part(self.upper, entry.path),) + entry.stack)
        return Entry(
            entry.path,
            self.upper,
            st,
            (),
            chain=(Part(entry.layer, entry.real),) + entry.chain if metadata_only else (),
        )

    def with_data(self, path: str, length: int | None) -> Entry:
        """``path`` in the upper layer holding its data, of which only the first ``length`` bytes are
        wanted (None: all; what follows is about to be cut): a lower file copied up, a metadata-only
        copy given its data."""
        entry = self.resolver.get(path)
        if not entry.in_upper:
            return self.entry(entry, EMPTY if length == 0 else DATA)
        if entry.chain:
            return self.fill(entry, length)
        return entry

    def fill(self, entry: Entry, length: int | None, *, keep_times: bool = False) -> Entry:
        """Give the metadata-only copy ``entry`` its data (the first ``length`` bytes, None: all), in
        place: its other names, if it has any, are the same file. Returns what it is then."""
        data = entry.chain[-1]
        fd = confined.open_beneath(entry.rel, os.O_WRONLY, dir_fd=entry.layer.fd)
        try:
            data_fd = confined.open_beneath(Layer.rel(data.path), os.O_RDONLY, dir_fd=data.layer.fd)
            try:
                fill_in_place(
                    fd, data_fd, entry.st.st_size if length is None else length, sync=self.sync, keep_times=keep_times
                )
            finally:
                os.close(data_fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return Entry(entry.path, entry.layer, st, (), entry.real)

    def parents(self, path: str) -> None:
        """Make the directory ``path`` and its ancestors real directories of the upper layer."""
        missing = []
        while path != "/" and not self.resolver.stack_of(path)[0].layer.writable:
            missing.append(path)
            path = split(path)[0]
        for directory in reversed(missing):
            entry = self.resolver.get(directory)
            if not entry.is_dir:  # (a lower changed behind the mount's back: never copy a symlink up as a parent)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
            self.entry(entry)

    def tree(self, path: str) -> None:
        """Copy the directory ``path`` and everything visible below it into the upper layer."""
        pending = [path]
        while pending:
            directory = pending.pop()
            self.path(directory)
            for name, (_, info) in self.resolver.listing(directory).items():
                child = join(directory, name)
                if info.type_bits == stat.S_IFDIR:
                    pending.append(child)
                else:
                    self.path(child)
