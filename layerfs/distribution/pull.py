"""Pull: an image from a registry into an OCI image layout directory, every byte as the registry holds it
(so its digests are the registry's), ready for the store's ``oci:DIR`` import.

A multi-platform index gives the image for the host's platform (or the one asked for); the manifest and
config are always fetched, layers the caller already has (``have``) are not, the others are fetched a few at
a time. Blobs land in the layout only once their digest is checked, and the index names the image only
when all its blobs are there: an interrupted pull leaves no partial blob and no index entry behind.
"""

from __future__ import annotations

import functools
import json
import os
import platform as host
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import LayerfsError, printable
from ..oci.layout import add_to_index, checked_digest
from .auth import Credentials, find_credentials
from .client import INDEX_TYPES, MANIFEST_TYPES, Manifest, RegistryClient
from .parallel import Counter, Progress, in_parallel
from .reference import Reference, parse_reference

# platform.machine() as OCI names architectures (and variants), per the image index spec
_ARCHITECTURES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in self if p)


class Pulled(NamedTuple):
    manifest_digest: str
    config_digest: str
    fetched: list[str]  # the blobs downloaded
    skipped: list[str]  # the layers ``have`` said are there already


def parse_platform(text: str) -> Platform:
    """``OS/ARCH[/VARIANT]``, as ``--platform`` takes it."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise LayerfsError(f"platform {printable(text)!r}: not OS/ARCH[/VARIANT] (such as linux/arm64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    machine = host.machine()
    architecture, variant = _ARCHITECTURES.get(machine, (machine, None))
    return Platform("linux", architecture, variant)


def _matches(entry: dict, want: Platform) -> bool:
    got = entry.get("platform")
    if not isinstance(got, dict) or (got.get("os"), got.get("architecture")) != (want.os, want.architecture):
        return False
    if want.variant is None:
        return True
    default = "v8" if want.architecture == "arm64" else None  # arm64 images often name no variant
    return (got.get("variant") or default) == want.variant


def _document(manifest: Manifest, where: str) -> dict:
    try:
        document = json.loads(manifest.data)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise LayerfsError(f"{where}: the manifest {manifest.digest} is not a JSON object")
    return document


def _kind(manifest: Manifest, document: dict, where: str) -> str:
    """The manifest's media type (its own field before the HTTP header), if it is one we read."""
    kind = document.get("mediaType") or manifest.media_type
    if kind in MANIFEST_TYPES + INDEX_TYPES:
        return kind
    if document.get("schemaVersion") == 1:
        raise LayerfsError(
            f"{where}: a Docker schema 1 manifest, which is not supported (push it again with a current tool)"
        )
    raise LayerfsError(f"{where}: {printable(str(kind))!r} is not an image manifest or index")


def _descriptor(value: Any, where: str) -> tuple[str, int]:
    """A descriptor's digest (checked for its form: it becomes a path) and size."""
    if not isinstance(value, dict):
        raise LayerfsError(f"{where}: a descriptor is not a JSON object")
    digest = checked_digest(value.get("digest"), where)
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LayerfsError(f"{where}: blob {digest} has no valid size")
    return digest, size


def _fetch_manifest(client: RegistryClient, repository: str, version: str, where: str) -> tuple[Manifest, dict]:
    """A manifest or index, its media type as the document says, and the document."""
    manifest = client.get_manifest(repository, version)
    document = _document(manifest, where)
    return manifest._replace(media_type=_kind(manifest, document, where)), document


def resolve(client: RegistryClient, reference: Reference, want: Platform) -> tuple[Manifest, dict]:
    """The image manifest ``reference`` names (from an index, the one for ``want``), and its document."""
    where = str(reference)
    manifest, document = _fetch_manifest(client, reference.repository, reference.version, where)
    if manifest.media_type in INDEX_TYPES:
        entries = document.get("manifests")
        entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        chosen = [e for e in entries if _matches(e, want)]
        if not chosen:
            offered = sorted(
                {
                    str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
                    for e in entries
                    if isinstance(p := e.get("platform"), dict)
                }
            )
            raise LayerfsError(f"{where}: no image for {want} (it has {', '.join(offered) or 'none'})")
        digest, _ = _descriptor(chosen[0], where)
        manifest, document = _fetch_manifest(client, reference.repository, digest, where)
        if manifest.media_type in INDEX_TYPES:
            raise LayerfsError(f"{where}: its index for {want} names another index")
    return manifest, document


def pull(
    reference: Reference | str,
    layout: str,
    *,
    platform: str | None = None,
    tls_verify: bool = True,
    credentials: Credentials | None = None,
    have: Callable[[str], bool] = lambda digest: False,
    progress: Progress | None = None,
    jobs: int = 4,
    timeout: float = 30.0,
) -> Pulled:
    """Pull ``reference`` into the OCI image layout ``layout`` (made if missing; other images in it kept),
    listed in its index by the reference's tag. ``credentials``: found in the auth files if None.
    ``have(digest)``: True for a layer blob not to fetch (the layout then lacks it). ``progress(done, total,
    label)`` is told of the layers' bytes as they arrive."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    want = parse_platform(platform) if platform else host_platform()
    if credentials is None:
        credentials = find_credentials(ref.registry, ref.repository)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    with RegistryClient(ref.registry, credentials, tls_verify=tls_verify, timeout=timeout) as client:
        manifest, document = resolve(client, ref, want)
        where = f"{ref}: manifest {manifest.digest}"
        config_digest, config_size = _descriptor(document.get("config"), where)
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise LayerfsError(f"{where}: its layers are not a list")
        layer_blobs = [_descriptor(d, where) for d in layers]
        skipped = [digest for digest, _ in layer_blobs if have(digest)]
        wanted = [(config_digest, config_size)] + [(d, s) for d, s in layer_blobs if d not in skipped]
        wanted = [(d, s) for d, s in dict(wanted).items() if not os.path.exists(os.path.join(blobs, d[7:]))]
        counter = Counter(progress, sum(size for _, size in wanted), "pull")
        in_parallel(
            [
                functools.partial(client.fetch_blob, ref.repository, digest, blobs, size, counter)
                for digest, size in wanted
            ],
            jobs,
        )
        _write_blob(blobs, manifest)
    add_to_index(
        layout, {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.data)}, ref.tag
    )
    return Pulled(manifest.digest, config_digest, [d for d, _ in wanted], skipped)


def _write_blob(blobs: str, manifest: Manifest) -> None:
    tmp = os.path.join(blobs, f".{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as f:
        f.write(manifest.data)
    os.replace(tmp, os.path.join(blobs, manifest.digest.removeprefix("sha256:")))
