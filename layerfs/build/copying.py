"""COPY and ADD's work: files put into a mounted rootfs, as docker puts them.

A source directory's contents go into the destination (not the directory itself); a file goes to the
destination, or into it where it is a directory (a destination ending in ``/``, one that exists as a
directory, or several sources). Entries keep their mode, times and hard links among them; they belong to
``owner`` (root for the context, the source's own owner for ``--from``, ``--chown``'s) and take
``--chmod``'s mode, and their xattrs. ``ADD`` unpacks a local tar (plain, gzip, bzip2 or xz) into the destination. Paths
in the rootfs are resolved as the container would see them: its symlinks followed inside it, never out
to the host.
"""

from __future__ import annotations

import os
import shutil
import stat

from ..core.copyup import copy_xattrs
from ..errors import LayerfsError
from ..tarfilters import tarfile
from .context import resolve_in_root


class Copy:
    def __init__(self, rootfs: str, owner: tuple[int, int] | None, mode: int | None) -> None:
        self.rootfs = rootfs
        self.owner = owner  # None: each entry's own
        self.mode = mode  # None: each entry's own
        self._links: dict[tuple[int, int], str] = {}  # a source file's (dev, ino) -> where it was copied

    def host_path(self, path: str) -> str:
        """Where container path ``path`` is on the host: its parent resolved inside the rootfs."""
        parent, name = os.path.split(path.rstrip("/") or "/")
        resolved = resolve_in_root(self.rootfs, parent)
        return os.path.join(self.rootfs, resolved, name) if name else os.path.join(self.rootfs, resolved)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(os.path.join(self.rootfs, resolve_in_root(self.rootfs, path)))

    def make_dirs(self, path: str) -> None:
        """Container directory ``path`` and its missing parents, made as root with mode 0755 (docker's),
        symlinks on the way followed inside the rootfs (one to a missing directory makes that)."""
        done = ""
        for name in [p for p in path.split("/") if p]:
            done = f"{done}/{name}"
            real = os.path.join(self.rootfs, resolve_in_root(self.rootfs, done))
            if not os.path.lexists(real):
                os.mkdir(real, 0o755)
            elif not stat.S_ISDIR(os.lstat(real).st_mode):
                raise LayerfsError(f"{done}: not a directory in the image")

    def tree(self, source_root: str, paths: list[str], dest: str) -> None:
        """``paths`` (a source entry and what is below it, relative to ``source_root``, parents first) copied
        to container path ``dest``: the first is ``dest`` itself, the rest go below it."""
        top = paths[0]
        directories: list[tuple[str, os.stat_result]] = []
        for path in paths:
            below = os.path.relpath(path, top)
            target = dest if below == "." else f"{dest.rstrip('/')}/{below}"
            st = self.entry(os.path.join(source_root, path), target, chmod=below != "." or len(paths) == 1)
            if st is not None and stat.S_ISDIR(st.st_mode):
                directories.append((target, st))
        for target, st in reversed(directories):  # times last: filling a directory changes its mtime
            os.utime(self.host_path(target), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def entry(self, source: str, dest: str, *, chmod: bool = True) -> os.stat_result | None:
        """The one entry ``source`` (a host path) copied to container path ``dest``; its stat, or None for a
        directory copied onto one the image has, which stays as it is. ``chmod``: whether ``--chmod``
        applies (not to the directory a source directory's contents go into, as Buildah has it)."""
        st = os.lstat(source)
        host = self.host_path(dest)
        existing = os.lstat(host) if os.path.lexists(host) else None
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and stat.S_ISDIR(st.st_mode)):
            if stat.S_ISDIR(existing.st_mode):
                shutil.rmtree(host)
            else:
                os.unlink(host)
        if stat.S_ISDIR(st.st_mode):
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                return None
            os.mkdir(host, 0o700)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), host)
        elif stat.S_ISREG(st.st_mode):
            first = self._links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None:
                os.link(first, host)
                return st
            with open(source, "rb") as src, open(host, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            self._links[(st.st_dev, st.st_ino)] = host
        else:
            os.mknod(host, st.st_mode, st.st_rdev)
        uid, gid = self.owner if self.owner is not None else (st.st_uid, st.st_gid)
        os.chown(host, uid, gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(host, self.mode if self.mode is not None and chmod else stat.S_IMODE(st.st_mode))
        copy_xattrs(source, host, src_dir_fd=None, dst_dir_fd=None)  # (after chown, which drops capabilities)
        os.utime(host, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return st

    def unpack(self, archive: str, dest: str) -> None:
        """ADD's local tar unpacked into container directory ``dest``, owners and modes as the tar has them."""
        host = self.host_path(dest)
        with tarfile.open(archive) as tar:
            tar.extractall(host, numeric_owner=True, filter=_inside)


def is_archive(path: str) -> bool:
    """Whether ADD unpacks ``path``: a regular file tarfile can read (plain, gzip, bzip2, xz)."""
    return stat.S_ISREG(os.lstat(path).st_mode) and tarfile.is_tarfile(path)  # (a symlink is copied, not read)


def _inside(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" filter's refusals (absolute names, ``..``, links out of ``dest``), with the member's
    mode kept whole, as docker unpacks it."""
    tarfile.tar_filter(member, dest)
    return member
