"""Images as tools exchange them: an OCI image layout directory (``oci:DIR[:TAG]``, what skopeo, umoci
and buildah write, and what ``write_image`` writes), and the unpacked content of a ``docker save`` archive.

    DIR/oci-layout          {"imageLayoutVersion": "1.0.0"}
    DIR/index.json          manifests, a tag in each one's ``org.opencontainers.image.ref.name``
    DIR/blobs/sha256/<hex>  manifests, configs and layers, each named by the sha256 of its bytes

    DIR/manifest.json       docker save: [{"Config": FILE, "RepoTags": [...], "Layers": [FILE, ...]}]

Every blob is checked against its name as it is read: a manifest or config before it is parsed, a layer
as it streams (``VerifiedBlob`` fails at its end if the bytes were not the ones named). A docker archive
names its layers by file, not digest: their diff_ids, checked when they are unpacked, vouch for them.
What the documents say is checked for its shape (a field of the wrong type is a one-line LayerfsError)
and every digest and diff_id for being one: the store makes a path of a diff_id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any, BinaryIO, NamedTuple

from ..errors import LayerfsError

_REF_NAME = "org.opencontainers.image.ref.name"
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
_MAX_JSON = 16 << 20  # a manifest, config or index larger than this is not one
_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer"}


class Layer(NamedTuple):
    path: str  # the blob's file
    digest: str | None  # of the blob as stored (compressed or not); None where the format names none
    diff_id: str  # of the uncompressed tar, from the config
    size: int
    media_type: str

    def open(self) -> BinaryIO | VerifiedBlob:
        """The blob as a stream; checked against its digest as it is read, where it has one."""
        if self.digest is not None:
            return VerifiedBlob(self.path, self.digest, self.size)
        return open(self.path, "rb")


class Image(NamedTuple):
    manifest_digest: str
    config_digest: str
    config: dict
    layers: list[Layer]  # bottom first, as the manifest lists them
    manifest_path: str | None  # the manifest's blob; None in a docker archive, which has none
    config_path: str
    names: list[str]  # what the archive calls it: its ref.name annotation, or docker's RepoTags


def _typed(value: object, kind: type, what: str) -> Any:
    """``value``, read from a JSON document, if it is a ``kind``; else the LayerfsError saying ``what`` is not."""
    if not isinstance(value, kind) or kind is int and isinstance(value, bool):
        raise LayerfsError(f"{what} is not {_KINDS[kind]}")
    return value


def checked_digest(value: object, where: str) -> str:
    """``value`` if it is a sha256 digest; else a LayerfsError (a digest becomes a path: nothing else may)."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise LayerfsError(f"{where}: {value!r} is not a sha256 digest")
    return value


def _diff_ids(config: object, where: str) -> list[str]:
    """The config's rootfs.diff_ids, each a sha256 digest."""
    rootfs = _typed(_typed(config, dict, f"{where}: the config").get("rootfs") or {}, dict, f"{where}: its rootfs")
    diff_ids = _typed(rootfs.get("diff_ids") or [], list, f"{where}: diff_ids")
    return [checked_digest(d, f"{where}: diff_id") for d in diff_ids]


def _blob_path(layout: str, digest: object) -> str:
    return os.path.join(layout, "blobs", "sha256", checked_digest(digest, layout).removeprefix("sha256:"))


class VerifiedBlob:
    """A blob read as a stream, its sha256 and size checked when its end is reached."""

    def __init__(self, path: str, digest: str, size: int) -> None:
        self.digest, self.size, self.name = digest, size, f"blob {digest}"
        try:
            self._f: BinaryIO = open(path, "rb")
        except FileNotFoundError:
            raise LayerfsError(f"the image names {digest}, which its archive or layout does not have") from None
        self._hash = hashlib.sha256()
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hash.update(data)
        self._read += len(data)
        if not data or (n < 0):
            self._check()
        return data

    def _check(self) -> None:
        if self._read != self.size or f"sha256:{self._hash.hexdigest()}" != self.digest:
            raise LayerfsError(f"{self.name}: its content does not match its digest (or size {self.size})")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> VerifiedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_blob(layout: str, digest: object, what: str) -> dict:
    path = _blob_path(layout, digest)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_JSON + 1)
    except FileNotFoundError:
        raise LayerfsError(f"{layout}: the {what} {digest} is missing") from None
    except OSError as e:  # a directory, say
        raise LayerfsError(f"{layout}: the {what} {digest} cannot be read: {e.strerror}") from None
    if len(data) > _MAX_JSON or f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise LayerfsError(f"{layout}: the {what} {digest} does not match its digest")
    try:
        return _typed(json.loads(data), dict, f"{layout}: the {what} {digest}")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise LayerfsError(f"{layout}: the {what} {digest} is not JSON") from None


def read_image(layout: str, tag: str | None = None) -> Image:
    """The image tagged ``tag`` in ``layout`` (the only one, if no tag is given)."""
    try:
        with open(os.path.join(layout, "oci-layout")) as f:
            oci_layout = json.load(f)
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
    except FileNotFoundError as e:
        raise LayerfsError(f"{layout}: not an OCI image layout (no {os.path.basename(e.filename)})") from None
    except OSError as e:  # a directory, say
        name = os.path.basename(e.filename)
        raise LayerfsError(f"{layout}: not an OCI image layout ({name}: {e.strerror})") from None
    except (ValueError, RecursionError):
        raise LayerfsError(f"{layout}: not an OCI image layout (its index or oci-layout is not JSON)") from None
    version = oci_layout.get("imageLayoutVersion") if isinstance(oci_layout, dict) else None
    if version != "1.0.0":
        raise LayerfsError(f"{layout}: image layout version {version!r}, not 1.0.0")
    manifests = _typed(
        _typed(index, dict, f"{layout}: the index").get("manifests") or [], list, f"{layout}: the index's manifests"
    )

    def ref_name(m: object) -> object:
        entry = _typed(m, dict, f"{layout}: an entry of the index")
        return _typed(entry.get("annotations") or {}, dict, f"{layout}: an index entry's annotations").get(_REF_NAME)

    if tag is not None:
        manifests = [m for m in manifests if ref_name(m) == tag]
        if not manifests:
            raise LayerfsError(f"{layout}: no image tagged {tag!r}")
    if len(manifests) != 1:
        tags = sorted(
            "?" if t is None else t if isinstance(t, str) and t.isprintable() else repr(t)
            for t in map(ref_name, manifests)
        )
        raise LayerfsError(f"{layout}: {len(manifests)} images; say which (:TAG): {', '.join(tags)}")
    descriptor = _typed(manifests[0], dict, f"{layout}: an entry of the index")
    if descriptor.get("mediaType") in _INDEX_TYPES:
        raise LayerfsError(f"{layout}: a multi-platform index; copy one platform's image (skopeo --override-arch)")
    manifest = _json_blob(layout, descriptor.get("digest"), "manifest")
    where = f"{layout}: the manifest {descriptor['digest']}"
    config_digest = _typed(manifest.get("config"), dict, f"{where}: its config").get("digest")
    config = _json_blob(layout, config_digest, "config")
    diff_ids = _diff_ids(config, f"{layout}: the config {config_digest}")
    descriptors = [
        _typed(d, dict, f"{where}: a layer") for d in _typed(manifest.get("layers") or [], list, f"{where}: its layers")
    ]
    if len(diff_ids) != len(descriptors):
        raise LayerfsError(f"{layout}: the manifest lists {len(descriptors)} layers, the config {len(diff_ids)}")
    layers = []
    for d, diff_id in zip(descriptors, diff_ids, strict=True):
        path = _blob_path(layout, d.get("digest"))
        size = _typed(d.get("size"), int, f"{where}: the size of layer {d['digest']}")
        if size < 0:
            raise LayerfsError(f"{where}: layer {d['digest']} has the size {size}")
        media_type = _typed(d.get("mediaType", ""), str, f"{where}: the mediaType of layer {d['digest']}")
        layers.append(Layer(path, d["digest"], diff_id, size, media_type))
    name = ref_name(descriptor)
    return Image(
        descriptor["digest"],
        config_digest,
        config,
        layers,
        _blob_path(layout, descriptor["digest"]),
        _blob_path(layout, config_digest),
        [name] if isinstance(name, str) and name else [],
    )


def read_docker_save(root: str, name: str | None = None) -> Image:
    """The image ``name`` (one of its RepoTags; the only one if None) of an unpacked ``docker save``."""
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            entries = json.load(f)
    except (OSError, ValueError, RecursionError):
        raise LayerfsError("not a docker archive (no readable manifest.json)") from None
    entries = [
        _typed(e, dict, "docker archive: an entry of manifest.json")
        for e in _typed(entries, list, "docker archive: manifest.json")
    ]

    def tags(e: dict) -> list[str]:
        return [
            _typed(t, str, "docker archive: a RepoTag")
            for t in _typed(e.get("RepoTags") or [], list, "docker archive: RepoTags")
        ]

    if name is not None:
        entries = [e for e in entries if name in tags(e) or any(t.endswith("/" + name) for t in tags(e))]
    if len(entries) != 1:
        raise LayerfsError(f"the docker archive holds {len(entries)} images{' named ' + name if name else ''}")
    entry = entries[0]
    config_name = _typed(entry.get("Config"), str, "docker archive: its Config")
    config_path = _inside(root, config_name)
    with open(config_path, "rb") as blob:
        data = blob.read(_MAX_JSON + 1)
    config_digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    stem = os.path.basename(config_path).removesuffix(".json")
    if len(stem) == 64 and f"sha256:{stem}" != config_digest:
        raise LayerfsError(f"docker archive: the config {config_name!r} does not match its name")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise LayerfsError(f"docker archive: the config {config_name!r} is not JSON") from None
    diff_ids = _diff_ids(config, "docker archive")
    files = _typed(entry.get("Layers") or [], list, "docker archive: its Layers")
    if len(diff_ids) != len(files):
        raise LayerfsError(f"docker archive: {len(files)} layer files, {len(diff_ids)} in the config")
    layers = []
    for file, diff_id in zip(files, diff_ids, strict=True):
        path = _inside(root, _typed(file, str, "docker archive: a layer file's name"))
        layers.append(Layer(path, None, diff_id, os.path.getsize(path), "application/vnd.docker.image.rootfs.diff.tar"))
    manifest_digest = f"sha256:{hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()}"
    return Image(manifest_digest, config_digest, config, layers, None, config_path, tags(entry))


def _inside(root: str, name: str) -> str:
    """``name`` (from an archive's manifest) as a file below ``root``, symlinks resolved inside it."""
    path = "" if "\0" in name else os.path.realpath(os.path.join(root, name))  # realpath fails on a NUL
    if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
        raise LayerfsError(f"archive names {name!r}, which it does not hold")
    return path


def write_image(dest: str, tag: str, layer_dirs: list[str], config: dict) -> str:
    """Write the image of ``layer_dirs`` (bottom first; each a layer directory in overlay or OCI form) into
    the OCI image layout ``dest`` (made if missing) as ``tag``, replacing an image of that tag: each layer as
    a gzip layer tar of what it changes over those below it, then ``config`` (its ``rootfs`` naming these
    tars' diff_ids), the manifest and the index entry. Returns the manifest's digest."""
    import uuid  # (here: reading a layout, the store's and the registry's work, needs none of these)

    from ..core.changes import changes
    from .layertar import write_layer

    blobs = os.path.join(dest, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    descriptors, diff_ids = [], []
    for number, layer in enumerate(layer_dirs):
        found = changes(layer, list(reversed(layer_dirs[:number])))
        tmp = os.path.join(blobs, f".{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as out:
                written = write_layer(out, layer, found, compress=True)
            os.replace(tmp, os.path.join(blobs, written.digest.removeprefix("sha256:")))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        descriptors.append({"mediaType": _LAYER_GZIP, "digest": written.digest, "size": written.size})
        diff_ids.append(written.diff_id)
    config = json.loads(json.dumps(config))
    config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
    config_descriptor = _write_json_blob(blobs, config, _CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": _MANIFEST, "config": config_descriptor, "layers": descriptors}
    manifest_descriptor = _write_json_blob(blobs, manifest, _MANIFEST)
    add_to_index(dest, manifest_descriptor, tag)
    return manifest_descriptor["digest"]


def add_to_index(dest: str, descriptor: dict, tag: str | None) -> None:
    """List the manifest ``descriptor`` (its blob in place already) in the index of the layout ``dest`` as
    ``tag`` (in ``org.opencontainers.image.ref.name``; none if None), in place of the image it had of that
    tag, and mark ``dest`` an OCI image layout."""
    entry = dict(descriptor)
    if tag:
        entry["annotations"] = {**entry.get("annotations", {}), _REF_NAME: tag}
    index_path = os.path.join(dest, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(_REF_NAME) != tag]
    index["manifests"].append(entry)
    for path, content in ((os.path.join(dest, "oci-layout"), {"imageLayoutVersion": "1.0.0"}), (index_path, index)):
        with open(path + ".tmp", "w") as f:
            json.dump(content, f)
        os.replace(path + ".tmp", path)


def _write_json_blob(blobs: str, content: dict, media_type: str) -> dict:
    data = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = os.path.join(blobs, digest.removeprefix("sha256:"))
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}
