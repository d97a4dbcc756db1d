"""Blobs as a registry holds them: ``STORE/blobs/sha256/<hex>``, each image's manifest, config and layers
byte for byte as they came (compressed or not), so an image saved or pushed unchanged keeps its digests.
An imported root filesystem tar is kept as its framing alone, ``STORE/blobs/split/<hex>`` (``splits.py``):
its bytes come back from its unpacked layer.

New blobs are first written into a staging directory (in the store's scratch space), hashed as they are
written, and get their name only when the whole image is in: a rename, so a reader never sees a partial
blob and an interrupted command adds none.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO, NamedTuple

from ..errors import LayerfsError
from ..oci.layout import checked_digest
from .root import Root

_BLOCK = 1 << 20


class Staged(NamedTuple):
    digest: str
    size: int
    path: str  # in the staging directory


class BlobWriter:
    """A new blob written into ``directory``, hashed as it goes; ``finish`` names it by its digest there."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._tmp = os.path.join(directory, f".{os.urandom(16).hex()}.part")
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def finish(self, expected: str | None = None) -> Staged:
        """The blob, named ``<hex>`` in the directory; a LayerfsError if it is not ``expected``."""
        self._f.close()
        digest = f"sha256:{self._hash.hexdigest()}"
        if expected is not None and digest != expected:
            os.unlink(self._tmp)
            raise LayerfsError(f"blob {expected}: its content does not match its digest")
        final = os.path.join(self.directory, digest.removeprefix("sha256:"))
        os.replace(self._tmp, final)
        return Staged(digest, self.size, final)

    def discard(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


class Tee:
    """A stream read through: what is read from ``stream`` is also written to ``out`` (a BlobWriter), so a
    layer is unpacked and kept as a blob in one pass."""

    def __init__(self, stream: BinaryIO, out: BlobWriter) -> None:
        self._stream, self._out = stream, out

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._out.write(data)
        return data

    def drain(self) -> None:
        """Read what the reader left (nothing, as a rule), so the blob is the whole stream."""
        while self.read(_BLOCK):
            pass


def copy_into(stream: BinaryIO, directory: str, expected: str | None = None) -> Staged:
    """``stream`` written whole as a blob into ``directory`` (checked against ``expected``)."""
    out = BlobWriter(directory)
    try:
        Tee(stream, out).drain()
        return out.finish(expected)
    except BaseException:
        out.discard()
        raise


class Blobs:
    def __init__(self, root: Root) -> None:
        self.dir = root.sub("blobs", "sha256")
        self.split_dir = root.sub("blobs", "split")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.split_dir, exist_ok=True)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, checked_digest(digest, "blob").removeprefix("sha256:"))

    def split_path(self, digest: str) -> str:
        """Where blob ``digest`` is kept as a split (``splits.py``), if it is."""
        return os.path.join(self.split_dir, checked_digest(digest, "blob").removeprefix("sha256:"))

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path(digest)) or os.path.isfile(self.split_path(digest))

    def digests(self) -> list[str]:
        names = {name for d in (self.dir, self.split_dir) for name in os.listdir(d) if not name.startswith(".")}
        return [f"sha256:{name}" for name in sorted(names)]

    def read(self, digest: str) -> bytes:
        try:
            with open(self.path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise LayerfsError(f"blob {digest} is missing from the store") from None

    def adopt(self, staged: str, digest: str, *, split: bool = False) -> None:
        """(Holding the lock.) The checked blob at ``staged`` (in the scratch space), or its split, becomes
        blob ``digest``."""
        if self.has(digest):
            os.unlink(staged)
        else:
            os.replace(staged, self.split_path(digest) if split else self.path(digest))

    def remove(self, digest: str) -> None:
        """(Holding the lock.) Blob ``digest`` gone; whether an image still uses it is the caller's to ask."""
        for path in (self.path(digest), self.split_path(digest)):
            if os.path.isfile(path):
                os.unlink(path)
