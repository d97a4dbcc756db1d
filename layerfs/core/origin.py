"""Where a copied-up entry came from, recorded as kernel overlayfs records it, so that it keeps its number.

A copy-up writes ``trusted.overlay.origin`` on the copy: the lower entry's file handle in the kernel's
``struct ovl_fb`` form (version 0, magic 0xfb, length, flags, handle type, the lower filesystem's UUID,
then the handle ``name_to_handle_at`` gives). Kernel overlayfs writes the same and reports a copied-up
entry's inode number from it, so the number an entry shows survives an unmount and a remount with
either implementation. The UUID is the lower filesystem's, as the kernel writes it by default (all zeros
where that filesystem tells none, or with the kernel's ``uuid=null``, where the lower is on the upper's
filesystem: both are read). The kernel also marks the copy's directory "impure" (it holds entries
whose numbers are not their own), which tells a listing to look those entries' origins up.

A record is resolved back to the lower entry with ``open_by_handle_at`` (CAP_DAC_READ_SEARCH): without
it, or when the entry is gone, the copy shows its own number, as on the kernel when an origin does not
decode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator

from .. import syscalls
from . import xattr
from .layer import Layer

ORIGIN_XATTRS = ("trusted.overlay.origin", "user.overlay.origin")
IMPURE_XATTRS = ("trusted.overlay.impure", "user.overlay.impure")
_HEADER = struct.Struct("<BBBBB16s")  # version, magic, length, flags, handle type, UUID
_VERSION, _MAGIC = 0, 0xFB
_NULL_UUID = bytes(16)


class Origins:
    """The origin records of one union's upper layer: made at copy-up, read back into lower entries."""

    def __init__(self, upper: Layer, lowers: list[Layer]) -> None:
        self._upper = upper
        self._lowers = lowers
        self._uuids: dict[int, bytes] = {}  # dev -> its filesystem's UUID

    def _uuid(self, layer: Layer) -> bytes:
        uuid = self._uuids.get(layer.dev)
        if uuid is None:
            with self._readable(layer) as fd:
                uuid = self._uuids[layer.dev] = syscalls.filesystem_uuid(fd)
        return uuid

    @staticmethod
    @contextlib.contextmanager
    def _readable(layer: Layer) -> Iterator[int]:
        """A readable descriptor on ``layer``'s filesystem (the layer's own is O_PATH), opened for a
        moment: a mount's descriptors do not grow with its use."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def record(self, layer: Layer, rel: str) -> bytes | None:
        """The origin record of the lower entry ``rel`` of ``layer``; None where its filesystem gives no
        handles."""
        try:
            handle_type, handle = syscalls.file_handle(rel, dir_fd=layer.fd)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW, errno.ENOSYS):
                return None
            raise
        length = _HEADER.size + len(handle)
        return _HEADER.pack(_VERSION, _MAGIC, length, 0, handle_type, self._uuid(layer)) + handle

    def has_record(self, rel: str) -> bool:
        """Whether the upper entry ``rel`` carries an origin record."""
        parent, name = self._upper.near(rel)
        return xattr.get_first(name, ORIGIN_XATTRS, dir_fd=parent.fd) is not None

    @staticmethod
    def mark_impure(path: str, *, dir_fd: int) -> None:
        """Mark the upper directory ``path`` as holding entries with origins, unless it is already."""
        if xattr.get_first(path, IMPURE_XATTRS, dir_fd=dir_fd) != b"y":
            xattr.set_first(path, IMPURE_XATTRS, b"y", dir_fd=dir_fd)

    @staticmethod
    def is_impure(layer: Layer, path: str) -> bool:
        """Whether the upper directory at ``path`` is marked as holding entries with origins."""
        parent, name = layer.near(Layer.rel(path))
        return xattr.get_first(name, IMPURE_XATTRS, dir_fd=parent.fd) == b"y"

    def lower_of(self, rel: str) -> os.stat_result | None:
        """The lstat of the lower entry the upper entry ``rel`` was copied from; None when it has no
        record, or one that names nothing in a lower layer's filesystem."""
        parent, name = self._upper.near(rel)
        value = xattr.get_first(name, ORIGIN_XATTRS, dir_fd=parent.fd)
        if value is None or len(value) < _HEADER.size:
            return None
        version, magic, length, _flags, handle_type, uuid = _HEADER.unpack_from(value)
        if (version, magic) != (_VERSION, _MAGIC) or length != len(value):
            return None
        for layer in {layer.dev: layer for layer in self._lowers}.values():  # one try per filesystem
            if uuid != self._uuid(layer) and not (uuid == _NULL_UUID and layer.dev == self._upper.dev):
                continue
            try:
                with self._readable(layer) as mount_fd:
                    fd = syscalls.open_by_handle(
                        mount_fd, handle_type, value[_HEADER.size :], os.O_PATH | os.O_NOFOLLOW
                    )
            except OSError as e:
                if e.errno in (errno.ESTALE, errno.ENOENT, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                    continue
                raise
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        return None
