"""The store: layers named by their content, imported or committed, the images made of them and the
containers made from those images, in one directory.

    STORE/layers/<sha256 hex of the layer's diff_id>/   a layer in overlay form, usable as a lowerdir (layers)
    STORE/blobs/sha256/<hex>                            manifests, configs, layer tars as they came (blobs)
    STORE/images.json                                   full name -> digests, config, layers (images)
    STORE/containers/<name>/container.json              the image it came from, its layers (containers)
    STORE/containers/<name>/{upper,work,merged}/        its upper and work dirs, its default mount point
    STORE/content/<2 hex>/<key>                         one inode per distinct file (content)
    STORE/volumes/<name>/{_data,volume.json}            named and anonymous volumes (volumes)
    STORE/tmp/                                          things being built (cleared when interrupted) (root)
    STORE/lock                                          held by whoever changes the store (root)

``Store`` reads through its parts (``store.images.find(name)``, ``store.containers.get(name)``,
``store.layers.path(diff_id)``) and makes every change itself, each under the store's one lock; the parts
never take the lock, so a change that spans them (a container of an image, an image no container uses
any more, a gc) is one locked step. A commit (``commit``) is the layer ``layerfs export`` writes for the
same changes, stored as a directory (and, for a new image, as a gzip blob too). What comes in (an import,
a pull, a commit's image) is gathered in the scratch space and named at once (``incoming``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..distribution.reference import parse_reference
from .blobs import Blobs
from .containers import ContainerMounted, Containers
from .images import ImageInUse, Images, NoSuchImage, Progress, image_name
from .layers import Layers
from .root import Root, root_from
from .volumes import VolumeInUse, Volumes

# What only some commands need is imported by them (a cached build loads no HTTP library, no unpacker,
# no file sharing): the Store's methods import it where they use it.
if TYPE_CHECKING:
    from ..core.changes import Change
    from ..distribution import push as pushing
    from ..oci.entries import Entry, Upper
    from ..oci.layertar import ProgressFn
    from .commit import Committed
    from .content import Content
    from .incoming import Incoming

__all__ = [
    "ContainerMounted",
    "ImageInUse",
    "NoSuchImage",
    "Store",
    "VolumeInUse",
    "root_from",
]


def _volumes_of(record: dict | None) -> list[str]:
    """The names of the volumes container ``record`` mounts."""
    return [m["Name"] for m in (record or {}).get("mounts", []) if m.get("Type") == "volume"]


class Store:
    def __init__(self, root: str) -> None:
        self.root = Root(root)
        self.layers = Layers(self.root)
        self.blobs = Blobs(self.root)
        self.images = Images(self.root, self.layers, self.blobs)
        self.containers = Containers(self.root, self.layers)
        self.volumes = Volumes(self.root)

    @functools.cached_property
    def content(self) -> Content:
        """The file data the store's layers share (a commit's and a gc's)."""
        from .content import Content

        return Content(self.root)

    def _incoming(self) -> Incoming:
        """A scratch space for what comes in, named in the store at once when complete."""
        from .incoming import Incoming

        return Incoming(self.root, self.layers, self.blobs)

    def import_image(
        self, kind: str, path: str, tag: str | None, name: str | None, progress: Progress | None = None
    ) -> tuple[str, dict]:
        """``Images.import_image``: image ``tag`` of ``path`` imported as ``name``; its name and record."""
        with self.root.locked():
            return self.images.import_image(kind, path, tag, name, progress)

    def pull(
        self, reference: str, *, platform: str | None = None, tls_verify: bool = True, progress: Progress | None = None
    ) -> tuple[str, dict]:
        """Image ``reference`` pulled from its registry (blobs the store has are not fetched) and kept under
        its full name; its name and record."""
        from ..distribution import pull as pulling

        ref = parse_reference(reference)
        with self.root.locked(), self._incoming() as incoming:
            pulled = os.path.join(incoming.dir, "pulled")
            pulling.pull(ref, pulled, platform=platform, tls_verify=tls_verify, have=self.blobs.has, progress=progress)
            return str(ref), self.images.add_pulled(incoming, pulled, str(ref), ref.name, progress)

    def push(
        self, name: str, reference: str | None = None, *, tls_verify: bool = True, progress: Progress | None = None
    ) -> pushing.Pushed:
        """Image ``name`` pushed as ``reference`` (its own name if None), its stored bytes unchanged; blobs
        mounted from the repository it was pulled from, where that is on the same registry."""
        from ..distribution import push as pushing

        ref = parse_reference(reference or self.images.key(name))
        registry, _, repository = (self.images.record(name).get("source") or "").partition("/")
        with self._held(name) as (manifest, blobs):
            return pushing.push_image(
                manifest,
                blobs,
                ref,
                mount_from=repository if registry == ref.registry else None,
                tls_verify=tls_verify,
                progress=progress,
            )

    def save(self, name: str, kind: str, dest: str, tag: str | None = None) -> str:
        """Image ``name`` written to ``dest`` as ``kind`` (``archives.FORMATS``) with its stored bytes,
        listed as ``tag`` (its own if None); returns its manifest's digest."""
        from . import archives

        key = self.images.key(name)
        with self._held(name) as (manifest, blobs):
            archives.write(kind, dest, manifest, blobs, tag=tag or parse_reference(key).tag or "latest", name=key)
        return manifest.digest

    @contextlib.contextmanager
    def _held(self, name: str) -> Iterator[tuple[pushing.Manifest, list[pushing.Blob]]]:
        """Image ``name``'s stored manifest and blobs, each blob open for the while (named by its
        descriptor): a push or a save is long and takes no lock, and a gc or an rmi meanwhile must not
        take its blobs from under it."""
        held: list[int] = []
        try:
            with self.root.locked():
                manifest, blobs = self.images.stored(name)
                for blob in blobs:
                    held.append(self._open_blob(blob.digest))
            yield manifest, [blob._replace(path=f"/proc/self/fd/{fd}") for blob, fd in zip(blobs, held, strict=True)]
        finally:
            for fd in held:
                os.close(fd)

    def _open_blob(self, digest: str) -> int:
        """(Holding the lock.) A descriptor of blob ``digest``'s bytes: its file, or for a split one (an
        imported root filesystem tar) a nameless file of the scratch space it is put back together in."""
        from . import splits

        split = self.blobs.split_path(digest)
        if not os.path.isfile(split):
            return os.open(self.blobs.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        fd = os.open(self.root.sub("tmp"), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            splits.rebuild(split, self.layers.path(digest), digest, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def tag(self, name: str, new: str) -> str:
        with self.root.locked():
            return self.images.tag(name, new)

    def remove_image(self, name: str) -> None:
        with self.root.locked():
            users = self.containers.using(self.images.key(name))
            if users:
                raise ImageInUse(name, users)
            self.images.remove(name)

    def create(self, name: str, image: str) -> dict:
        """A new container of ``image``: an empty upper over the image's layers."""
        with self.root.locked():
            return self.containers.create(name, self.images.key(image), self.images.record(image))

    def create_on_dirs(self, name: str, lowers: list[str]) -> dict:
        """A new container over the plain directories ``lowers`` (top first), with no image."""
        with self.root.locked():
            return self.containers.create(name, "", None, lowers)

    def update_container(self, name: str, **fields: object) -> None:
        """``fields`` set in container ``name``'s record."""
        with self.root.locked():
            self.containers.update(name, **fields)

    def add_runtime_paths(self, name: str, paths: list[str]) -> None:
        """Paths the runtime made in container ``name`` for itself: its diff leaves them out."""
        with self.root.locked():
            self.containers.add_runtime_paths(name, paths)

    def remove(self, name: str, *, anonymous_volumes: bool = False) -> None:
        """Container ``name`` removed (and, with ``anonymous_volumes``, its anonymous volumes, as ``docker rm
        -v`` removes them)."""
        with self.root.locked():
            record = self.containers.get(name)
            self.containers.remove(name)
            for volume in _volumes_of(record) if anonymous_volumes else []:
                if self.volumes.is_anonymous(volume) and not self._volume_users(volume):
                    self.volumes.remove(volume)

    def volume(self, name: str | None) -> tuple[str, bool]:
        """Volume ``name`` (a new anonymous one for None), made if missing: its name, and whether it is new."""
        with self.root.locked():
            return self.volumes.create(name)

    def remove_volume(self, name: str) -> None:
        """Volume ``name`` removed; refused while a container has it."""
        with self.root.locked():
            users = self._volume_users(name)
            if users:
                raise VolumeInUse(name, users)
            self.volumes.remove(name)

    def prune_volumes(self, *, named_too: bool = False) -> list[str]:
        """Remove the anonymous volumes no container has (``named_too``: every volume none has)."""
        with self.root.locked():
            unused = [
                name
                for name in self.volumes.names()
                if (named_too or self.volumes.is_anonymous(name)) and not self._volume_users(name)
            ]
            for name in unused:
                self.volumes.remove(name)
        return unused

    def _volume_users(self, volume: str) -> list[str]:
        return [n for n in self.containers.names() if volume in _volumes_of(self.containers.get(n))]

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
        """Remove the layers no image or container uses, the blobs no image has, and file data no layer
        shares any more; returns the layers' diff_ids and the blobs' digests."""
        with self.root.locked():
            unused = [diff_id for diff_id, users in self.layer_users().items() if not users]
            for diff_id in unused:
                self.layers.remove(diff_id)
            used = self.images.blobs_used()
            blobs = [digest for digest in self.blobs.digests() if digest not in used]
            for digest in blobs:
                self.blobs.remove(digest)
            self.content.forget_unshared()
        return unused + [f"blob {digest}" for digest in blobs]

    def commit(
        self,
        upper: str,
        changes: Iterable[Change],
        *,
        share: str = "reflink",
        progress: ProgressFn | None = None,
        image: tuple[str, str] | None = None,
    ) -> Committed:
        """Freeze ``changes`` (as ``layerfs.core.changes`` lists them) of ``upper`` into a layer, its file
        data shared with the store's alike files as ``share`` says (one of ``content.SHARING``). ``image``: (name,
        base): also record image ``name``, image ``base`` with this layer on top, its tar kept as a gzip blob
        (written once, in the same locked step)."""
        from ..oci.entries import Upper
        from .commit import layer_diff_id

        with Upper(upper) as tree:
            found = tree.entries(changes)
            if image is not None:
                name = image_name(image[0])  # (a name docker refuses is refused before any work)
                with self.root.locked(), self._incoming() as incoming:
                    committed, blob = self._add_layer_and_blob(incoming, tree, found, share, progress)
                    self.images.add_commit(incoming, name, image[1], committed.diff_id, blob)
                return committed
            layer = layer_diff_id(tree, found, progress)
            with self.root.locked():
                return self._add_layer(tree, found, layer, share)

    def commit_step(
        self, upper: str, changes: Iterable[Change], progress: ProgressFn | None = None
    ) -> tuple[Committed, str]:
        """A build step's ``changes`` of ``upper`` frozen into a layer and kept as its gzip blob too (an image
        made of it can be saved and pushed); the layer and the blob's digest."""
        from ..oci.entries import Upper

        with Upper(upper) as tree:
            found = tree.entries(changes)
            with self.root.locked(), self._incoming() as incoming:
                committed, blob = self._add_layer_and_blob(incoming, tree, found, "reflink", progress)
                incoming.adopt()
            return committed, blob

    def add_built(self, name: str, config: dict, blobs: list[str], manifest_type: str) -> dict:
        """Image ``name`` of a build: its config and its layers' blobs (all in the store), with a new manifest."""
        key = image_name(name)
        with self.root.locked(), self._incoming() as incoming:
            return self.images.add_built(incoming, key, config, blobs, manifest_type)

    def _add_layer_and_blob(
        self, incoming: Incoming, tree: Upper, found: list[Entry], share: str, progress: ProgressFn | None
    ) -> tuple[Committed, str]:
        """(Holding the lock.) The layer of ``found`` as a directory, and its gzip tar as a blob of ``incoming``."""
        from ..oci.layertar import write_entries

        blob = incoming.new_file()
        with open(blob, "wb") as out:
            written = write_entries(out, tree, found, compress=True, progress=progress)
        incoming.keep(blob, written.digest)
        return self._add_layer(tree, found, written.diff_id, share), written.digest

    def _add_layer(self, tree: Upper, found: list[Entry], layer: str, share: str) -> Committed:
        """(Holding the lock.) The layer ``layer`` of ``found`` built as a directory, unless the store has it."""
        from .commit import Committed, build_layer

        final = self.layers.path(layer)
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
