"""A tiny passthrough filesystem over layerfs.fuse, to test the protocol layer on its own.

It mirrors one directory. Nodes are kept by the real (dev, ino), so hard links share a node, as in the
union. Run as ``python -m tests.passthroughfs SOURCE MOUNTPOINT [--nopassthrough] [--threads N]``; it
writes "ready" to stdout once mounted.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import stat
import sys
import threading

from layerfs.fuse import Config, Entry, Opened, Operations, Request, Session, SetAttr, abi, pack_attr


class PassthroughFS(Operations):
    def __init__(self, source: str) -> None:
        self.root = os.path.abspath(source)
        self.paths: dict[int, str] = {abi.ROOT_ID: self.root}
        self.ids: dict[tuple[int, int], int] = {}
        self.counts: dict[int, int] = {}
        self.files: dict[int, int] = {}
        self.backing: dict[int, tuple[int, int]] = {}  # nodeid -> (backing id, open count)
        self.node_of_fh: dict[int, int] = {}
        self.dirs: dict[int, list] = {}
        self.numbers = itertools.count(2)
        self.lock = threading.Lock()
        self.session: Session | None = None

    def _path(self, nodeid: int, name: bytes | None = None) -> str:
        base = self.paths[nodeid]
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def _entry(self, path: str) -> Entry:
        st = os.lstat(path)
        key = (st.st_dev, st.st_ino)
        with self.lock:
            nodeid = self.ids.get(key)
            if nodeid is None:
                nodeid = self.ids[key] = next(self.numbers)
            self.paths[nodeid] = path
            self.counts[nodeid] = self.counts.get(nodeid, 0) + 1
        return Entry(nodeid, pack_attr(st.st_ino, st, st.st_nlink, st.st_uid, st.st_gid))

    def lookup(self, req, parent, name):
        try:
            return self._entry(self._path(parent, name))
        except FileNotFoundError:
            return None

    def forget(self, nodes):
        with self.lock:
            for nodeid, count in nodes:
                self.counts[nodeid] -= count
                if self.counts[nodeid] <= 0:
                    del self.counts[nodeid]
                    path = self.paths.pop(nodeid)
                    self.ids = {k: v for k, v in self.ids.items() if v != nodeid} if path else self.ids

    def getattr(self, req, nodeid, fh):
        st = os.fstat(self.files[fh]) if fh is not None else os.lstat(self._path(nodeid))
        return pack_attr(st.st_ino, st, st.st_nlink, st.st_uid, st.st_gid)

    def setattr(self, req, nodeid, fh, changes: SetAttr):
        path = self._path(nodeid)
        if changes.size is not None:
            os.truncate(self.files[fh] if fh is not None else path, changes.size)
        if changes.uid is not None or changes.gid is not None:
            os.chown(
                path,
                -1 if changes.uid is None else changes.uid,
                -1 if changes.gid is None else changes.gid,
                follow_symlinks=False,
            )
        if changes.mode is not None:
            os.chmod(path, stat.S_IMODE(changes.mode))
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            st = os.lstat(path)
            os.utime(
                path,
                ns=(
                    changes.atime_ns if changes.atime_ns is not None else st.st_atime_ns,
                    changes.mtime_ns if changes.mtime_ns is not None else st.st_mtime_ns,
                ),
                follow_symlinks=False,
            )
        return self.getattr(req, nodeid, None)

    def readlink(self, req, nodeid):
        return os.fsencode(os.readlink(self._path(nodeid)))

    def _owned(self, req: Request, path: str) -> Entry:
        os.chown(path, req.uid, req.gid, follow_symlinks=False)
        return self._entry(path)

    def mkdir(self, req, parent, name, mode):
        path = self._path(parent, name)
        os.mkdir(path, mode)
        return self._owned(req, path)

    def mknod(self, req, parent, name, mode, rdev):
        path = self._path(parent, name)
        os.mknod(path, mode, rdev)
        return self._owned(req, path)

    def symlink(self, req, parent, name, target):
        path = self._path(parent, name)
        os.symlink(target, path)
        return self._owned(req, path)

    def link(self, req, nodeid, newparent, newname):
        path = self._path(newparent, newname)
        os.link(self._path(nodeid), path)
        return self._entry(path)

    def unlink(self, req, parent, name):
        os.unlink(self._path(parent, name))

    def rmdir(self, req, parent, name):
        os.rmdir(self._path(parent, name))

    def rename(self, req, parent, name, newparent, newname, flags):
        if flags:
            raise OSError(errno.EINVAL, "rename flags")
        old, new = self._path(parent, name), self._path(newparent, newname)
        os.rename(old, new)
        with self.lock:
            for nodeid, path in list(self.paths.items()):
                if path == old or path.startswith(old + "/"):
                    self.paths[nodeid] = new + path[len(old) :]

    def _opened(self, nodeid: int, fd: int) -> Opened:
        with self.lock:
            self.files[fd] = fd
            self.node_of_fh[fd] = nodeid
            if self.session is None or not self.session.passthrough:
                return Opened(fd, abi.FOPEN_KEEP_CACHE)
            backing, count = self.backing.get(nodeid, (0, 0))
            if not count:
                # Every open of the node shares this backing file, so it must take writes too.
                try:
                    backing_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                except OSError:
                    backing_fd = os.dup(fd)
                backing = self.session.open_backing(backing_fd)
                os.close(backing_fd)  # the kernel holds the file now
            self.backing[nodeid] = (backing, count + 1)
            return Opened(fd, abi.FOPEN_PASSTHROUGH, backing)

    def open(self, req, nodeid, flags, kill_suidgid):
        fd = os.open(self._path(nodeid), (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY) & 0o17777777) | os.O_CLOEXEC)
        return self._opened(nodeid, fd)

    def create(self, req, parent, name, flags, mode):
        path = self._path(parent, name)
        fd = os.open(path, (flags & 0o17777777) | os.O_CREAT | os.O_CLOEXEC, mode)
        os.fchown(fd, req.uid, req.gid)
        entry = self._entry(path)
        return entry, self._opened(entry.nodeid, fd)

    def read(self, req, fh, offset, size):
        return os.pread(self.files[fh], size, offset)

    def write(self, req, fh, offset, data, kill_suidgid):
        return os.pwrite(self.files[fh], data, offset)

    def release(self, req, fh):
        with self.lock:
            fd = self.files.pop(fh)
            nodeid = self.node_of_fh.pop(fh)
            if nodeid in self.backing:
                backing, count = self.backing.pop(nodeid)
                if count > 1:
                    self.backing[nodeid] = (backing, count - 1)
                else:
                    self.session.close_backing(backing)
        os.close(fd)

    def fsync(self, req, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(self.files[fh])

    def statfs(self, req, nodeid):
        return os.statvfs(self.root)

    def getxattr(self, req, nodeid, name):
        return os.getxattr(self._path(nodeid), os.fsdecode(name), follow_symlinks=False)

    def listxattr(self, req, nodeid):
        return [os.fsencode(n) for n in os.listxattr(self._path(nodeid), follow_symlinks=False)]

    def setxattr(self, req, nodeid, name, value, flags):
        os.setxattr(self._path(nodeid), os.fsdecode(name), value, flags, follow_symlinks=False)

    def removexattr(self, req, nodeid, name):
        os.removexattr(self._path(nodeid), os.fsdecode(name), follow_symlinks=False)

    def opendir(self, req, nodeid, flags):
        path = self._path(nodeid)
        entries = [(b".", 1, stat.S_IFDIR >> 12), (b"..", 1, stat.S_IFDIR >> 12)]
        with os.scandir(path) as it:
            for e in it:
                kind = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12
                entries.append((os.fsencode(e.name), e.inode(), kind))
        with self.lock:
            fh = next(self.numbers)
            self.dirs[fh] = entries
        return Opened(fh, abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE)

    def readdir(self, req, nodeid, fh, offset):
        for index, (name, ino, kind) in enumerate(self.dirs[fh][offset:], offset + 1):
            yield name, ino, kind, index

    def releasedir(self, req, fh):
        self.dirs.pop(fh, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--nopassthrough", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fs = PassthroughFS(args.source)
    session = Session(
        fs,
        args.mountpoint,
        Config(
            fsname="passthroughfs", subtype="passthroughfs", passthrough=not args.nopassthrough, threads=args.threads
        ),
    )
    fs.session = session
    session.mount()

    def ready() -> None:
        print("ready", " ".join(sorted(n for b, n in abi.INIT_FLAG_NAMES.items() if session.granted & b)), flush=True)

    session.run(on_ready=ready)
    stats = session.stats()
    print("stats", " ".join(f"{k}={v}" for k, v in stats.counts.items()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
