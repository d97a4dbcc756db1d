"""Push: an image of an OCI image layout directory to a registry, its manifest's very bytes (so its digest is
the one it had). Blobs the repository has are not sent again; blobs another repository of the same registry
has are mounted from it (no bytes travel); the rest are uploaded, a few at a time, in one PUT each or, when
the registry asks for it or a blob is big, in PATCHes. The manifest goes last, once all its blobs are there.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

from ..errors import LayerfsError
from ..oci.layout import read_image
from .auth import Credentials, find_credentials
from .client import MANIFEST_TYPES, MAX_MANIFEST, OCI_MANIFEST, Manifest, RegistryClient
from .parallel import Counter, Progress, in_parallel
from .reference import Reference, parse_reference

CHUNK = 64 << 20  # the PATCH size for a blob larger than this, where the registry names none


class Blob(NamedTuple):
    digest: str
    size: int
    path: str


class Pushed(NamedTuple):
    manifest_digest: str
    uploaded: list[str]  # blob digests whose bytes were sent
    mounted: list[str]  # mounted from ``mount_from``
    present: list[str]  # the repository had them


def read_manifest(layout: str, tag: str | None = None) -> tuple[Manifest, list[Blob]]:
    """The image ``tag`` of ``layout`` (the only one if None): its manifest as stored, and its blobs (config
    first), all checked against their digests' form; the manifest and config against their digests."""
    image = read_image(layout, tag)
    path = os.path.join(layout, "blobs", "sha256", image.manifest_digest.removeprefix("sha256:"))
    if os.path.getsize(path) > MAX_MANIFEST:
        raise LayerfsError(f"{layout}: the manifest {image.manifest_digest} is larger than {MAX_MANIFEST >> 20} MiB")
    with open(path, "rb") as f:
        data = f.read()
    media_type = json.loads(data).get("mediaType") or OCI_MANIFEST  # read_image checked it is a JSON object
    if media_type not in MANIFEST_TYPES:
        raise LayerfsError(f"{layout}: the manifest {image.manifest_digest} is a {media_type}, not an image manifest")
    config_path = os.path.join(layout, "blobs", "sha256", image.config_digest.removeprefix("sha256:"))
    blobs = [Blob(image.config_digest, os.path.getsize(config_path), config_path)]
    for layer in image.layers:
        assert layer.digest is not None  # a layout names every blob by its digest
        blobs.append(Blob(layer.digest, layer.size, layer.path))
    return Manifest(data, media_type, image.manifest_digest), blobs


def push(
    layout: str,
    reference: Reference | str,
    *,
    tag: str | None = None,
    mount_from: str | None = None,
    tls_verify: bool = True,
    credentials: Credentials | None = None,
    progress: Progress | None = None,
    jobs: int = 4,
    chunk_size: int | None = None,
    timeout: float = 30.0,
) -> Pushed:
    """Push the image ``tag`` of ``layout`` (the only one if None) as ``reference``. ``mount_from``: a
    repository of the same registry that may hold its blobs. ``credentials``: found in the auth files if
    None. ``chunk_size``: upload every blob in PATCHes of this size (else as the module's doc says)."""
    manifest, blobs = read_manifest(layout, tag)
    return push_image(
        manifest,
        blobs,
        reference,
        mount_from=mount_from,
        tls_verify=tls_verify,
        credentials=credentials,
        progress=progress,
        jobs=jobs,
        chunk_size=chunk_size,
        timeout=timeout,
    )


def push_image(
    manifest: Manifest,
    blobs: list[Blob],
    reference: Reference | str,
    *,
    mount_from: str | None = None,
    tls_verify: bool = True,
    credentials: Credentials | None = None,
    progress: Progress | None = None,
    jobs: int = 4,
    chunk_size: int | None = None,
    timeout: float = 30.0,
) -> Pushed:
    """``push`` of an image kept elsewhere than a layout: its ``manifest`` and its ``blobs`` as files."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    if ref.digest and ref.digest != manifest.digest:
        raise LayerfsError(f"{ref}: the image's manifest is {manifest.digest}")
    if credentials is None:
        credentials = find_credentials(ref.registry, ref.repository)
    with RegistryClient(
        ref.registry, credentials, tls_verify=tls_verify, timeout=timeout, actions="pull,push"
    ) as client:
        return push_manifest(
            client,
            ref.repository,
            ref.tag or manifest.digest,
            manifest,
            blobs,
            mount_from=mount_from if mount_from != ref.repository else None,
            progress=progress,
            jobs=jobs,
            chunk_size=chunk_size,
        )


def push_manifest(
    client: RegistryClient,
    repository: str,
    version: str,
    manifest: Manifest,
    blobs: list[Blob],
    *,
    mount_from: str | None = None,
    progress: Progress | None = None,
    jobs: int = 4,
    chunk_size: int | None = None,
) -> Pushed:
    """Put ``blobs`` (files, named by digest) into ``repository`` where it lacks them, then ``manifest`` as
    ``version``: the part of a push that does not care where the blobs are kept."""
    counter = Counter(progress, sum(blob.size for blob in blobs), "push")
    put = functools.partial(_put_blob, client, repository, mount_from, chunk_size, counter)
    unique = list({blob.digest: blob for blob in blobs}.values())
    outcomes = in_parallel([functools.partial(put, blob) for blob in unique], jobs)
    client.put_manifest(repository, version, manifest)
    by = {
        outcome: [blob.digest for blob, o in zip(unique, outcomes, strict=True) if o == outcome]
        for outcome in ("uploaded", "mounted", "present")
    }
    return Pushed(manifest.digest, by["uploaded"], by["mounted"], by["present"])


def _put_blob(
    client: RegistryClient,
    repository: str,
    mount_from: str | None,
    chunk_size: int | None,
    on_bytes: Callable[[int], None],
    blob: Blob,
    stop: threading.Event,
) -> str:
    """Put one blob into ``repository`` as the module's doc says; which way it went."""
    if client.has_blob(repository, blob.digest):
        on_bytes(blob.size)
        return "present"
    upload = client.start_upload(repository, blob.digest, mount_from)
    if upload is None:
        on_bytes(blob.size)
        return "mounted"
    if not os.path.isfile(blob.path):
        raise LayerfsError(f"{blob.path}: blob {blob.digest} is not there to push")
    if chunk_size is None and (upload.min_chunk or blob.size > CHUNK):
        chunk_size = max(upload.min_chunk or 0, CHUNK)
    client.upload_blob(
        repository,
        upload.location,
        blob.digest,
        blob.path,
        blob.size,
        chunk_size=chunk_size,
        on_bytes=on_bytes,
        stop=stop,
    )
    return "uploaded"
