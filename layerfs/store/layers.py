"""Layer directories named by their content: ``STORE/layers/<sha256 hex of the diff_id>/``, each a layer
in overlay form, usable as a lowerdir and never changed once named.

A layer's name is the diff_id of its OCI layer tar: of the tar it was unpacked from (an import), or of the
tar ``layerfs export`` writes for the same changes (a commit), so the same layer is stored once however it
arrives.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, BinaryIO

from ..errors import LayerfsError
from ..oci import layout
from .root import Root

if TYPE_CHECKING:  # (the unpacker is imported by what unpacks: reading the store needs none of it)
    from ..oci.unpack import ProgressFn, UnpackResult


class Layers:
    def __init__(self, root: Root) -> None:
        self.root = root

    def path(self, diff_id: str) -> str:
        """Where layer ``diff_id`` lives; anything but a sha256 digest is refused (it becomes a path)."""
        return self.root.sub("layers", layout.checked_digest(diff_id, "layer").removeprefix("sha256:"))

    def has(self, diff_id: str) -> bool:
        return os.path.isdir(self.path(diff_id))

    def diff_ids(self) -> list[str]:
        """Every layer the store holds."""
        return [f"sha256:{hexdigest}" for hexdigest in sorted(os.listdir(self.root.sub("layers")))]

    def build(
        self, stream: BinaryIO, progress: ProgressFn | None = None, *, expected: str | None = None
    ) -> tuple[str, UnpackResult]:
        """(Holding the lock.) The layer tar ``stream`` unpacked into a new directory of the scratch space, to
        ``adopt`` once the rest of its image is in; returns the directory and what was unpacked, whose
        diff_id must be ``expected`` where the image gives one."""
        from ..oci.unpack import unpack_layer

        build = self.root.scratch()
        os.mkdir(build, 0o755)
        try:
            result = unpack_layer(stream, build, progress=progress)
            if expected is not None and result.diff_id != expected:
                raise LayerfsError(f"a layer unpacked to {result.diff_id}, but the image says {expected}")
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return build, result

    def adopt(self, build: str, diff_id: str, *, synced: bool = False) -> None:
        """(Holding the lock.) The layer built in the scratch directory ``build`` becomes layer ``diff_id``;
        where the store has that layer already, ``build`` goes. ``synced``: the caller has synced it."""
        if self.has(diff_id):
            shutil.rmtree(build)
            return
        if not synced:
            os.sync()  # whole on disk before it gets its name
        os.rename(build, self.path(diff_id))

    def remove(self, diff_id: str) -> None:
        """(Holding the lock.) Layer ``diff_id`` gone; whether anything still uses it is the caller's to ask."""
        self.root.discard(self.path(diff_id))
