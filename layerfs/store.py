"""Where committed layers live: read-only layer directories named by their content, sharing file data.

    STORE/layers/<sha256 hex of the layer's diff_id>/   a layer in overlay form, usable as a lowerdir
    STORE/images.json                                   name:tag -> manifest and config digests, layers
    STORE/containers/<name>/container.json              the image it came from, its layers' diff_ids
    STORE/containers/<name>/{upper,work,merged}/        its upper and work dirs, its default mount point
    STORE/content/<2 hex>/<key>                         one inode per distinct file: content and metadata
    STORE/tmp/                                          layers being built (removed when interrupted)
    STORE/lock                                          held by whoever changes the store

A layer's name is the diff_id ``layerfs export`` prints for the same changes (the sha256 of the OCI layer
tar), so committing the same changes twice gives the same layer, stored once.

Files alike in every respect (``content``'s key: the xxh3-128 of the data with mode, owner, times and
xattrs) take their space once, in one of two ways:

- ``reflink`` (the default): the layer's file shares the data extents of the store's copy (FICLONE), as
  containers-storage's dedup does. Nothing a container can see changes; a filesystem without reflinks
  (ext4) shares nothing.
- ``hardlink``: the layer's file is a hard link to the store's entry, as ostree does. Works everywhere,
  but a container sees it: ``st_nlink`` above 1, and two alike files in one layer share an inode number.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast

import xxhash

from . import syscalls
from .core import copyup, whiteout, xattr
from .core.changes import DELETED, Change
from .core.index import file_digest
from .errors import LayerfsError
from .oci import layout
from .oci.layertar import write_layer
from .oci.unpack import unpack_layer

DEFAULT_ROOT = "/var/lib/layerfs"


def root_from(option: str | None) -> str:
    """The store's root: ``--root``, else ``$LAYERFS_ROOT``, else /var/lib/layerfs."""
    return option or os.environ.get("LAYERFS_ROOT") or DEFAULT_ROOT
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Committed:
    path: str  # the layer directory
    diff_id: str
    new: bool  # False when the store had this layer already


class _Discard:
    """A file object that keeps nothing: the layer tar is written only to be hashed."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _open_dir(root_fd: int, path: str) -> int:
    """A descriptor of the directory at container path ``path`` below ``root_fd``, reached one real
    directory at a time: a symlink on the way is an error, never followed."""
    fd = os.dup(root_fd)
    try:
        for name in filter(None, path.split("/")):
            next_fd = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


class Store:
    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        self.root = os.path.abspath(root)
        for sub in ("layers", "content", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    def layer_path(self, diff_id: str) -> str:
        """Where layer ``diff_id`` lives; anything but a sha256 digest is refused (it becomes a path)."""
        hexdigest = layout.checked_digest(diff_id, "layer").removeprefix("sha256:")
        return os.path.join(self.root, "layers", hexdigest)

    @contextlib.contextmanager
    def _locked(self):
        """Only one command changes the store at a time; readers need no lock (every change is a rename).
        All work in ``tmp`` is done holding the lock, so what the next holder finds there is what an
        interrupted command left: it goes."""
        with open(os.path.join(self.root, "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tmp = os.path.join(self.root, "tmp")
            for name in os.listdir(tmp):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            yield

    # -- images

    def images(self) -> dict[str, dict]:
        try:
            with open(os.path.join(self.root, "images.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def lowerdirs(self, name: str) -> list[str]:
        """The layer directories of image ``name``, top first, as ``lowerdir=`` wants them."""
        image = self.images().get(name)
        if image is None:
            raise LayerfsError(f"no image {name!r} in {self.root} (layerfs images lists them)")
        return [self.layer_path(diff_id) for diff_id in reversed(image["layers"])]

    def import_image(self, kind: str, path: str, tag: str | None, name: str,
                     progress: Callable[[int, int | None, str], None] | None = None) -> dict:
        """Import the image ``tag`` of ``path`` as ``name``. ``kind``: ``oci`` (a layout directory),
        ``oci-archive`` (a tar of one), ``docker-archive`` (``docker save``) or ``rootfs`` (a plain tar of a
        root filesystem, as ``docker import`` takes; a one-layer image). Layers the store has
        already are not unpacked again; every blob is checked against its digest or diff_id."""
        if kind not in ("oci", "oci-archive", "docker-archive", "rootfs"):
            raise LayerfsError(f"{kind}: not an image source (oci, oci-archive, docker-archive, rootfs)")
        with self._locked():
            if kind == "oci":
                return self._import(layout.read_image(path, tag), name, progress)
            if kind == "rootfs":
                return self._import_rootfs(path, name, progress)
            unpacked = os.path.join(self.root, "tmp", uuid.uuid4().hex)
            try:
                _extract_archive(path, unpacked)
                image = layout.read_image(unpacked, tag) if kind == "oci-archive" else \
                    layout.read_docker_save(unpacked, tag)
                return self._import(image, name, progress)
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)

    def _import_rootfs(self, path: str, name: str, progress) -> dict:
        """(Holding the lock.) A plain tar of a root filesystem (``docker import``) as a one-layer image."""
        build = os.path.join(self.root, "tmp", uuid.uuid4().hex)
        os.mkdir(build, 0o755)
        try:
            with open(path, "rb") as stream:
                diff_id = unpack_layer(stream, build, progress=progress).diff_id
            if os.path.isdir(self.layer_path(diff_id)):
                shutil.rmtree(build)
            else:
                os.sync()
                os.rename(build, self.layer_path(diff_id))
        except FileNotFoundError:
            shutil.rmtree(build, ignore_errors=True)
            raise LayerfsError(f"{path}: no such file") from None
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        config = {"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                  "history": [{"created_by": f"layerfs import rootfs:{os.path.basename(path)}"}]}
        data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        record = {"manifest": None, "config_digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
                  "config": config, "layers": [diff_id]}
        self._set_image(name, record)
        return record

    def _import(self, image: layout.Image, name: str, progress) -> dict:
        """(Holding the lock.) The image's layers the store lacks, then its record."""
        for number, layer in enumerate(image.layers, 1):
            if os.path.isdir(self.layer_path(layer.diff_id)):
                continue
            step = None if progress is None else (
                lambda done, total, n=number: progress(done, total, f"layer {n}/{len(image.layers)}"))
            with layer.open() as blob:
                self._add_layer(blob, layer.diff_id, step)
        record = {"manifest": image.manifest_digest, "config_digest": image.config_digest,
                  "config": image.config, "layers": [layer.diff_id for layer in image.layers]}
        self._set_image(name, record)
        return record

    def _add_layer(self, stream, diff_id: str, progress) -> None:
        build = os.path.join(self.root, "tmp", uuid.uuid4().hex)
        os.mkdir(build, 0o755)
        try:
            result = unpack_layer(stream, build, progress=progress)
            if result.diff_id != diff_id:
                raise LayerfsError(f"a layer unpacked to {result.diff_id}, but the image says {diff_id}")
            os.sync()  # whole on disk before it gets its name
            os.rename(build, self.layer_path(diff_id))
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise

    # -- containers

    def container_dir(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise LayerfsError(f"{name!r}: not a container name")
        return os.path.join(self.root, "containers", name)

    def container(self, name: str) -> dict | None:
        """The record of container ``name``, with its directories; None if there is none."""
        try:
            with open(os.path.join(self.container_dir(name), "container.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        where = self.container_dir(name)
        record.update(upper=os.path.join(where, "upper"), work=os.path.join(where, "work"),
                      merged=os.path.join(where, "merged"),
                      lowers=[self.layer_path(d) for d in reversed(record["layers"])])
        return record

    def containers(self) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.root, "containers")))
        except FileNotFoundError:
            return []

    def create(self, name: str, image: str) -> dict:
        """A new container of ``image``: an empty upper over the image's layers."""
        with self._locked():
            record = self.images().get(image)
            if record is None:
                raise LayerfsError(f"no image {image!r} in {self.root} (layerfs images lists them)")
            where = self.container_dir(name)
            if os.path.exists(where):
                raise LayerfsError(f"container {name!r} exists already")
            build = os.path.join(self.root, "tmp", uuid.uuid4().hex)
            for sub in ("upper", "work", "merged"):
                os.makedirs(os.path.join(build, sub), mode=0o755)
            with open(os.path.join(build, "container.json"), "w") as f:
                json.dump({"name": name, "image": image, "config_digest": record["config_digest"],
                           "layers": record["layers"]}, f, indent=1)
            os.makedirs(os.path.dirname(where), exist_ok=True)
            os.rename(build, where)
        made = self.container(name)
        if made is None:
            raise LayerfsError(f"container {name}: gone as soon as it was made")
        return made

    def add_runtime_paths(self, name: str, paths: list[str]) -> None:
        """Paths the runtime made in container ``name`` for itself: its diff leaves them out."""
        path = os.path.join(self.container_dir(name), "container.json")
        with self._locked():
            with open(path) as f:
                record = json.load(f)
            record["runtime_paths"] = sorted(set(record.get("runtime_paths", [])) | set(paths))
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(path + ".tmp", path)

    def remove(self, name: str) -> None:
        record = self.container(name)
        if record is None:
            raise LayerfsError(f"no container {name!r}")
        if os.path.ismount(record["merged"]):
            raise LayerfsError(f"container {name!r} is mounted at {record['merged']}: layerfs umount it first")
        with self._locked():
            doomed = os.path.join(self.root, "tmp", uuid.uuid4().hex)
            os.rename(self.container_dir(name), doomed)  # gone at once; its files go next
            shutil.rmtree(doomed)

    def add_image(self, name: str, base: str, diff_id: str) -> dict:
        """Image ``name``: image ``base`` with the layer ``diff_id`` on top (a commit)."""
        with self._locked():
            parent = self.images().get(base)
            if parent is None:
                raise LayerfsError(f"no image {base!r}")
            config = json.loads(json.dumps(parent["config"]))
            rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            rootfs["diff_ids"] = list(parent["layers"]) + [diff_id]
            config.setdefault("history", []).append({"created_by": "layerfs commit"})
            data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            record = {"manifest": None, "config_digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
                      "config": config, "layers": rootfs["diff_ids"]}
            self._set_image(name, record)
        return record

    def save(self, name: str, dest: str, tag: str) -> str:
        """Write image ``name`` into the OCI image layout ``dest`` (made if missing) as ``tag``; each layer
        directory is written again as a gzip layer tar, so the saved config names these tars' diff_ids.
        Returns the manifest's digest."""
        image = self.images().get(name)
        if image is None:
            raise LayerfsError(f"no image {name!r}")
        return layout.write_image(dest, tag, [self.layer_path(d) for d in image["layers"]], image["config"])

    def remove_image(self, name: str) -> None:
        with self._locked():
            images = self.images()
            if name not in images:
                raise LayerfsError(f"no image {name!r}")
            users = [c for c in self.containers() if (self.container(c) or {}).get("image") == name]
            if users:
                raise LayerfsError(f"image {name!r} is used by container {', '.join(users)} (layerfs rm first)")
            del images[name]
            self._write_images(images)

    def layers(self) -> dict[str, list[str]]:
        """Every layer of the store (diff_id) -> the images and containers that use it."""
        users: dict[str, list[str]] = {f"sha256:{hexdigest}": [] for hexdigest in self._layer_dirs()}
        for name, image in self.images().items():
            for diff_id in image["layers"]:
                users.setdefault(diff_id, []).append(name)
        for name in self.containers():
            for diff_id in (self.container(name) or {}).get("layers", []):
                users.setdefault(diff_id, []).append(f"container {name}")
        return users

    def _layer_dirs(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "layers")))

    def gc(self) -> list[str]:
        """Remove the layers no image or container uses, and file data no layer shares any more."""
        with self._locked():
            unused = [diff_id for diff_id, users in self.layers().items() if not users]
            for diff_id in unused:
                doomed = os.path.join(self.root, "tmp", uuid.uuid4().hex)
                os.rename(self.layer_path(diff_id), doomed)
                shutil.rmtree(doomed)
            pool = os.path.join(self.root, "content")
            for parent, _, names in os.walk(pool):
                for name in names:
                    if os.lstat(os.path.join(parent, name)).st_nlink == 1:  # no layer links it any more
                        os.unlink(os.path.join(parent, name))
        return unused

    def _set_image(self, name: str, record: dict) -> None:
        images = self.images()
        images[name] = record
        self._write_images(images)

    def _write_images(self, images: dict) -> None:
        tmp = os.path.join(self.root, "images.json.tmp")
        with open(tmp, "w") as f:
            json.dump(images, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, "images.json"))

    def commit(self, upper: str, changes: Iterable[Change], *, share: str = "reflink",
               progress: Callable[[int, int], None] | None = None) -> Committed:
        """Freeze ``changes`` (as ``container_changes`` lists them) of ``upper`` into a layer."""
        found = list(changes)
        diff_id = write_layer(cast(BinaryIO, _Discard()), upper, found, progress=progress).diff_id
        final = self.layer_path(diff_id)
        with self._locked():
            if os.path.isdir(final):
                return Committed(final, diff_id, new=False)
            build = os.path.join(self.root, "tmp", uuid.uuid4().hex)
            os.mkdir(build, 0o755)
            try:
                _copy_changes(upper, found, build)
                self._share_content(build, share)
                os.sync()  # the layer is whole on disk before it gets its name
                os.rename(build, final)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
        return Committed(final, diff_id, new=True)

    def _share_content(self, layer: str, share: str) -> None:
        """Let each regular file of ``layer`` share its data with its alike in ``content``."""
        if share not in SHARING:
            raise LayerfsError(f"--share {share}: one of {', '.join(SHARING)}")
        if share == "none":
            return
        pool = os.path.join(self.root, "content")
        for parent, _, names in os.walk(layer):
            for name in names:
                path = os.path.join(parent, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    continue  # hard links inside the layer stay as the container made them
                key = _content_key(path, st)
                shared = os.path.join(pool, key[:2], key)
                os.makedirs(os.path.dirname(shared), exist_ok=True)
                if share == "hardlink":
                    try:
                        os.link(path, shared)
                    except FileExistsError:
                        _replace(path, functools.partial(os.link, shared))
                elif os.path.exists(shared):
                    _replace(path, functools.partial(_reflink, shared, st=st))
                elif not _reflink(path, shared, st):
                    return  # no reflinks on this filesystem: nothing to share


SHARING = ("reflink", "hardlink", "none")


def _replace(path: str, make: Callable[[str], object]) -> None:
    """Put what ``make`` creates at a temporary name in place of ``path``, unless it made nothing."""
    tmp = path + ".layerfs-share"
    if make(tmp) is False:
        return
    os.replace(tmp, path)


def _reflink(src: str, dst: str, st: os.stat_result) -> bool:
    """``dst``: a new file sharing ``src``'s data extents, with the metadata of ``st``; False (and
    nothing made) where the filesystem has no reflinks."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            cloned = syscalls.clone_file(src_fd, dst_fd)
            if cloned:
                os.fchown(dst_fd, st.st_uid, st.st_gid)  # first: it clears capabilities and setuid bits
                copyup.copy_xattrs(src, dst, src_dir_fd=None, dst_dir_fd=None)
                os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
                os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if not cloned:
        os.unlink(dst)
    return cloned


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


def _content_key(path: str, st: os.stat_result) -> str:
    h = xxhash.xxh3_128()
    h.update(file_digest(path).encode())
    h.update(repr((st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)).encode())
    for name in sorted(xattr.names(path)):
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + xattr.get(path, name))
    return h.hexdigest()


def _copy_changes(upper: str, changes: list[Change], build: str) -> None:
    """Write the layer for ``changes`` into the empty directory ``build``, in overlay form."""
    upper_fd = os.open(upper, _DIR)
    build_fd = os.open(build, _DIR)
    linked: dict[tuple[int, int], str] = {}  # upper (dev, ino) -> the layer path first written for it
    dirs: list[tuple[str, os.stat_result]] = []
    lowers: dict[str, int] = {}  # root -> descriptor, of the lowers that sources and data are in (Change)

    def lower(root: str) -> int:
        if root not in lowers:
            lowers[root] = os.open(root, _DIR)
        return lowers[root]

    try:
        for change in changes:
            if change.path == "/":
                continue
            parent, _, name = change.path.rpartition("/")
            if whiteout.is_marker_name(name):
                continue
            if change.source is None:
                src_dir, src_name = _open_dir(upper_fd, parent), name
            else:  # still in a lower layer, below a redirected directory
                root, real = change.source
                head, _, src_name = real.rpartition("/")
                src_dir = _open_dir(lower(root), head)
            data_at = None if change.data is None else (lower(change.data[0]), change.data[1][1:])
            dst_dir = _open_dir(build_fd, parent)
            try:
                _copy_one(change, src_name, name, src_dir, dst_dir, build_fd, linked, dirs, data_at)
            except FileNotFoundError as e:
                raise LayerfsError(f"cannot commit {change.path}: it is no longer in the upper directory") from e
            finally:
                os.close(src_dir)
                os.close(dst_dir)
        for path, st in reversed(dirs):  # times last: making children changes a directory's mtime
            parent, _, name = path.rpartition("/")
            fd = _open_dir(build_fd, parent)
            try:
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
    finally:
        for fd in [upper_fd, build_fd, *lowers.values()]:
            os.close(fd)


def _copy_one(change: Change, src_name: str, name: str, src_dir: int, dst_dir: int, build_fd: int, linked: dict,
              dirs: list, data_at: tuple[int, str] | None) -> None:
    """Copy one change into the layer being built; ``data_at`` is where a metadata-only copy's data is."""
    try:
        st = os.lstat(src_name, dir_fd=src_dir)
    except FileNotFoundError:
        if change.kind != DELETED:
            raise
        st = None  # deleted by an OCI-form whiteout file in the upper
    if st is None or whiteout.is_whiteout_stat(st):
        whiteout.make_whiteout(name, dir_fd=dst_dir)
        return
    if stat.S_ISSOCK(st.st_mode):
        return  # a socket belongs to a process; layers do not carry them
    if stat.S_ISDIR(st.st_mode):
        copyup.copy_entry(src_name, st, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, sync=False)
        if change.kind == DELETED or change.source is None and whiteout.is_opaque_dir(name, dir_fd=src_dir):
            whiteout.mark_opaque(name, dir_fd=dst_dir)  # a directory that replaced the lowers' one
        dirs.append((change.path, st))
        return
    first = linked.get((st.st_dev, st.st_ino))
    if first is not None:  # another name of a file this layer has already: a hard link, as in the upper
        os.link(first[1:], name, src_dir_fd=build_fd, dst_dir_fd=dst_dir, follow_symlinks=False)
        return
    copyup.copy_entry(src_name, st, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, data_at=data_at, sync=False)
    if st.st_nlink > 1:
        linked[(st.st_dev, st.st_ino)] = change.path
