"""A stored image written out with its stored bytes (its digests unchanged, no layer tarred again):

    oci              an OCI image layout directory (other images in it kept; this one listed by its tag)
    oci-archive      a tar of such a layout, as ``skopeo copy ... oci-archive:FILE`` writes
    docker-archive   what ``docker save`` writes since Docker 25: the OCI layout's files and docker's
                     ``manifest.json`` naming the same blobs, with the image's name in ``RepoTags``

Archives are written beside their final name and renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from ..errors import LayerfsError
from ..oci.layout import add_to_index

if TYPE_CHECKING:  # (annotations only: the registry client is imported by what uses it)
    from ..distribution.client import Manifest
    from ..distribution.push import Blob

FORMATS = ("oci", "oci-archive", "docker-archive")
_REF_NAME = "org.opencontainers.image.ref.name"


def write(kind: str, dest: str, manifest: Manifest, blobs: list[Blob], *, tag: str, name: str) -> None:
    """Write the image of ``manifest`` and ``blobs`` (config first) to ``dest`` as ``kind`` (one of
    ``FORMATS``), listed as ``tag`` in an OCI index and as ``name`` in a docker archive's RepoTags."""
    if kind not in FORMATS:
        raise LayerfsError(f"{kind}: not a format to save in ({', '.join(FORMATS)})")
    if kind == "oci":
        _write_layout(dest, manifest, blobs, tag)
        return
    members: list[tuple[str, bytes | str]] = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    members += [(_blob_name(blob.digest), blob.path) for blob in blobs]
    members.append((_blob_name(manifest.digest), manifest.data))
    entry = {**_descriptor(manifest), "annotations": {_REF_NAME: tag}}
    members.append(("index.json", json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()))
    if kind == "docker-archive":
        docker = [
            {
                "Config": _blob_name(blobs[0].digest),
                "RepoTags": [name],
                "Layers": [_blob_name(blob.digest) for blob in blobs[1:]],
            }
        ]
        members.append(("manifest.json", json.dumps(docker).encode()))
    with atomic_file(dest) as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for arcname, content in members:
            info = tarfile.TarInfo(arcname)
            info.mode = 0o644
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size = os.path.getsize(content)
                with open(content, "rb") as f:
                    tar.addfile(info, f)


def _write_layout(dest: str, manifest: Manifest, blobs: list[Blob], tag: str) -> None:
    directory = os.path.join(dest, "blobs", "sha256")
    os.makedirs(directory, exist_ok=True)
    for blob in blobs:
        final = os.path.join(dest, _blob_name(blob.digest))
        if not os.path.exists(final):
            with atomic_file(final) as out, open(blob.path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    with atomic_file(os.path.join(dest, _blob_name(manifest.digest))) as out:
        out.write(manifest.data)
    add_to_index(dest, _descriptor(manifest), tag)


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _descriptor(manifest: Manifest) -> dict:
    return {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.data)}


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """A file written as ``path.partial``, renamed to ``path`` once complete (removed if not)."""
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
