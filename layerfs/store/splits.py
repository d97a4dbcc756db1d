"""A layer blob kept as its tar's framing alone: the headers, padding and end blocks, with the data of each
regular file read back from the unpacked layer when the blob's bytes are asked for (a save, a push).

A root filesystem tar imported into the store would otherwise be written twice, once unpacked and once as
its blob, which doubles what an import writes to disk. The framing is a few percent of the tar, and the
tar it gives back is the very same bytes (docker and containers/storage keep layers the same way, as
"tar-split" files). The bytes are hashed as they are put back together, so a layer changed on disk is an
error, never a wrong blob.

The file: one line of JSON (the blob's size and its segments in order: a number is that many bytes of
framing, taken in turn from what follows the line; ``[path, size]`` is a file's data in the layer), then
the framing's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from ..core import confined
from ..errors import LayerfsError
from ..oci.unpack import DataRef

_BLOCK = 1 << 20


def write(tar_fd: int, size: int, data: Sequence[DataRef], out: str) -> None:
    """The split of the tar open at ``tar_fd`` (``size`` bytes; ``data`` its files' data, in order) written
    to the new file ``out``. (Not synced: ``Incoming.adopt`` syncs everything at once before it names it.)"""
    segments: list[int | list] = []
    framing = bytearray()

    def take(start: int, end: int) -> None:
        if end > start:
            chunk = os.pread(tar_fd, end - start, start)
            if len(chunk) != end - start:
                raise LayerfsError("the tar changed while it was imported")
            framing.extend(chunk)
            segments.append(end - start)

    at = 0
    for offset, length, path in data:
        take(at, offset)
        segments.append([path, length])
        at = offset + length
    take(at, size)
    with open(out, "wb") as f:
        f.write(json.dumps({"size": size, "segments": segments}).encode() + b"\n")
        f.write(framing)


def describe(split: str) -> tuple[int, bytes]:
    """The blob's size and its first bytes (what tells whether a blob is compressed)."""
    with open(split, "rb") as f:
        head = json.loads(f.readline())
        return head["size"], f.read(512)


def rebuild(split: str, layer: str, digest: str, out_fd: int) -> None:
    """Blob ``digest`` put back together into ``out_fd`` from ``split`` and the unpacked ``layer``; a
    LayerfsError if it does not come out as ``digest``."""
    sha = hashlib.sha256()
    layer_fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open(split, "rb") as f:
            head = json.loads(f.readline())
            for segment in head["segments"]:
                if isinstance(segment, int):
                    _copy(f.read(segment), segment, sha, out_fd)
                else:
                    path, length = segment
                    _copy_file(path, length, layer_fd, sha, out_fd)
    finally:
        os.close(layer_fd)
    if f"sha256:{sha.hexdigest()}" != digest:
        raise LayerfsError(f"blob {digest}: its layer changed on disk since it was imported")


def _copy(data: bytes, length: int, sha: hashlib._Hash, out_fd: int) -> None:
    if len(data) != length:
        raise LayerfsError("a layer's stored tar framing is cut short")
    sha.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(out_fd, view) :]


def _copy_file(path: str, length: int, layer_fd: int, sha: hashlib._Hash, out_fd: int) -> None:
    try:
        fd = confined.open_beneath(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=layer_fd)
    except OSError as e:
        raise LayerfsError(f"a layer's file {path} cannot be read back: {e.strerror}") from None
    try:
        left = length
        while left:
            chunk = os.read(fd, min(left, _BLOCK))
            if not chunk:
                break
            _copy(chunk, len(chunk), sha, out_fd)
            left -= len(chunk)
        if left:
            raise LayerfsError(f"a layer's file {path} is shorter than when it was imported")
    finally:
        os.close(fd)
