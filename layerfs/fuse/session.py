"""A FUSE session on ``/dev/fuse``: mounting, INIT negotiation, the request loop, replies, notifications.

It knows the protocol and nothing of what is served: requests are parsed here and handed, by inode
number, to an ``Operations`` object (``operations.py``), whose answers are packed into replies here.

Why speak the protocol instead of going through libfuse: libfuse's high-level API (the only one a
Python binding offered with threads) hands every request between its worker threads and Python under
the GIL, which was most of a request's cost; it names files by path, one kernel inode per *name*, so
hard links needed direct I/O and invalidations from a thread of their own; and Debian's libfuse 3.14
can negotiate neither passthrough nor cached directory listings. Here every worker thread reads its own
cloned ``/dev/fuse`` descriptor into a buffer of its own, calls the filesystem and writes the reply:
no handoff, one inode per file, and whatever the kernel offers.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field

from . import abi
from .operations import Entry, Operations, Request, SetAttr

log = logging.getLogger("layerfs")

_MAX_PAGES = 256  # 1 MiB requests
_MAX_WRITE = _MAX_PAGES * 4096
_BUFFER = _MAX_WRITE + 64 * 1024  # the kernel refuses a read into less than max_write and the headers
_NOT_IMPLEMENTED = -errno.ENOSYS


@dataclass
class Config:
    """What to ask of the kernel. Timeouts are in seconds."""

    fsname: str = "layerfs"
    subtype: str = "layerfs"
    readonly: bool = False
    allow_other: bool = True
    suid_dev: bool = True  # a container rootfs needs setuid binaries and device nodes
    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    passthrough: bool = True
    writeback_cache: bool = False
    readdirplus: bool = True
    threads: int = 2
    debug: bool = False


@dataclass
class Stats:
    """Requests served, by operation: how many and the time spent in the filesystem."""

    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _valid(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _cstring(data: memoryview, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset after its NUL."""
    raw = bytes(data)
    end = raw.index(0, start)
    return raw[start:end], end + 1


class Session:
    """One mount served by ``operations``; ``run`` blocks until it is unmounted."""

    def __init__(self, operations: Operations, mountpoint: str, config: Config) -> None:
        self.operations = operations
        self.mountpoint = os.path.abspath(mountpoint)
        self.config = config
        self.fd = -1
        self.granted = 0  # INIT flags both sides agreed on
        self.proto_minor = 0
        self._clones: list[int] = []
        self._counts: dict[int, int] = {}
        self._times: dict[int, int] = {}
        self._in_flight: dict[int, Request] = {}
        self._handlers = self._handler_table()
        entry_s, entry_ns = _valid(config.entry_timeout)
        attr_s, attr_ns = _valid(config.attr_timeout)
        self._entry_times = (entry_s, attr_s, entry_ns, attr_ns)
        self._attr_times = (attr_s, attr_ns)

    # -- mounting ----------------------------------------------------------------------------------

    def mount(self) -> None:
        """Open ``/dev/fuse`` and mount it at the mountpoint: by mount(2) as root, else by fusermount3."""
        if os.geteuid() == 0:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            self._mount_directly()
        else:
            self.fd = self._mount_by_helper()

    def _options(self) -> list[str]:
        options = ["default_permissions"]
        if self.config.allow_other:
            options.append("allow_other")
        return options

    def _mount_directly(self) -> None:
        from .. import syscalls

        st = os.stat(self.mountpoint)
        data = ",".join(
            [
                f"fd={self.fd}",
                f"rootmode={stat.S_IFMT(st.st_mode) | 0o755:o}",
                f"user_id={os.geteuid()}",
                f"group_id={os.getegid()}",
                *self._options(),
            ]
        )
        flags = syscalls.MS_RDONLY if self.config.readonly else 0
        if not self.config.suid_dev:
            flags |= syscalls.MS_NOSUID | syscalls.MS_NODEV
        source = self.config.fsname
        syscalls.mount(source, self.mountpoint, f"fuse.{self.config.subtype}", flags, data)

    def _mount_by_helper(self) -> int:
        """fusermount3 (setuid root) mounts for a plain user and hands back the opened ``/dev/fuse``
        descriptor over a socket named in ``_FUSE_COMMFD``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        options = self._options() + [f"fsname={self.config.fsname}", f"subtype={self.config.subtype}"]
        if self.config.readonly:
            options.append("ro")
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            result = subprocess.run(
                ["fusermount3", "-o", ",".join(options), "--", self.mountpoint],
                env=env,
                pass_fds=(theirs.fileno(),),
                capture_output=True,
                text=True,
            )
            theirs.close()
            if result.returncode != 0:
                raise OSError(errno.EPERM, result.stderr.strip() or "fusermount3 failed", self.mountpoint)
            fds = array.array("i")
            _, ancillary, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: fds.itemsize])
            if not fds:
                raise OSError(errno.EIO, "fusermount3 passed no descriptor", self.mountpoint)
            os.set_inheritable(fds[0], False)
            return fds[0]
        finally:
            ours.close()
            theirs.close()

    # -- serving -----------------------------------------------------------------------------------

    def run(self, on_ready=None) -> None:
        """Answer INIT, then serve requests on ``threads`` descriptors until the mount goes away."""
        buffer = bytearray(_BUFFER)
        self._init(buffer)
        if on_ready is not None:
            on_ready()
        workers: list[threading.Thread] = []
        for _ in range(self.config.threads - 1):
            clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(clone, abi.DEV_IOC_CLONE, array.array("I", [self.fd]))
            self._clones.append(clone)
            worker = threading.Thread(
                target=self._serve, args=(clone, bytearray(_BUFFER)), daemon=True, name=f"fuse-{len(workers) + 1}"
            )
            worker.start()
            workers.append(worker)
        try:
            self._serve(self.fd, buffer)
        finally:
            for worker in workers:
                worker.join()
            for clone in self._clones:
                os.close(clone)
            os.close(self.fd)
            self.operations.destroy()

    def _init(self, buffer: bytearray) -> None:
        n = self._read(self.fd, buffer)
        if n is None:
            raise OSError(errno.ENODEV, "the mount went away before it was initialised", self.mountpoint)
        view = memoryview(buffer)[:n]
        _, opcode, unique, *_ = abi.in_header.unpack_from(view)
        if opcode != abi.INIT:
            raise OSError(errno.EPROTO, f"the kernel's first request was {opcode}, not INIT", self.mountpoint)
        major, minor, max_readahead, flags, flags2 = abi.init_in.unpack_from(view, abi.in_header.size)
        if major != abi.KERNEL_MAJOR:
            raise OSError(errno.EPROTO, f"the kernel speaks FUSE {major}.{minor}, layerfs speaks 7", self.mountpoint)
        offered = flags | (flags2 << 32 if flags & abi.INIT_EXT else 0)
        wanted = (
            abi.ASYNC_READ
            | abi.BIG_WRITES
            | abi.MAX_PAGES
            | abi.PARALLEL_DIROPS
            | abi.ATOMIC_O_TRUNC
            | abi.CACHE_SYMLINKS
            | abi.INIT_EXT
            # Without it the kernel asks for security.capability before every write(2), to see
            # whether to clear privileges; with it, it says when the server must clear them.
            | abi.HANDLE_KILLPRIV_V2
        )
        if self.config.readdirplus:
            wanted |= abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
        if self.config.passthrough:
            # (its backing ioctl needs CAP_SYS_ADMIN: without it the first open falls back, and says so)
            wanted |= abi.PASSTHROUGH
        if self.config.writeback_cache and not self.config.readonly and not wanted & abi.PASSTHROUGH:
            wanted |= abi.WRITEBACK_CACHE  # the kernel grants no passthrough beside it, silently
        self.granted = offered & wanted
        self.proto_minor = min(minor, abi.KERNEL_MINOR)
        reply = abi.init_out.pack(
            abi.KERNEL_MAJOR,
            self.proto_minor,
            max_readahead,
            self.granted & 0xFFFFFFFF,
            64,
            48,  # max_background, congestion_threshold: room for readahead and async reads
            _MAX_WRITE,
            1,
            _MAX_PAGES,
            0,
            self.granted >> 32,
            1 if self.granted & abi.PASSTHROUGH else 0,  # max_stack_depth: backing files on a plain fs
            0,
        )
        self._reply(self.fd, unique, reply)
        log.debug("FUSE %d.%d, granted: %s", major, self.proto_minor, ", ".join(self.granted_names()) or "nothing")

    def granted_names(self) -> list[str]:
        return [name for bit, name in abi.INIT_FLAG_NAMES.items() if self.granted & bit]

    @staticmethod
    def _read(fd: int, buffer: bytearray) -> int | None:
        """One request into ``buffer``; None when the mount is gone."""
        while True:
            try:
                return os.readv(fd, [buffer])
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if e.errno == errno.ENODEV:  # unmounted, or the connection aborted
                    return None
                raise

    def _serve(self, fd: int, buffer: bytearray) -> None:
        view = memoryview(buffer)
        handlers = self._handlers
        counts, times = self._counts, self._times
        debug = self.config.debug
        clock = time.perf_counter_ns
        while self._read(fd, buffer) is not None:
            length, opcode, unique, nodeid, uid, gid, pid, _, _ = abi.in_header.unpack_from(view)
            body = view[abi.in_header.size : length]
            handler = handlers.get(opcode)
            started = clock()
            if handler is None:
                if opcode == abi.DESTROY:
                    self._reply(fd, unique, b"")
                    continue
                error = _NOT_IMPLEMENTED
                self._reply_error(fd, unique, error)
            else:
                request = Request(unique, nodeid, uid, gid, pid)
                self._in_flight[unique] = request
                try:
                    reply = handler(request, body)
                    if reply is not None:
                        self._reply(fd, unique, reply)
                    error = 0
                except OSError as e:
                    error = -(e.errno or errno.EIO)
                    self._reply_error(fd, unique, error)
                except Exception:
                    log.exception("unexpected error in %s", abi.OPCODE_NAMES.get(opcode, opcode))
                    error = -errno.EIO
                    self._reply_error(fd, unique, error)
                finally:
                    del self._in_flight[unique]
            elapsed = clock() - started
            counts[opcode] = counts.get(opcode, 0) + 1
            times[opcode] = times.get(opcode, 0) + elapsed
            if debug:
                log.debug(
                    "%s #%d node %d%s uid %d pid %d -> %s",
                    abi.OPCODE_NAMES.get(opcode, opcode),
                    unique,
                    nodeid,
                    _named(opcode, body),
                    uid,
                    pid,
                    errno.errorcode.get(-error, error) if error else "ok",
                )

    def _reply(self, fd: int, unique: int, payload: bytes | memoryview) -> None:
        try:
            os.writev(fd, [abi.out_header.pack(abi.out_header.size + len(payload), 0, unique), payload])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted and forgotten, or unmounted
                raise

    def _reply_error(self, fd: int, unique: int, error: int) -> None:
        try:
            os.write(fd, abi.out_header.pack(abi.out_header.size, error, unique))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def stats(self) -> Stats:
        result = Stats()
        for opcode, count in sorted(self._counts.items()):
            name = abi.OPCODE_NAMES.get(opcode, str(opcode))
            result.counts[name] = count
            result.seconds[name] = self._times.get(opcode, 0) / 1e9
        return result

    # -- notifications and passthrough: for the filesystem to call -------------------------------------

    def _notify(self, code: int, payload: bytes) -> None:
        """Notifications may wait for kernel locks that a request in flight holds: never send one from a
        request's own thread if that request's caller could hold them."""
        try:
            os.writev(self.fd, [abi.out_header.pack(abi.out_header.size + len(payload), code, 0), payload])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    def invalidate_inode(self, nodeid: int, offset: int = -1, length: int = 0) -> None:
        """Drop the kernel's cached attributes of ``nodeid`` (and its pages from ``offset``, unless -1)."""
        self._notify(abi.NOTIFY_INVAL_INODE, abi.notify_inval_inode.pack(nodeid, offset, length))

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self._notify(abi.NOTIFY_INVAL_ENTRY, abi.notify_inval_entry.pack(parent, len(name), 0) + name + b"\0")

    def open_backing(self, fd: int) -> int:
        """Register ``fd`` as a backing file for passthrough; returns its id."""
        return fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, bytearray(abi.backing_map.pack(fd, 0, 0)), True)

    def close_backing(self, backing_id: int) -> None:
        fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, array.array("I", [backing_id]), True)

    @property
    def passthrough(self) -> bool:
        return bool(self.granted & abi.PASSTHROUGH)

    # -- requests ----------------------------------------------------------------------------------

    def _handler_table(self):
        return {
            abi.LOOKUP: self._lookup,
            abi.FORGET: self._forget,
            abi.BATCH_FORGET: self._batch_forget,
            abi.GETATTR: self._getattr,
            abi.SETATTR: self._setattr,
            abi.READLINK: self._readlink,
            abi.SYMLINK: self._symlink,
            abi.MKNOD: self._mknod,
            abi.MKDIR: self._mkdir,
            abi.UNLINK: self._unlink,
            abi.RMDIR: self._rmdir,
            abi.RENAME: self._rename,
            abi.RENAME2: self._rename2,
            abi.LINK: self._link,
            abi.OPEN: self._open,
            abi.CREATE: self._create,
            abi.READ: self._read_data,
            abi.WRITE: self._write,
            abi.STATFS: self._statfs,
            abi.RELEASE: self._release,
            abi.FSYNC: self._fsync,
            abi.SETXATTR: self._setxattr,
            abi.GETXATTR: self._getxattr,
            abi.LISTXATTR: self._listxattr,
            abi.REMOVEXATTR: self._removexattr,
            abi.OPENDIR: self._opendir,
            abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdirplus,
            abi.RELEASEDIR: self._releasedir,
            abi.FSYNCDIR: self._fsyncdir,
            abi.INTERRUPT: self._interrupt,
            abi.LSEEK: self._lseek,
            abi.FALLOCATE: self._fallocate,
        }

    def _entry(self, entry: Entry | None) -> bytes:
        """An entry reply; None is a negative entry, which the kernel caches like a positive one."""
        entry_s, attr_s, entry_ns, attr_ns = self._entry_times
        if entry is None:
            return abi.entry_out.pack(0, 0, entry_s, 0, entry_ns, 0) + bytes(abi.attr.size)
        return abi.entry_out.pack(entry.nodeid, entry.generation, entry_s, attr_s, entry_ns, attr_ns) + entry.attr

    def _attr(self, attr: bytes) -> bytes:
        attr_s, attr_ns = self._attr_times
        return abi.attr_out.pack(attr_s, attr_ns, 0) + attr

    def _lookup(self, req: Request, body: memoryview) -> bytes:
        name, _ = _cstring(body)
        return self._entry(self.operations.lookup(req, req.nodeid, name))

    def _forget(self, req: Request, body: memoryview) -> None:
        (count,) = abi.forget_in.unpack_from(body)
        self.operations.forget([(req.nodeid, count)])

    def _batch_forget(self, req: Request, body: memoryview) -> None:
        (count, _) = abi.batch_forget_in.unpack_from(body)
        size = abi.forget_one.size
        base = abi.batch_forget_in.size
        self.operations.forget([abi.forget_one.unpack_from(body, base + i * size) for i in range(count)])

    def _getattr(self, req: Request, body: memoryview) -> bytes:
        flags, _, fh = abi.getattr_in.unpack_from(body)
        return self._attr(self.operations.getattr(req, req.nodeid, fh if flags & abi.GETATTR_FH else None))

    def _setattr(self, req: Request, body: memoryview) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _) = (
            abi.setattr_in.unpack_from(body)
        )
        now = time.time_ns()
        changes = SetAttr(
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            size=size if valid & abi.FATTR_SIZE else None,
            atime_ns=now if valid & abi.FATTR_ATIME_NOW else _ns(atime, atimensec) if valid & abi.FATTR_ATIME else None,
            mtime_ns=now if valid & abi.FATTR_MTIME_NOW else _ns(mtime, mtimensec) if valid & abi.FATTR_MTIME else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        return self._attr(self.operations.setattr(req, req.nodeid, fh if valid & abi.FATTR_FH else None, changes))

    def _readlink(self, req: Request, body: memoryview) -> bytes:
        return self.operations.readlink(req, req.nodeid)

    def _symlink(self, req: Request, body: memoryview) -> bytes:
        name, after = _cstring(body)
        target, _ = _cstring(body, after)
        return self._entry(self.operations.symlink(req, req.nodeid, name, target))

    def _mknod(self, req: Request, body: memoryview) -> bytes:
        mode, rdev, _, _ = abi.mknod_in.unpack_from(body)
        name, _ = _cstring(body, abi.mknod_in.size)
        return self._entry(self.operations.mknod(req, req.nodeid, name, mode, rdev))

    def _mkdir(self, req: Request, body: memoryview) -> bytes:
        mode, _ = abi.mkdir_in.unpack_from(body)
        name, _ = _cstring(body, abi.mkdir_in.size)
        return self._entry(self.operations.mkdir(req, req.nodeid, name, mode))

    def _unlink(self, req: Request, body: memoryview) -> bytes:
        self.operations.unlink(req, req.nodeid, _cstring(body)[0])
        return b""

    def _rmdir(self, req: Request, body: memoryview) -> bytes:
        self.operations.rmdir(req, req.nodeid, _cstring(body)[0])
        return b""

    def _rename(self, req: Request, body: memoryview) -> bytes:
        (newdir,) = abi.rename_in.unpack_from(body)
        return self._renamed(req, body, abi.rename_in.size, newdir, 0)

    def _rename2(self, req: Request, body: memoryview) -> bytes:
        newdir, flags, _ = abi.rename2_in.unpack_from(body)
        return self._renamed(req, body, abi.rename2_in.size, newdir, flags)

    def _renamed(self, req: Request, body: memoryview, start: int, newdir: int, flags: int) -> bytes:
        old, after = _cstring(body, start)
        new, _ = _cstring(body, after)
        self.operations.rename(req, req.nodeid, old, newdir, new, flags)
        return b""

    def _link(self, req: Request, body: memoryview) -> bytes:
        (oldnodeid,) = abi.link_in.unpack_from(body)
        name, _ = _cstring(body, abi.link_in.size)
        return self._entry(self.operations.link(req, oldnodeid, req.nodeid, name))

    def _open(self, req: Request, body: memoryview) -> bytes:
        flags, open_flags = abi.open_in.unpack_from(body)
        opened = self.operations.open(req, req.nodeid, flags, bool(open_flags & abi.OPEN_KILL_SUIDGID))
        return abi.open_out.pack(opened.fh, opened.flags, opened.backing_id)

    def _create(self, req: Request, body: memoryview) -> bytes:
        flags, mode, _, _ = abi.create_in.unpack_from(body)
        name, _ = _cstring(body, abi.create_in.size)
        entry, opened = self.operations.create(req, req.nodeid, name, flags, mode)
        return self._entry(entry) + abi.open_out.pack(opened.fh, opened.flags, opened.backing_id)

    def _read_data(self, req: Request, body: memoryview) -> bytes:
        fh, offset, size, *_ = abi.read_in.unpack_from(body)
        return self.operations.read(req, fh, offset, size)

    def _write(self, req: Request, body: memoryview) -> bytes:
        fh, offset, size, write_flags, *_ = abi.write_in.unpack_from(body)
        start = abi.write_in.size
        written = self.operations.write(
            req, fh, offset, body[start : start + size], bool(write_flags & abi.WRITE_KILL_SUIDGID)
        )
        return abi.write_out.pack(written, 0)

    def _statfs(self, req: Request, body: memoryview) -> bytes:
        v = self.operations.statfs(req, req.nodeid)
        return abi.statfs_out.pack(
            v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize
        )

    def _release(self, req: Request, body: memoryview) -> bytes:
        fh, *_ = abi.release_in.unpack_from(body)
        self.operations.release(req, fh)
        return b""

    def _fsync(self, req: Request, body: memoryview) -> bytes:
        fh, flags, _ = abi.fsync_in.unpack_from(body)
        self.operations.fsync(req, fh, bool(flags & 1))
        return b""

    def _setxattr(self, req: Request, body: memoryview) -> bytes:
        size, flags = abi.setxattr_in.unpack_from(body)
        name, after = _cstring(body, abi.setxattr_in.size)
        self.operations.setxattr(req, req.nodeid, name, bytes(body[after : after + size]), flags)
        return b""

    def _getxattr(self, req: Request, body: memoryview) -> bytes:
        size, _ = abi.getxattr_in.unpack_from(body)
        name, _ = _cstring(body, abi.getxattr_in.size)
        return _sized(self.operations.getxattr(req, req.nodeid, name), size)

    def _listxattr(self, req: Request, body: memoryview) -> bytes:
        size, _ = abi.getxattr_in.unpack_from(body)
        names = self.operations.listxattr(req, req.nodeid)
        return _sized(b"".join(name + b"\0" for name in names), size)

    def _removexattr(self, req: Request, body: memoryview) -> bytes:
        self.operations.removexattr(req, req.nodeid, _cstring(body)[0])
        return b""

    def _opendir(self, req: Request, body: memoryview) -> bytes:
        flags, _ = abi.open_in.unpack_from(body)
        opened = self.operations.opendir(req, req.nodeid, flags)
        return abi.open_out.pack(opened.fh, opened.flags, 0)

    def _readdir(self, req: Request, body: memoryview) -> bytes:
        fh, offset, size, *_ = abi.read_in.unpack_from(body)
        out = bytearray()
        for name, ino, kind, next_offset in self.operations.readdir(req, req.nodeid, fh, offset):
            record = _dirent(name, ino, kind, next_offset)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _readdirplus(self, req: Request, body: memoryview) -> bytes:
        fh, offset, size, *_ = abi.read_in.unpack_from(body)
        out = bytearray()
        blank = bytes(abi.ENTRY_OUT_SIZE)
        for name, ino, kind, next_offset in self.operations.readdir(req, req.nodeid, fh, offset):
            record = _dirent(name, ino, kind, next_offset)
            if len(out) + abi.ENTRY_OUT_SIZE + len(record) > size:
                break
            # The kernel counts a lookup for every entry but "." and "..": look up only what is sent.
            if name in (b".", b".."):
                out += blank
            else:
                try:
                    entry = self.operations.lookup(req, req.nodeid, name)
                except OSError:
                    entry = None  # gone since the listing was taken
                if entry is None:
                    continue
                out += self._entry(entry)
            out += record
        return bytes(out)

    def _releasedir(self, req: Request, body: memoryview) -> bytes:
        fh, *_ = abi.release_in.unpack_from(body)
        self.operations.releasedir(req, fh)
        return b""

    def _fsyncdir(self, req: Request, body: memoryview) -> bytes:
        fh, flags, _ = abi.fsync_in.unpack_from(body)
        self.operations.fsyncdir(req, req.nodeid, bool(flags & 1))
        return b""

    def _interrupt(self, req: Request, body: memoryview) -> bytes | None:
        (unique,) = abi.interrupt_in.unpack_from(body)
        target = self._in_flight.get(unique)
        if target is None:
            # Not seen yet (another thread is about to take it) or answered already: EAGAIN makes the
            # kernel send the interrupt again while the request is still pending.
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        target.interrupted = True
        return None

    def _lseek(self, req: Request, body: memoryview) -> bytes:
        fh, offset, whence, _ = abi.lseek_in.unpack_from(body)
        return abi.lseek_out.pack(self.operations.lseek(req, fh, offset, whence))

    def _fallocate(self, req: Request, body: memoryview) -> bytes:
        fh, offset, length, mode, _ = abi.fallocate_in.unpack_from(body)
        self.operations.fallocate(req, fh, offset, length, mode)
        return b""


# Where the name starts in the bodies of requests that carry one: for --debug.
_NAME_AT = {
    abi.LOOKUP: 0,
    abi.UNLINK: 0,
    abi.RMDIR: 0,
    abi.SYMLINK: 0,
    abi.REMOVEXATTR: 0,
    abi.MKNOD: abi.mknod_in.size,
    abi.MKDIR: abi.mkdir_in.size,
    abi.CREATE: abi.create_in.size,
    abi.RENAME: abi.rename_in.size,
    abi.RENAME2: abi.rename2_in.size,
    abi.LINK: abi.link_in.size,
    abi.SETXATTR: abi.setxattr_in.size,
    abi.GETXATTR: abi.getxattr_in.size,
}


def _named(opcode: int, body: memoryview) -> str:
    start = _NAME_AT.get(opcode)
    if start is None:
        return ""
    try:
        return " " + repr(os.fsdecode(_cstring(body, start)[0]))
    except ValueError:
        return ""


def _ns(seconds: int, nanoseconds: int) -> int:
    if seconds >= 1 << 63:
        seconds -= 1 << 64
    return seconds * 1_000_000_000 + nanoseconds


def _sized(value: bytes, size: int) -> bytes:
    """An xattr answer: the length alone when asked with size 0, ERANGE when it does not fit."""
    if size == 0:
        return abi.getxattr_out.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    return value


def _dirent(name: bytes, ino: int, kind: int, offset: int) -> bytes:
    padding = -len(name) % 8
    return abi.dirent.pack(ino, offset, len(name), kind) + name + b"\0" * padding
