"""Images: ``STORE/images.json``, name:tag -> the image's manifest and config digests, its config and its
layers' diff_ids (bottom first); imported from OCI layouts and archives, ``docker save`` archives and
plain root filesystem tars, made by commits, saved as OCI layouts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from typing import BinaryIO, cast

from ..errors import LayerfsError
from ..oci import layout
from ..oci.unpack import ProgressFn
from .layers import Layers
from .root import Root

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
    def __init__(self, root: Root, layers: Layers) -> None:
        self.root = root
        self.layers = layers

    def all(self) -> dict[str, dict]:
        try:
            with open(self.root.sub("images.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def find(self, name: str) -> dict | None:
        return self.all().get(name)

    def record(self, name: str) -> dict:
        """Image ``name``'s record; NoSuchImage where there is none."""
        image = self.find(name)
        if image is None:
            raise NoSuchImage(name, self.root)
        return image

    def lowerdirs(self, name: str) -> list[str]:
        """The layer directories of image ``name``, top first, as ``lowerdir=`` wants them."""
        return [self.layers.path(diff_id) for diff_id in reversed(self.record(name)["layers"])]

    def import_image(self, kind: str, path: str, tag: str | None, name: str,
                     progress: Progress | None = None) -> dict:
        """(Holding the lock.) Import the image ``tag`` of ``path`` as ``name``. ``kind``: ``oci`` (a
        layout directory), ``oci-archive`` (a tar of one), ``docker-archive`` (``docker save``) or
        ``rootfs`` (a plain tar of a root filesystem, as ``docker import`` takes; a one-layer image).
        Layers the store has already are not unpacked again; every blob is checked against its digest or
        diff_id."""
        if kind not in SOURCES:
            raise LayerfsError(f"{kind}: not an image source ({', '.join(SOURCES)})")
        if kind == "oci":
            return self._import(layout.read_image(path, tag), name, progress)
        if kind == "rootfs":
            return self._import_rootfs(path, name, progress)
        unpacked = self.root.scratch()
        try:
            _extract_archive(path, unpacked)
            image = layout.read_image(unpacked, tag) if kind == "oci-archive" else \
                layout.read_docker_save(unpacked, tag)
            return self._import(image, name, progress)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)

    def _import_rootfs(self, path: str, name: str, progress: Progress | None) -> dict:
        try:
            with open(path, "rb") as stream:
                diff_id = self.layers.add_tar(stream, _labelled(progress, ""))
        except FileNotFoundError:
            raise LayerfsError(f"{path}: no such file") from None
        config = {"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                  "history": [{"created_by": f"layerfs import rootfs:{os.path.basename(path)}"}]}
        return self._set(name, _record(config, [diff_id]))

    def _import(self, image: layout.Image, name: str, progress: Progress | None) -> dict:
        """The image's layers the store lacks, then its record."""
        for number, layer in enumerate(image.layers, 1):
            if self.layers.has(layer.diff_id):
                continue
            with layer.open() as blob:
                # (a VerifiedBlob reads as a file does, which is all unpacking asks of it)
                self.layers.add_tar(cast(BinaryIO, blob), _labelled(progress, f"layer {number}/{len(image.layers)}"),
                                    expected=layer.diff_id)
        return self._set(name, {"manifest": image.manifest_digest, "config_digest": image.config_digest,
                                "config": image.config, "layers": [layer.diff_id for layer in image.layers]})

    def add_commit(self, name: str, base: str, diff_id: str) -> dict:
        """(Holding the lock.) Image ``name``: image ``base`` with the layer ``diff_id`` on top."""
        parent = self.record(base)
        config = json.loads(json.dumps(parent["config"]))
        rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        rootfs["diff_ids"] = list(parent["layers"]) + [diff_id]
        config.setdefault("history", []).append({"created_by": "layerfs commit"})
        return self._set(name, _record(config, rootfs["diff_ids"]))

    def save(self, name: str, dest: str, tag: str) -> str:
        """Write image ``name`` into the OCI image layout ``dest`` (made if missing) as ``tag``; each layer
        directory is written again as a gzip layer tar, so the saved config names these tars' diff_ids.
        Returns the manifest's digest."""
        image = self.record(name)
        return layout.write_image(dest, tag, [self.layers.path(d) for d in image["layers"]], image["config"])

    def remove(self, name: str) -> None:
        """(Holding the lock.) Image ``name`` forgotten; its layers stay until a gc."""
        images = self.all()
        if name not in images:
            raise NoSuchImage(name, self.root)
        del images[name]
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


def _labelled(progress: Progress | None, label: str) -> ProgressFn | None:
    return None if progress is None else lambda done, total: progress(done, total, label)


def _record(config: dict, diff_ids: list[str]) -> dict:
    """The record of an image made here (no manifest yet): its config digest is of the config's bytes."""
    data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return {"manifest": None, "config_digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
            "config": config, "layers": diff_ids}


def _extract_archive(path: str, dest: str) -> None:
    """An image archive (a plain tar of files and relative symlinks) extracted into ``dest``; tarfile's
    "data" filter refuses what could reach outside it."""
    try:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
    except FileNotFoundError:
        raise LayerfsError(f"{path}: no such file") from None
    except (tarfile.TarError, OSError) as e:
        raise LayerfsError(f"{path}: not a readable image archive ({e})") from None
