"""Images: ``STORE/images.json``, full name (``docker.io/library/busybox:latest``) -> the image's manifest
(its digest and media type) and config digests, its config, its layers' diff_ids and their blobs' digests
(bottom first, the two lists side by side), and the repository it was pulled from; imported from OCI
layouts and archives, ``docker save`` archives and plain root filesystem tars, pulled, or made by commits.

The manifest, config and layer blobs are kept as they came (``blobs``), so an image written out or
pushed unchanged has the digests it came with; a commit adds its layer's blob, a config and a manifest."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..distribution.reference import parse_reference
from ..errors import LayerfsError
from ..oci import layout
from . import manifests
from .blobs import Blobs
from .layers import Layers
from .root import Root

if TYPE_CHECKING:  # (the registry client and the unpacker are imported by what uses them: a cached build
    # loads neither)
    from ..distribution.client import Manifest
    from ..distribution.push import Blob
    from ..oci.unpack import ProgressFn
    from .incoming import Incoming

SOURCES = ("oci", "oci-archive", "docker-archive", "rootfs")
# progress(done, total, label): bytes of a layer unpacked, of about total (None: unknown), which layer
Progress = Callable[[int, int | None, str], None]


class NoSuchImage(LayerfsError):
    def __init__(self, name: str, root: Root) -> None:
        super().__init__(f"no image {name!r} in {root}")


class ImageInUse(LayerfsError):
    def __init__(self, name: str, users: list[str]) -> None:
        super().__init__(f"image {name!r} is used by container {', '.join(users)}")


class Images:
    def __init__(self, root: Root, layers: Layers, blobs: Blobs) -> None:
        self.root = root
        self.layers = layers
        self.blobs = blobs

    def all(self) -> dict[str, dict]:
        try:
            with open(self.root.sub("images.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def key(self, name: str) -> str:
        """The name image ``name`` is kept under: itself if the store has it so, else its full reference
        (``busybox`` is ``docker.io/library/busybox:latest``)."""
        return name if name in self.all() else image_name(name)

    def find(self, name: str) -> dict | None:
        return self.all().get(self.key(name))

    def record(self, name: str) -> dict:
        """Image ``name``'s record; NoSuchImage where there is none."""
        image = self.find(name)
        if image is None:
            raise NoSuchImage(name, self.root)
        return image

    def lowerdirs(self, name: str) -> list[str]:
        """The layer directories of image ``name``, top first, as ``lowerdir=`` wants them."""
        return [self.layers.path(diff_id) for diff_id in reversed(self.record(name)["layers"])]

    def blobs_used(self) -> set[str]:
        """Every blob an image of the store is made of."""
        return {
            digest
            for image in self.all().values()
            for digest in [image.get("manifest"), image["config_digest"], *image.get("blobs", [])]
            if digest
        }

    def import_image(
        self, kind: str, path: str, tag: str | None, name: str | None, progress: Progress | None = None
    ) -> tuple[str, dict]:
        """(Holding the lock.) Import the image ``tag`` of ``path`` as ``name`` (None: the name the archive
        gives it, else the file's). ``kind``: ``oci`` (a layout directory), ``oci-archive`` (a tar of one),
        ``docker-archive`` (``docker save``) or ``rootfs`` (a plain tar of a root filesystem, as ``docker
        import`` takes; a one-layer image). Blobs are kept as they are; layers the store has already are not
        unpacked again; every blob is checked against its digest or diff_id. Returns the name and record."""
        if kind not in SOURCES:
            raise LayerfsError(f"{kind}: not an image source ({', '.join(SOURCES)})")
        from .incoming import Incoming

        default = os.path.basename(os.path.abspath(path)).removesuffix(".tar")
        with Incoming(self.root, self.layers, self.blobs) as incoming:
            if kind == "rootfs":
                key = image_name(name or default)
                return key, self._add_rootfs(incoming, path, key, progress)
            if kind == "oci":
                image = layout.read_image(path, tag)
                key = _name_for(name, image, default, tag)
                return key, self._add(incoming, image, key, progress)
            unpacked = os.path.join(incoming.dir, "archive")
            _extract_archive(path, unpacked)
            image = (
                layout.read_image(unpacked, tag) if kind == "oci-archive" else layout.read_docker_save(unpacked, tag)
            )
            key = _name_for(name, image, default, tag)
            return key, self._add(incoming, image, key, progress)

    def add_pulled(
        self, incoming: Incoming, pulled: str, name: str, source: str, progress: Progress | None = None
    ) -> dict:
        """(Holding the lock.) The image of the layout ``pulled`` (in ``incoming``, its blobs checked as they
        arrived; those the store had are not there) as ``name``, pulled from ``source`` (registry/repository)."""
        return self._add(incoming, layout.read_image(pulled), name, progress, checked=True, source=source)

    def _add(
        self,
        incoming: Incoming,
        image: layout.Image,
        name: str,
        progress: Progress | None,
        *,
        checked: bool = False,
        source: str | None = None,
    ) -> dict:
        """The image's blobs and layers the store lacks, then its record."""
        diff_ids, digests = [], []
        for number, layer in enumerate(image.layers, 1):
            diff_id, digest = incoming.add_layer(
                layer.path,
                layer.digest,
                layer.diff_id,
                _labelled(progress, f"layer {number}/{len(image.layers)}"),
                checked=checked,
            )
            diff_ids.append(diff_id)
            digests.append(digest)
        config_digest = incoming.add_blob(image.config_path, image.config_digest, checked=checked)
        if image.manifest_path is not None:
            manifest_digest = incoming.add_blob(image.manifest_path, image.manifest_digest, checked=checked)
            with open(incoming.blob_path(manifest_digest), "rb") as f:
                manifest_type = json.load(f).get("mediaType") or manifests.OCI_MANIFEST
        else:  # a docker archive: a manifest of docker's own form for its blobs
            manifest_type = manifests.DOCKER_MANIFEST
            manifest_digest = _add_manifest(incoming, manifest_type, config_digest, digests)
        incoming.adopt()
        record = {
            "manifest": manifest_digest,
            "manifest_type": manifest_type,
            "config_digest": config_digest,
            "config": image.config,
            "layers": diff_ids,
            "blobs": digests,
        }
        return self._set(name, {**record, "source": source} if source else record)

    def _add_rootfs(self, incoming: Incoming, path: str, name: str, progress: Progress | None) -> dict:
        try:
            diff_id, digest = incoming.add_rootfs(path, _labelled(progress, ""))
        except FileNotFoundError:
            raise LayerfsError(f"{path}: no such file") from None
        config = manifests.rootfs_config(diff_id, f"layerfs import rootfs:{os.path.basename(path)}")
        return self.add_built(incoming, name, config, [digest], manifests.OCI_MANIFEST)

    def add_commit(self, incoming: Incoming, name: str, base: str, diff_id: str, blob: str) -> dict:
        """(Holding the lock.) Image ``name``: image ``base`` with the layer ``diff_id`` on top, its
        compressed tar the blob ``blob`` (in ``incoming``): a new config and manifest, the base's blobs as
        they are."""
        parent = self.record(base)
        config = manifests.commit_config(parent["config"], diff_id, "layerfs commit")
        config_digest = incoming.add_bytes(manifests.dump(config))
        kind = parent.get("manifest_type") or manifests.OCI_MANIFEST
        if parent.get("manifest"):
            document = manifests.with_layer(
                json.loads(self.blobs.read(parent["manifest"])),
                _descriptor(incoming, config_digest),
                _descriptor(incoming, blob, kind),
            )
        else:  # a store from before blobs were kept: a manifest for the new layer alone cannot be pushed
            raise LayerfsError(f"image {base} was stored without its blobs; import or pull it again to commit on it")
        manifest_digest = incoming.add_bytes(manifests.dump(document))
        incoming.adopt()
        return self._set(
            name,
            {
                "manifest": manifest_digest,
                "manifest_type": kind,
                "config_digest": config_digest,
                "config": config,
                "layers": [*parent["layers"], diff_id],
                "blobs": [*parent.get("blobs", []), blob],
                **({"source": parent["source"]} if parent.get("source") else {}),
            },
        )

    def add_built(self, incoming: Incoming, name: str, config: dict, blobs: list[str], manifest_type: str) -> dict:
        """(Holding the lock.) Image ``name`` of ``config`` and the layer ``blobs`` (in the store or in
        ``incoming``, bottom first, beside the config's diff_ids): the config stored as a blob, and a
        manifest of ``manifest_type`` (a build's image, or a root filesystem tar's)."""
        if len(blobs) != len(config["rootfs"]["diff_ids"]):  # (a base image stored before blobs were kept)
            raise LayerfsError(f"image {name}: a layer without its blob; import or pull its base image again")
        config_digest = incoming.add_bytes(manifests.dump(config))
        manifest_digest = _add_manifest(incoming, manifest_type, config_digest, blobs)
        incoming.adopt()
        return self._set(
            name,
            {
                "manifest": manifest_digest,
                "manifest_type": manifest_type,
                "config_digest": config_digest,
                "config": config,
                "layers": list(config["rootfs"]["diff_ids"]),
                "blobs": list(blobs),
            },
        )

    def tag(self, name: str, new: str) -> str:
        """(Holding the lock.) Image ``name`` known as ``new`` too; returns the full new name."""
        key = image_name(new)
        record = self.record(name)
        self._set(key, record)
        return key

    def stored(self, name: str) -> tuple[Manifest, list[Blob]]:
        """Image ``name``'s manifest as stored, and its blobs (config first) as files of the store."""
        from ..distribution.client import Manifest
        from ..distribution.push import Blob

        image = self.record(name)
        if not image.get("manifest") or "blobs" not in image:
            raise LayerfsError(f"image {name} was stored without its blobs; import or pull it again")
        data = self.blobs.read(image["manifest"])
        document = json.loads(data)
        descriptors = [document["config"], *document["layers"]]
        blobs = [Blob(d["digest"], d["size"], self.blobs.path(d["digest"])) for d in descriptors]
        return Manifest(data, image.get("manifest_type") or manifests.OCI_MANIFEST, image["manifest"]), blobs

    def remove(self, name: str) -> None:
        """(Holding the lock.) Image ``name`` forgotten; its layers and blobs stay until a gc."""
        images = self.all()
        key = self.key(name)
        if key not in images:
            raise NoSuchImage(name, self.root)
        del images[key]
        self._write(images)

    def _set(self, name: str, record: dict) -> dict:
        images = self.all()
        images[name] = record
        self._write(images)
        return record

    def _write(self, images: dict) -> None:
        tmp = self.root.sub("images.json.tmp")
        with open(tmp, "w") as f:
            json.dump(images, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root.sub("images.json"))


def image_name(text: str) -> str:
    """``text`` as the store names images: docker's full reference (``busybox`` is
    ``docker.io/library/busybox:latest``); a one-line LayerfsError for a name docker refuses."""
    return str(parse_reference(text))


def _name_for(name: str | None, image: layout.Image, default: str, tag: str | None) -> str:
    """The name an imported image gets: the one given, else the archive's own (a full reference, or an OCI
    ref.name that is a tag alone, put after the file's name), else the file's name and ``tag``."""
    if name:
        return image_name(name)
    if image.names:
        given = image.names[0]
        return image_name(given if "/" in given or ":" in given else f"{default}:{given}")
    return image_name(f"{default}:{tag or 'latest'}")


def _add_manifest(incoming: Incoming, manifest_type: str, config: str, layers: list[str]) -> str:
    """A manifest of ``manifest_type`` for the blobs ``config`` and ``layers`` (bottom first), added as a
    blob; returns its digest."""
    document = manifests.manifest(
        manifest_type, _descriptor(incoming, config), [_descriptor(incoming, d, manifest_type) for d in layers]
    )
    return incoming.add_bytes(manifests.dump(document))


def _descriptor(incoming: Incoming, digest: str, manifest_type: str | None = None) -> Any:
    """(digest, size) of a blob, and its layer media type in a manifest of ``manifest_type`` if one is given."""
    size, head = incoming.describe(digest)
    if manifest_type is None:
        return digest, size
    return digest, size, manifests.layer_type(manifest_type, manifests.compression_of(head[:4]))


def _labelled(progress: Progress | None, label: str) -> ProgressFn | None:
    return None if progress is None else lambda done, total: progress(done, total, label)


def _extract_archive(path: str, dest: str) -> None:
    """An image archive (a plain tar of files and relative symlinks) extracted into ``dest``; tarfile's
    "data" filter refuses what could reach outside it."""
    from ..tarfilters import tarfile  # (here and in kind_of: reading the store needs no tar)

    try:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
    except FileNotFoundError:
        raise LayerfsError(f"{path}: no such file") from None
    except (tarfile.TarError, OSError) as e:
        raise LayerfsError(f"{path}: not a readable image archive ({e})") from None


_ARCHIVE_MEMBER = re.compile(
    r"oci-layout|index\.json|manifest\.json|repositories|blobs(/.*)?"
    r"|[0-9a-f]{64}(\.json|\.tar|/.*)?"
)


def kind_of(path: str) -> str:
    """What the image file ``path`` is, as ``podman load`` finds out: ``oci`` (a layout directory),
    ``oci-archive``, ``docker-archive`` (its ``manifest.json``; Docker 25's are OCI layouts too), or ``rootfs``
    (a tar with anything else in it). Reading stops at the first entry no image archive has."""
    from ..tarfilters import tarfile

    if os.path.isdir(path):
        return "oci"
    kind = "rootfs"
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if not name:
                    continue
                if not _ARCHIVE_MEMBER.fullmatch(name):
                    return "rootfs"
                if name == "manifest.json":
                    kind = "docker-archive"
                elif name == "oci-layout" and kind == "rootfs":
                    kind = "oci-archive"
    except (tarfile.TarError, OSError) as e:
        raise LayerfsError(f"{path}: not an image, an image archive or a tar ({e})") from None
    return kind
