"""An image coming into the store (imported, pulled or committed): its blobs and new layers gathered in a
directory of the scratch space, each layer unpacked once, then all named in one go (``adopt``), so an
interrupted command leaves the store as it was.

A layer blob that has to be kept and unpacked is read once: unpacked as it is copied (``Tee``). A root
filesystem tar is unpacked straight from its file and kept as its framing alone (``splits.py``).
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from typing import BinaryIO, cast

from ..oci.unpack import ProgressFn
from . import splits
from .blobs import Blobs, BlobWriter, Tee, copy_into
from .layers import Layers
from .root import Root


class Incoming:
    """(Holding the lock.) Use as a context: what was not adopted goes at its end."""

    def __init__(self, root: Root, layers: Layers, blobs: Blobs) -> None:
        self.layers, self.blobs = layers, blobs
        self.dir = root.scratch()
        os.mkdir(self.dir, 0o700)
        self._blobs: dict[str, str] = {}  # digest -> its file, checked, to move into the store
        self._splits: dict[str, str] = {}  # digest -> its split (of a layer here), to move into the store
        self._layers: dict[str, str] = {}  # diff_id -> its unpacked directory

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for build in self._layers.values():
            shutil.rmtree(build, ignore_errors=True)

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs or digest in self._splits or self.blobs.has(digest)

    def blob_path(self, digest: str) -> str:
        """Where blob ``digest`` is: staged here, or in the store (not a split's)."""
        return self._blobs.get(digest) or self.blobs.path(digest)

    def describe(self, digest: str) -> tuple[int, bytes]:
        """Blob ``digest``'s size and first bytes (what tells whether it is compressed)."""
        split = self._splits.get(digest) or self.blobs.split_path(digest)
        if os.path.isfile(split):
            return splits.describe(split)
        with open(self.blob_path(digest), "rb") as f:
            return os.fstat(f.fileno()).st_size, f.read(512)

    def new_file(self) -> str:
        """A fresh path here, for a blob the caller writes (and hands to ``keep``)."""
        return os.path.join(self.dir, uuid.uuid4().hex)

    def keep(self, path: str, digest: str) -> None:
        """The file ``path``, here and checked against ``digest`` already, is blob ``digest``."""
        self._blobs.setdefault(digest, path)

    def add_blob(self, path: str, digest: str | None, *, checked: bool = False) -> str:
        """Keep the file ``path`` as a blob (copied, and checked against ``digest`` where it is given; moved
        where ``checked``, a file here already checked); returns its digest."""
        if digest is not None and self.has_blob(digest):
            return digest
        if checked and digest is not None:
            self.keep(path, digest)
            return digest
        with open(path, "rb") as f:
            staged = copy_into(f, self.dir, digest)
        self.keep(staged.path, staged.digest)
        return staged.digest

    def add_bytes(self, data: bytes) -> str:
        out = BlobWriter(self.dir)
        out.write(data)
        staged = out.finish()
        self.keep(staged.path, staged.digest)
        return staged.digest

    def add_layer(
        self,
        path: str,
        digest: str | None,
        diff_id: str | None,
        progress: ProgressFn | None = None,
        *,
        checked: bool = False,
    ) -> tuple[str, str]:
        """Keep the layer blob at ``path`` (where the store lacks ``digest``; None: not known) and unpack it
        (where the store lacks ``diff_id``; None: not known); returns its diff_id and digest. ``checked``:
        ``path`` is here and checked against ``digest`` already (a pull), so it is moved, not copied."""
        have_blob = digest is not None and self.has_blob(digest)
        if diff_id is not None and (diff_id in self._layers or self.layers.has(diff_id)):
            return diff_id, self.add_blob(path, digest, checked=checked)
        if digest is not None and (have_blob or checked):
            with open(self.blob_path(digest) if have_blob else path, "rb") as f:
                diff_id = self._build(f, progress, diff_id)
            if not have_blob:
                self.keep(path, digest)
            return diff_id, digest
        out = BlobWriter(self.dir)
        try:
            with open(path, "rb") as f:
                tee = Tee(f, out)
                diff_id = self._build(cast(BinaryIO, tee), progress, diff_id)
                tee.drain()
            staged = out.finish(digest)
        except BaseException:
            out.discard()
            raise
        self.keep(staged.path, staged.digest)
        return diff_id, staged.digest

    def add_rootfs(self, path: str, progress: ProgressFn | None = None) -> tuple[str, str]:
        """The root filesystem tar at ``path`` unpacked as a layer, and kept as a blob of the same bytes;
        returns its diff_id and digest (the same but for a compressed tar). Where the tar is a plain one on disk and
        the layer holds every byte of its data, the blob is its split: the data is not written twice."""
        with open(path, "rb") as f:
            if not _seekable_plain_tar(f):
                return self.add_layer(path, None, None, progress)
            build, result = self.layers.build(f, progress)
            self._layers[result.diff_id] = build
            if result.data is None or self.has_blob(result.diff_id):
                return result.diff_id, self.add_blob(path, result.diff_id)
            split = self.new_file()
            splits.write(f.fileno(), result.size, result.data, split)
        self._splits[result.diff_id] = split
        return result.diff_id, result.diff_id

    def _build(self, stream: BinaryIO, progress: ProgressFn | None, expected: str | None) -> str:
        build, result = self.layers.build(stream, progress, expected=expected)
        self._layers[result.diff_id] = build
        return result.diff_id

    def adopt(self) -> None:
        """Everything gathered here becomes the store's: on disk first, then named."""
        os.sync()
        for digest, path in self._blobs.items():
            self.blobs.adopt(path, digest)
        self._blobs.clear()
        for digest, path in self._splits.items():
            self.blobs.adopt(path, digest, split=True)
        self._splits.clear()
        for diff_id, build in self._layers.items():
            self.layers.adopt(build, diff_id, synced=True)
        self._layers.clear()


def _seekable_plain_tar(f: BinaryIO) -> bool:
    """Whether ``f`` is a regular file holding an uncompressed tar (its data can be read back by offset)."""
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        return False
    head = os.pread(f.fileno(), 512, 0)
    return len(head) == 512 and head[257:262] == b"ustar"
