"""The store: layers named by their content, imported or committed, the images made of them and the
containers made from those images, in one directory.

    STORE/layers/<sha256 hex of the layer's diff_id>/   a layer in overlay form, usable as a lowerdir (layers)
    STORE/images.json                                   name:tag -> digests, config, layers (images)
    STORE/containers/<name>/container.json              the image it came from, its layers (containers)
    STORE/containers/<name>/{upper,work,merged}/        its upper and work dirs, its default mount point
    STORE/content/<2 hex>/<key>                         one inode per distinct file (content)
    STORE/tmp/                                          things being built (cleared when interrupted) (root)
    STORE/lock                                          held by whoever changes the store (root)

``Store`` reads through its parts (``store.images.find(name)``, ``store.containers.get(name)``,
``store.layers.path(diff_id)``) and makes every change itself, each under the store's one lock; the parts
never take the lock, so a change that spans them (a container of an image, an image no container uses
any more, a gc) is one locked step. A commit (``commit``) is the layer ``layerfs export`` writes for the
same changes, stored as a directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from ..core.changes import Change
from ..oci.entries import Upper
from ..oci.layertar import ProgressFn
from .commit import Committed, build_layer, layer_diff_id
from .containers import ContainerMounted, Containers
from .content import SHARING, Content
from .images import ImageInUse, Images, NoSuchImage, Progress
from .layers import Layers
from .root import DEFAULT_ROOT, Root, root_from

__all__ = ["DEFAULT_ROOT", "SHARING", "Committed", "ContainerMounted", "ImageInUse", "NoSuchImage", "Store",
           "root_from"]


class Store:
    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        self.root = Root(root)
        self.layers = Layers(self.root)
        self.content = Content(self.root)
        self.images = Images(self.root, self.layers)
        self.containers = Containers(self.root, self.layers)

    def import_image(self, kind: str, path: str, tag: str | None, name: str,
                     progress: Progress | None = None) -> dict:
        """``Images.import_image``: image ``tag`` of ``path`` imported as ``name``."""
        with self.root.locked():
            return self.images.import_image(kind, path, tag, name, progress)

    def add_image(self, name: str, base: str, diff_id: str) -> dict:
        """Image ``name``: image ``base`` with the layer ``diff_id`` on top (a commit)."""
        with self.root.locked():
            return self.images.add_commit(name, base, diff_id)

    def remove_image(self, name: str) -> None:
        with self.root.locked():
            users = self.containers.using(name)
            if users:
                raise ImageInUse(name, users)
            self.images.remove(name)

    def create(self, name: str, image: str) -> dict:
        """A new container of ``image``: an empty upper over the image's layers."""
        with self.root.locked():
            return self.containers.create(name, image, self.images.record(image))

    def add_runtime_paths(self, name: str, paths: list[str]) -> None:
        """Paths the runtime made in container ``name`` for itself: its diff leaves them out."""
        with self.root.locked():
            self.containers.add_runtime_paths(name, paths)

    def remove(self, name: str) -> None:
        """Container ``name`` removed."""
        with self.root.locked():
            self.containers.remove(name)

    def layer_users(self) -> dict[str, list[str]]:
        """Every layer of the store (diff_id) -> the images and containers that use it."""
        users: dict[str, list[str]] = {diff_id: [] for diff_id in self.layers.diff_ids()}
        for name, image in self.images.all().items():
            for diff_id in image["layers"]:
                users.setdefault(diff_id, []).append(name)
        for name in self.containers.names():
            for diff_id in (self.containers.get(name) or {}).get("layers", []):
                users.setdefault(diff_id, []).append(f"container {name}")
        return users

    def gc(self) -> list[str]:
        """Remove the layers no image or container uses, and file data no layer shares any more."""
        with self.root.locked():
            unused = [diff_id for diff_id, users in self.layer_users().items() if not users]
            for diff_id in unused:
                self.layers.remove(diff_id)
            self.content.forget_unshared()
        return unused

    def commit(self, upper: str, changes: Iterable[Change], *, share: str = "reflink",
               progress: ProgressFn | None = None) -> Committed:
        """Freeze ``changes`` (as ``layerfs.core.changes`` lists them) of ``upper`` into a layer, its file
        data shared with the store's alike files as ``share`` says (one of ``SHARING``)."""
        with Upper(upper) as tree:
            found = tree.entries(changes)
            layer = layer_diff_id(tree, found, progress)
            final = self.layers.path(layer)
            with self.root.locked():
                if self.layers.has(layer):
                    return Committed(final, layer, new=False)
                build = self.root.scratch()
                os.mkdir(build, 0o755)
                try:
                    build_layer(tree, found, build)
                    self.content.share(build, share)
                    self.layers.adopt(build, layer)
                except BaseException:
                    shutil.rmtree(build, ignore_errors=True)
                    raise
        return Committed(final, layer, new=True)
