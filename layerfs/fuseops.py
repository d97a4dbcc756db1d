"""The FUSE binding: libfuse3's high-level API, through mfusepy, translated to the core Union.

This is the only module that imports the binding. Why libfuse3 and not libfuse2: the kernel may cache
entries and attributes for as long as it likes (lowers never change and layerfs is the only writer of
its upper), which halves warm stat and read times, but only if the few attributes one operation changes
behind another name can be invalidated, and only libfuse3 offers that (``fuse_invalidate_path``).

The binding's pitfalls, handled here:

- Any exception other than OSError would reach the kernel as EINVAL; unexpected ones become EIO here,
  logged with their traceback, so the daemon never dies on one.
- Names that are not valid UTF-8 (real images have them) are decoded with surrogateescape, which os
  functions turn back into the same bytes.
- mfusepy drops the file handle of chmod/chown/truncate/utimens, the flags of rename and the
  UTIME_OMIT/UTIME_NOW of utimens; they are read from the C arguments here.
- An unlinked file that is still open: the kernel's fstat and fchmod ask by node, and libfuse forgets
  the path of an unlinked node, so they would fail. libfuse's remedy is to rename such a file to a
  hidden name instead of unlinking it. That rename is intercepted: the file is unlinked for real
  (whiteout and all, nothing hidden is written to the upper layer) and the hidden name is kept here as
  an alias that answers getattr (and chmod, chown, utimens) from an open descriptor, until libfuse
  drops it after the last close. A user renaming a file to a fresh name starting with ``.fuse_hidden``
  would meet the same treatment.
- libfuse's high-level API gives every *name* its own kernel inode, so the kernel caches attributes and
  pages per name. A file with several hard links is opened with direct I/O, so that reading through one
  name sees what was written through another at once, and its permission to open is checked again on
  its present mode; the names of such files the kernel has looked up are remembered (``_Names``), and
  an operation through one of them invalidates the attributes cached for the others.
- Pages stay cached across opens (``keep_cache``) for every other file: the kernel sees every write to
  its data.
- libfuse 3.14 reports an exit on SIGINT/SIGTERM/SIGHUP as event-loop error 8, after unmounting
  cleanly; that is the normal end of a foreground mount, not a failure.
- ctypes gives a thread Python did not start (libfuse's workers) a fresh Python thread state for every
  callback and frees it afterwards; each worker takes one for good on its first request instead
  (``_KEPT``), which takes 10-25% off every request.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import stat
import threading
import time

os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy would take libfuse2 when both are installed
import mfusepy as fuse  # noqa: E402

from .core.idmap import AS_STORED, Owners  # noqa: E402
from .core.union import Attributes, Union  # noqa: E402

log = logging.getLogger("layerfs")
logging.getLogger("fuse").setLevel(logging.WARNING)  # mfusepy narrates its setup at debug level

_libfuse = fuse._libfuse
_libfuse.fuse_invalidate_path.argtypes = (ctypes.c_void_p, ctypes.c_char_p)

_KEPT: set[int] = set()  # libfuse worker threads that hold a Python thread state for good
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: "leave unchanged" in chown
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_RENAME_NOREPLACE = 1
_FUSE_LOOP_ERROR = 8  # fuse_main's code for "the event loop ended with an error"
# libfuse2 gave "." and ".." this inode number; a zero one would make readdir(3) skip them.
_UNKNOWN_INO = 0xFFFFFFFF
_HIDDEN_PREFIX = ".fuse_hidden"  # libfuse's name for an unlinked file that is still open


def _time_ns(ts, now: int) -> int | None:
    """A struct timespec from libfuse as ns since the epoch, None for UTIME_OMIT."""
    if ts.tv_nsec == _UTIME_OMIT:
        return None
    if ts.tv_nsec == _UTIME_NOW:
        return now
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def _decode(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "surrogateescape")


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _fh(fip) -> int | None:
    return fip.contents.fh if fip else None


def _groups(pid: int, gid: int) -> set[int]:
    """The caller's primary and supplementary groups."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except OSError:
        pass
    return groups


class _FUSE(fuse.FUSE):
    """mfusepy's FUSE with the callbacks it translates lossily (or slowly) done here."""

    def _wrapper(self, func, *args):
        ident = threading.get_ident()
        if ident not in _KEPT:
            _KEPT.add(ident)
            ctypes.pythonapi.PyGILState_Ensure()
        try:
            return func(*args) or 0
        except OSError as e:
            return -(e.errno or errno.EIO)
        except Exception:
            log.exception("unexpected error in %s", func.__name__)
            return -errno.EIO

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags):
        st = fuse.c_stat()
        for name, ino, kind in self.operations.readdir(_decode(path)):
            st.st_ino = ino
            st.st_mode = kind
            if filler(buf, _encode(name), st, 0, 0):
                break
        return 0

    def utimens_fuse_3(self, path, buf, fip):
        now = time.time_ns()  # one instant for both, as utimensat(NULL) gives
        times = (_time_ns(buf.contents.actime, now), _time_ns(buf.contents.modtime, now)) if buf else (now, now)
        return self.operations.utimens(_decode(path), times, _fh(fip))

    def chmod_fuse_3(self, path, mode, fip):
        return self.operations.chmod(_decode(path), mode, _fh(fip))

    def chown_fuse_3(self, path, uid, gid, fip):
        return self.operations.chown(_decode(path), uid, gid, _fh(fip))

    def truncate_fuse_3(self, path, length, fip):
        return self.operations.truncate(_decode(path), length, _fh(fip))

    def rename_fuse_3(self, old, new, flags):
        return self.operations.rename(_decode(old), _decode(new), flags)


class _LoggedFUSE(_FUSE):
    """--debug: every request and its answer on the log."""

    def _wrapper(self, func, *args):
        shown = tuple(a for a in args if isinstance(a, (bytes, int)))
        result = super()._wrapper(func, *args)
        answer = errno.errorcode.get(-result, result) if isinstance(result, int) and result < 0 else result
        log.debug("%s%r -> %r", func.__name__.removesuffix("_fuse_3"), shown, answer)
        return result


class _Names:
    """The names of multiply-linked files that the kernel has looked up, by inode number."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[int, set[str]] = {}
        self._number: dict[str, int] = {}

    def saw(self, path: str, ino: int) -> None:
        if self._number.get(path) == ino:
            return
        with self._lock:
            self._forget(path)
            self._number[path] = ino
            self._names.setdefault(ino, set()).add(path)

    def __contains__(self, path: str) -> bool:
        return path in self._number

    def number(self, path: str) -> int | None:
        return self._number.get(path)

    def of(self, ino: int | None) -> list[str]:
        with self._lock:
            return list(self._names.get(ino, ()))

    def forget(self, path: str) -> None:
        with self._lock:
            self._forget(path)

    def renamed(self, old: str, new: str) -> None:
        """``old`` (and everything below it, for a directory) is now called ``new``."""
        below = old + "/"
        with self._lock:
            self._forget(new)
            for path in [p for p in self._number if p == old or p.startswith(below)]:
                ino = self._number[path]
                self._forget(path)
                moved = new + path[len(old):]
                self._number[moved] = ino
                self._names.setdefault(ino, set()).add(moved)

    def _forget(self, path: str) -> None:
        ino = self._number.pop(path, None)
        if ino is not None:
            names = self._names[ino]
            names.discard(path)
            if not names:
                del self._names[ino]


class _Invalidator:
    """Sends ``fuse_invalidate_path`` from a thread of its own.

    Dropping a name's cached pages waits for any the kernel holds locked for a write in flight, and that
    write can be waiting for a libfuse path lock behind a queued rmdir, which waits for the very request
    that invalidates (a deadlock the stress test found). So a request waits for its invalidations only
    briefly: in the common case they are done before it answers; otherwise they are done once it has.
    """

    _PATIENCE_S = 0.05

    def __init__(self, fuse_handle: int) -> None:
        self._fuse = fuse_handle
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="invalidate", daemon=True)
        self._thread.start()

    def invalidate(self, paths: list[str]) -> None:
        done = threading.Event()
        self._queue.put(([_encode(p) for p in paths], done))
        done.wait(self._PATIENCE_S)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(1.0)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            paths, done = item
            for path in paths:
                _libfuse.fuse_invalidate_path(self._fuse, path)
            done.set()


def _attrs(a: Attributes) -> dict:
    st = a.st
    return {
        "st_mode": st.st_mode, "st_ino": a.ino, "st_nlink": a.nlink, "st_uid": st.st_uid,
        "st_gid": st.st_gid, "st_size": st.st_size, "st_rdev": st.st_rdev, "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


class LayerfsOperations(fuse.Operations):
    use_ns = True

    def __init__(self, union: Union, on_ready=None, owners: Owners = AS_STORED, static_nlink: bool = False) -> None:
        self.union = union
        self._on_ready = on_ready
        self._owners = None if owners.identity else owners  # None: shown as stored, the common case
        self._static_nlink = static_nlink
        self._hidden: dict[str, tuple[int, int]] = {}  # libfuse's hidden name -> Union.detach key
        self._names = _Names()
        self._invalidator: _Invalidator | None = None

    def init_with_config(self, conn, config):
        config.use_ino = 1
        self._invalidator = _Invalidator(_libfuse.fuse_get_context().contents.fuse)
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path):
        if self._invalidator is not None:
            self._invalidator.stop()
        self.union.close()

    def _changed(self, ino: int | None, *, besides: str | None = None) -> None:
        """Attributes of the file numbered ``ino`` changed: drop what the kernel cached for its names
        (but ``besides``: a write's own name, whose pages the kernel may hold locked meanwhile)."""
        names = [name for name in self._names.of(ino) if name != besides]
        if names:
            self._invalidator.invalidate(names)

    @contextlib.contextmanager
    def _changing(self, path: str):
        """Around an operation on ``path`` that may change a multiply-linked file, or copy one up (which
        gives the name a file of its own), even if it then fails."""
        ino = self._names.number(path)
        try:
            yield
        finally:
            if ino is not None:
                self._changed(ino)

    # -- reading

    def getattr(self, path, fh=None):
        if fh is not None:
            return self._shown(self.union.fstat(fh.fh))
        hidden = self._hidden.get(path)
        if hidden is not None:
            attrs = self._shown(self.union.detached_attributes(hidden))
            # libfuse takes one link off for a hidden node, taking the hidden name for a real one; there is
            # no such name here, so give it back (a file with no name left stays at 0).
            if attrs["st_nlink"] > 0:
                attrs["st_nlink"] += 1
            return attrs
        a = self.union.getattr(path)
        if a.nlink > 1 and not stat.S_ISDIR(a.st.st_mode):
            self._names.saw(path, a.ino)
        return self._shown(a)

    def _shown(self, a: Attributes) -> dict:
        attrs = _attrs(a)
        if self._owners is not None:
            attrs["st_uid"] = self._owners.uid.shown(attrs["st_uid"])
            attrs["st_gid"] = self._owners.gid.shown(attrs["st_gid"])
        if self._static_nlink and stat.S_ISDIR(attrs["st_mode"]):
            attrs["st_nlink"] = 1
        return attrs

    def _caller(self) -> tuple[int, int]:
        """The calling process's uid and gid as the layers store them."""
        uid, gid, _ = fuse.fuse_get_context()
        if self._owners is None:
            return uid, gid
        return self._owners.uid.stored(uid), self._owners.gid.stored(gid)

    def readdir(self, path):
        entries = [(".", _UNKNOWN_INO, stat.S_IFDIR), ("..", _UNKNOWN_INO, stat.S_IFDIR)]
        entries.extend((name, ino, bits) for name, (ino, bits) in self.union.listdir(path).items())
        return entries

    def readlink(self, path):
        return self.union.readlink(path)

    def statfs(self, path):
        v = self.union.statvfs()
        return {
            "f_bsize": v.f_bsize, "f_frsize": v.f_frsize, "f_blocks": v.f_blocks, "f_bfree": v.f_bfree,
            "f_bavail": v.f_bavail, "f_files": v.f_files, "f_ffree": v.f_ffree, "f_favail": v.f_favail,
            "f_namemax": v.f_namemax,
        }

    def access(self, path, amode):
        self.union.access(path, amode)

    def getxattr(self, path, name, position=0):
        return self.union.getxattr(path, name)

    def listxattr(self, path):
        names = self.union.listxattr(path)
        if fuse.fuse_get_context()[0] != 0:
            # The daemon reads as root; the filesystem below would not list trusted.* to anyone else.
            names = [n for n in names if not n.startswith("trusted.")]
        return names

    # -- open files

    def open(self, path, fi):
        hidden = self._hidden.get(path)
        if hidden is not None:  # the lookup raced with an unlink: libfuse names the file by its hidden name
            fi.fh = self.union.reopen_detached(hidden, fi.flags)
            fi.direct_io = 1
            return 0
        if path in self._names and fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            with self._changing(path):
                fd = self.union.open(path, fi.flags)
        else:
            fd = self.union.open(path, fi.flags)
        fi.fh = fd
        if self.union.has_other_names(fd):
            fi.direct_io = 1
            uid, gid, pid = fuse.fuse_get_context()
            groups = _groups(pid, gid)
            if self._owners is not None and uid != 0:  # (root stays root)
                uid, groups = self._owners.uid.stored(uid), {self._owners.gid.stored(g) for g in groups}
            if not self.union.may_open(fd, fi.flags, uid, groups):
                self.union.release(fd)
                raise fuse.FuseOSError(errno.EACCES)
        else:
            # Every change to this file's data passes through this very kernel inode (layerfs is the only
            # writer of its upper, lowers never change), so the pages cached by an earlier open are right.
            fi.keep_cache = 1
        return 0

    def create(self, path, mode, fi):
        uid, gid = self._caller()
        fi.fh = self.union.create(path, fi.flags, mode, uid, gid)
        return 0

    def read(self, path, size, offset, fh):
        return self.union.read(fh.fh, size, offset)

    def write(self, path, data, offset, fh):
        fd = fh.fh
        if self.union.has_other_names(fd):
            if fuse.fuse_get_context()[0] != 0:
                # With direct I/O the kernel leaves clearing setuid bits on write to the filesystem.
                self.union.drop_setid(fd)
            written = self.union.write(fd, data, offset)
            self._changed(self.union.fstat(fd).ino, besides=path)
            return written
        return self.union.write(fd, data, offset)

    def truncate(self, path, length, fh):
        if fh is not None:
            self.union.ftruncate(fh, length)
            self._changed(self.union.fstat(fh).ino)
        else:
            with self._changing(path):
                self.union.truncate(path, length)

    def fsync(self, path, datasync, fh):
        self.union.fsync(fh.fh, bool(datasync))

    def release(self, path, fh):
        self.union.release(fh.fh)

    # -- changing

    def mkdir(self, path, mode):
        uid, gid = self._caller()
        self.union.mkdir(path, mode, uid, gid)

    def mknod(self, path, mode, dev):
        uid, gid = self._caller()
        self.union.mknod(path, mode, dev, uid, gid)

    def symlink(self, target, source):
        # mfusepy names them backwards: ``target`` is the new link's path, ``source`` its content.
        uid, gid = self._caller()
        self.union.symlink(source, target, uid, gid)

    def link(self, target, source):
        # Likewise: ``target`` is the new name, ``source`` the existing file.
        self.union.link(source, target)
        ino = self.union.getattr(target).ino
        self._names.saw(source, ino)
        self._names.saw(target, ino)
        self._changed(ino, besides=target)  # the kernel keeps the source name's old link count

    def unlink(self, path):
        hidden = self._hidden.pop(path, None)
        if hidden is not None:
            self.union.forget_detached(hidden)
            return  # libfuse lets go of a hidden file after its last close: it is gone already
        ino = self._names.number(path)
        self.union.unlink(path)
        self._names.forget(path)
        self._changed(ino)

    def rmdir(self, path):
        self.union.rmdir(path)

    def rename(self, old, new, flags):
        if flags & ~_RENAME_NOREPLACE:
            raise fuse.FuseOSError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT: not supported
        if new.rpartition("/")[2].startswith(_HIDDEN_PREFIX) and self.union.lookup(new) is None:
            self._hidden[new] = self.union.detach(old)
            self._names.forget(old)
            return
        moved, replaced = self._names.number(old), self._names.number(new)
        self.union.rename(old, new, replace=not flags)
        self._names.renamed(old, new)
        self._changed(replaced)  # one name fewer
        self._changed(moved, besides=new)  # a new ctime

    def chmod(self, path, mode, fh):
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], mode=mode)
            return
        with self._changing(path):
            self.union.chmod(path, mode)

    def chown(self, path, uid, gid, fh):
        owner = (-1 if uid == _NO_ID else uid, -1 if gid == _NO_ID else gid)
        if self._owners is not None:
            owner = tuple(-1 if i == -1 else ids.stored(i) for i, ids in zip(owner, self._owners))
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], owner=owner)
            return
        with self._changing(path):
            self.union.chown(path, *owner)

    def utimens(self, path, times, fh):
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], times_ns=times)
            return
        with self._changing(path):
            self.union.utimens(path, *times)

    def setxattr(self, path, name, value, options, position=0):
        with self._changing(path):
            self.union.setxattr(path, name, value, options)

    def removexattr(self, path, name):
        with self._changing(path):
            self.union.removexattr(path, name)

    # Requests that need nothing from layerfs: left unset, libfuse answers them without calling Python
    # (close(2) sends a flush every time; readdir resolves its path itself). libfuse 3.14's high-level
    # opendir would not pass cache_readdir on to the kernel, so there is nothing to set there either.
    flush = None
    opendir = None
    releasedir = None


def run(union: Union, mountpoint: str, *, readonly: bool, fsname: str, debug: bool, on_ready=None,
        owners: Owners = AS_STORED, static_nlink: bool = False) -> None:
    """Serve ``union`` at ``mountpoint`` until it is unmounted (blocks); ``owners`` maps the owners the
    layers store to those the mount shows."""
    options = dict(
        foreground=True, allow_other=True, default_permissions=True, fsname=fsname, subtype="layerfs",
        max_idle_threads=8,
        # Lowers never change and every change to the upper comes through this mount, where the kernel
        # sees it or _changed invalidates it: what the kernel caches stays right.
        attr_timeout=86400, entry_timeout=86400, negative_timeout=86400,
    )
    if readonly:
        options["ro"] = True
    if os.geteuid() == 0:
        # libfuse mounts nosuid,nodev unless told otherwise; a container rootfs needs both.
        options.update(suid=True, dev=True)
    binding = _LoggedFUSE if debug else _FUSE
    try:
        binding(LayerfsOperations(union, on_ready, owners, static_nlink), mountpoint, raw_fi=True, **options)
    except RuntimeError as e:
        if e.args != (_FUSE_LOOP_ERROR,):
            raise
