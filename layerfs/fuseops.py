"""The FUSE binding: fusepy (libfuse2 high-level API) calls translated to the core Union.

This is the only module that imports fusepy. Its pitfalls, handled here:

- Any exception other than OSError would reach the kernel as EINVAL; unexpected ones become EIO here,
  logged with their traceback, so the daemon never dies on one.
- Names that are not valid UTF-8 (real images have them) would fail to decode; paths are decoded with
  surrogateescape instead, which os functions turn back into the same bytes.
- An unlinked file that is still open: the kernel's fstat asks GETATTR by path, and libfuse2 forgets the
  path of an unlinked node, so fstat would fail. libfuse's remedy is to rename such a file to a hidden
  name instead of unlinking it. That rename is intercepted: the file is unlinked for real (whiteout and
  all, nothing hidden is written to the upper layer) and the hidden name is kept here as an alias that
  answers getattr (and chmod, chown, utimens) from an open descriptor, until libfuse drops it after the
  last close. A user renaming
  a file to a fresh name starting with ``.fuse_hidden`` would meet the same treatment.
- ``nullpath_ok`` is switched on, so reads and writes on a handle never need a path.
- ``utime_omit_ok`` is switched on, or libfuse2 drops a utimensat that sets only one of the two times
  (``touch -a``); the timespecs are then read raw, since fusepy's conversion loses UTIME_OMIT/UTIME_NOW.
- Pages stay cached across opens (``keep_cache``): the kernel sees every write to a file's data.
- libfuse2 gives every *name* its own kernel inode, so the kernel caches attributes and pages per name: a
  file with several hard links is opened with direct I/O so that reading through one name sees what was
  written through another at once, and its permission to open is checked again on its present mode. (Its size and link count on the other names may lag by up to the
  attribute timeout: libfuse2's high-level API offers no way to invalidate them.)
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import time

import fuse

from .core.union import Attributes, Union

log = logging.getLogger("layerfs")

_ENCODING = "layerfs-utf8"


def _search_codec(name: str) -> codecs.CodecInfo | None:
    if name.replace("_", "-") != _ENCODING:
        return None
    return codecs.CodecInfo(
        name=_ENCODING,
        encode=lambda text, errors="strict": codecs.utf_8_encode(text, "surrogateescape"),
        decode=lambda data, errors="strict": codecs.utf_8_decode(data, "surrogateescape", True),
    )


codecs.register(_search_codec)


class _Operations(fuse.fuse_operations):
    """fusepy's operations table with the flags it offers no way to set."""

    def __init__(self) -> None:
        super().__init__()
        self.flag_nullpath_ok = 1
        self.flag_utime_omit_ok = 1


fuse.fuse_operations = _Operations

_NO_ID = 0xFFFFFFFF  # (uid_t)-1: "leave unchanged" in chown
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2


def _time_ns(ts, now: int) -> int | None:
    """A struct timespec from libfuse as ns since the epoch, None for UTIME_OMIT."""
    if ts.tv_nsec == _UTIME_OMIT:
        return None
    if ts.tv_nsec == _UTIME_NOW:
        return now
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


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
    """fusepy's FUSE with the utimens callback reading the timespecs itself."""

    def utimens(self, path, buf):
        now = time.time_ns()  # one instant for both, as utimensat(NULL) gives
        times = (_time_ns(buf.contents.actime, now), _time_ns(buf.contents.modtime, now)) if buf else (now, now)
        return self.operations("utimens", path.decode(self.encoding), times)
_HIDDEN_PREFIX = ".fuse_hidden"  # libfuse's name for an unlinked file that is still open


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

    def __init__(self, union: Union, on_ready=None) -> None:
        self.union = union
        self._on_ready = on_ready
        self._hidden: dict[str, tuple[int, int]] = {}  # libfuse's hidden name -> Union.detach key

    def __call__(self, op: str, *args):
        try:
            return getattr(self, op)(*args)
        except OSError:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", op, args)
            raise fuse.FuseOSError(errno.EIO)

    def init(self, path):
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path):
        self.union.close()

    # -- reading

    def getattr(self, path, fh=None):
        if fh is not None:
            return _attrs(self.union.fstat(fh.fh))
        hidden = self._hidden.get(path)
        if hidden is not None:
            attrs = _attrs(self.union.detached_attributes(hidden))
            # libfuse takes one link off for a hidden node, taking the hidden name for a real one; there is
            # no such name here, so give it back (a file with no name left stays at 0).
            if attrs["st_nlink"] > 0:
                attrs["st_nlink"] += 1
            return attrs
        return _attrs(self.union.getattr(path))

    def readdir(self, path, fh):
        # A list, not a generator: errors must surface inside __call__ to be mapped.
        entries: list = [".", ".."]
        entries.extend((name, {"st_ino": ino, "st_mode": bits}, 0)
                       for name, (ino, bits) in self.union.listdir(path).items())
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
        fd = self.union.open(path, fi.flags)
        fi.fh = fd
        if self.union.has_other_names(fd):
            fi.direct_io = 1
            uid, gid, pid = fuse.fuse_get_context()
            if not self.union.may_open(fd, fi.flags, uid, _groups(pid, gid)):
                self.union.release(fd)
                raise fuse.FuseOSError(errno.EACCES)
        else:
            # Every change to this file's data passes through this very kernel inode (layerfs is the only
            # writer of its upper, lowers never change), so the pages cached by an earlier open are right.
            fi.keep_cache = 1
        return 0

    def create(self, path, mode, fi):
        uid, gid, _ = fuse.fuse_get_context()
        fi.fh = self.union.create(path, fi.flags, mode, uid, gid)
        return 0

    def read(self, path, size, offset, fh):
        return self.union.read(fh.fh, size, offset)

    def write(self, path, data, offset, fh):
        if self.union.has_other_names(fh.fh) and fuse.fuse_get_context()[0] != 0:
            # With direct I/O the kernel leaves clearing setuid bits on write to the filesystem.
            self.union.drop_setid(fh.fh)
        return self.union.write(fh.fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            self.union.ftruncate(fh.fh, length)
        else:
            self.union.truncate(path, length)

    def fsync(self, path, datasync, fh):
        self.union.fsync(fh.fh, bool(datasync))

    def release(self, path, fh):
        self.union.release(fh.fh)

    # -- changing

    def mkdir(self, path, mode):
        uid, gid, _ = fuse.fuse_get_context()
        self.union.mkdir(path, mode, uid, gid)

    def mknod(self, path, mode, dev):
        uid, gid, _ = fuse.fuse_get_context()
        self.union.mknod(path, mode, dev, uid, gid)

    def symlink(self, target, source):
        # fusepy names them backwards: ``target`` is the new link's path, ``source`` its content.
        uid, gid, _ = fuse.fuse_get_context()
        self.union.symlink(source, target, uid, gid)

    def link(self, target, source):
        # Likewise: ``target`` is the new name, ``source`` the existing file.
        self.union.link(source, target)

    def unlink(self, path):
        hidden = self._hidden.pop(path, None)
        if hidden is not None:
            self.union.forget_detached(hidden)
            return  # libfuse lets go of a hidden file after its last close: it is gone already
        self.union.unlink(path)

    def rmdir(self, path):
        self.union.rmdir(path)

    def rename(self, old, new):
        if new.rpartition("/")[2].startswith(_HIDDEN_PREFIX) and self.union.lookup(new) is None:
            self._hidden[new] = self.union.detach(old)
            return
        self.union.rename(old, new)

    def chmod(self, path, mode):
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], mode=mode)
            return
        self.union.chmod(path, mode)

    def chown(self, path, uid, gid):
        owner = (-1 if uid == _NO_ID else uid, -1 if gid == _NO_ID else gid)
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], owner=owner)
            return
        self.union.chown(path, *owner)

    def utimens(self, path, times):
        if path in self._hidden:
            self.union.change_detached(self._hidden[path], times_ns=times)
            return
        self.union.utimens(path, *times)

    def setxattr(self, path, name, value, options, position=0):
        self.union.setxattr(path, name, value, options)

    def removexattr(self, path, name):
        self.union.removexattr(path, name)

    # Requests that need nothing from layerfs: left unset, libfuse answers them without calling Python
    # (close(2) sends a flush every time; readdir resolves its path itself).
    flush = None
    opendir = None
    releasedir = None


def run(union: Union, mountpoint: str, *, readonly: bool, fsname: str, debug: bool, on_ready=None) -> None:
    """Serve ``union`` at ``mountpoint`` until it is unmounted (blocks)."""
    options = dict(
        foreground=True, allow_other=True, default_permissions=True, use_ino=True,
        nonempty=True, fsname=fsname, subtype="layerfs", big_writes=True, max_write=131072,
        max_read=131072, attr_timeout=1.0, entry_timeout=1.0, negative_timeout=1.0,
    )
    if readonly:
        options["ro"] = True
    if os.geteuid() == 0:
        # libfuse mounts nosuid,nodev unless told otherwise; a container rootfs needs both.
        options.update(suid=True, dev=True)
    operations = LayerfsOperations(union, on_ready)
    if debug:
        operations = _Logged(operations)
    _FUSE(operations, mountpoint, raw_fi=True, encoding=_ENCODING, **options)


class _Logged(LayerfsOperations):
    """--debug: every request and its answer on the log."""

    def __init__(self, inner: LayerfsOperations) -> None:
        self.__dict__.update(inner.__dict__)

    def __call__(self, op, *args):
        shown = tuple(a if isinstance(a, (str, int, bytes)) else getattr(a, "fh", a) for a in args)
        try:
            result = super().__call__(op, *args)
        except OSError as e:
            log.debug("%s%r -> %s", op, shown, errno.errorcode.get(e.errno, e.errno))
            raise
        if op in ("read", "readdir"):
            log.debug("%s%r -> %d items", op, shown, len(result))
        else:
            log.debug("%s%r -> %r", op, shown, result)
        return result
