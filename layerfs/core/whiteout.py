"""On-disk markers of a layered filesystem: whiteouts, opaque directories and private xattrs.

Two formats are met in the wild and both are read:

- overlay (kernel overlayfs, fuse-overlayfs, containers-storage with kernel overlay): a whiteout is a
  character device 0/0 with the deleted name; an opaque directory carries the xattr
  ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` when overlay runs with ``userxattr``,
  ``user.fuseoverlayfs.opaque`` from an unprivileged fuse-overlayfs).
- OCI/AUFS (image layer tars, containers-storage layers for a mount program): a whiteout is an empty file
  ``.wh.NAME``; an opaque directory contains ``.wh..wh..opq``.

layerfs writes the overlay form, so an upper it wrote mounts with kernel overlayfs unchanged; it falls
back to the OCI form only where creating a device node is not permitted (no CAP_MKNOD). A mount chooses
its forms once (``forms.py``).

Every magic name and xattr lives here, so nothing else in the code base spells them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from . import xattr

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# fuse-overlayfs writes this 0/0 device beside the xattr in opaque dirs; it is a whiteout-shaped marker.
FUSE_OVERLAYFS_OPAQUE = ".wh..opq"

OPAQUE_XATTR_TRUSTED = "trusted.overlay.opaque"
OPAQUE_XATTR_USER = "user.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR_TRUSTED, OPAQUE_XATTR_USER, "user.fuseoverlayfs.opaque")

# Xattr namespaces that belong to overlay implementations, not to the files: never shown in the merged
# view, never settable through it, never copied up.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def is_whiteout_stat(st: os.stat_result) -> bool:
    """True for an overlay-form whiteout: a character device with device number 0/0."""
    return is_whiteout_device(st.st_mode, st.st_rdev)


def is_whiteout_device(mode: int, rdev: int) -> bool:
    return stat.S_ISCHR(mode) and rdev == 0


def oci_whiteout_name(name: str) -> str:
    """The OCI-form whiteout file that hides ``name`` in the same directory."""
    return WHITEOUT_PREFIX + name


def is_marker_name(name: str) -> bool:
    """Names that are bookkeeping, never entries of the merged view (``.wh.*`` in any layer)."""
    return name.startswith(WHITEOUT_PREFIX)


def whited_out_name(name: str) -> str | None:
    """For an OCI whiteout file name ``.wh.X`` return ``X``; None for opaque markers and other names."""
    if not name.startswith(WHITEOUT_PREFIX) or name in (OPAQUE_MARKER, FUSE_OVERLAYFS_OPAQUE):
        return None
    hidden = name[len(WHITEOUT_PREFIX) :]
    return hidden or None


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


@contextlib.contextmanager
def _directory(path: str, dir_fd: int | None) -> Iterator[int]:
    """The directory at ``path`` opened, so that names in it are reached without a longer path."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _opaque_xattr(fd: int) -> bool:
    present = xattr.known_names(fd)  # (most directories have none: one call, and no error for each name)
    wanted = OPAQUE_XATTRS if present is None else [attr for attr in OPAQUE_XATTRS if attr in present]
    for attr in wanted:
        try:
            if os.getxattr(fd, attr) == b"y":
                return True
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return False


def has_opaque_xattr(path: str, *, dir_fd: int | None = None) -> bool:
    """True when the directory at ``path`` carries an overlay opaque xattr set to ``y``."""
    with _directory(path, dir_fd) as fd:
        return _opaque_xattr(fd)


def is_opaque_dir(path: str, *, dir_fd: int | None = None) -> bool:
    """True when the directory at ``path`` hides the layers below it, in either form."""
    with _directory(path, dir_fd) as fd:
        try:
            os.lstat(OPAQUE_MARKER, dir_fd=fd)
            return True
        except FileNotFoundError:
            return _opaque_xattr(fd)


def make_whiteout(path: str, *, dir_fd: int | None = None, device: bool = True) -> None:
    """Create a whiteout at ``path`` (which must not exist): overlay form, else (or without ``device``)
    OCI form.

    The OCI form is used only where mknod is refused (an unprivileged daemon); kernel overlayfs cannot
    read it, but layerfs and every OCI tool can.
    """
    if device:
        try:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
            return
        except PermissionError:
            pass
    head, _, name = path.rpartition("/")
    with _directory(head or ".", dir_fd) as fd:
        os.close(
            os.open(oci_whiteout_name(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o000, dir_fd=fd)
        )


def mark_opaque(path: str, *, dir_fd: int | None = None, xattrs: tuple[str, ...] = OPAQUE_XATTRS[:2]) -> None:
    """Mark the directory at ``path`` opaque: the first of ``xattrs`` that can be set (trusted, else user),
    else the OCI marker file."""
    with _directory(path, dir_fd) as fd:
        for attr in xattrs:
            try:
                os.setxattr(fd, attr, b"y")
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        os.close(os.open(OPAQUE_MARKER, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000, dir_fd=fd))


def clear_opaque(path: str, *, dir_fd: int | None = None) -> None:
    """Remove every opaque mark from the directory at ``path``."""
    with _directory(path, dir_fd) as fd:
        for attr in OPAQUE_XATTRS:
            try:
                os.removexattr(fd, attr)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        for marker in (OPAQUE_MARKER, FUSE_OVERLAYFS_OPAQUE):
            try:
                os.unlink(marker, dir_fd=fd)
            except FileNotFoundError:
                pass
