"""The documents of images made here (a commit, a root filesystem tar, a docker archive, which has no
manifest): configs with ``created`` and ``history`` filled in as docker fills them, and manifests in the
form of the image they grow from (Docker's schema 2 over a Docker image, OCI's otherwise).

A document's bytes are its digest: they are made once, stored as a blob, and never written again.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_CONFIG = {
    OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
    DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json",
}
_LAYER = {
    OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar",
    DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar",
}
_SUFFIX = {OCI_MANIFEST: {"gzip": "+gzip", "zstd": "+zstd"}, DOCKER_MANIFEST: {"gzip": ".gzip", "zstd": ".zstd"}}
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def now() -> str:
    """The time as a config's ``created`` has it (RFC 3339, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compression_of(head: bytes) -> str | None:
    """``gzip``, ``zstd`` or None (a plain tar), from a layer's first bytes."""
    return "gzip" if head.startswith(_GZIP_MAGIC) else "zstd" if head.startswith(_ZSTD_MAGIC) else None


def layer_type(manifest_type: str, compression: str | None) -> str:
    """The media type of a layer compressed so (or not) in a manifest of ``manifest_type``."""
    return _LAYER[manifest_type] + (_SUFFIX[manifest_type][compression] if compression else "")


def dump(document: dict) -> bytes:
    """A document's bytes, as docker writes them (compact)."""
    return json.dumps(document, separators=(",", ":")).encode()


def commit_config(parent: dict, diff_id: str, created_by: str) -> dict:
    """``parent``'s config with one more layer, ``diff_id``, made now by ``created_by``."""
    config = copy.deepcopy(parent)
    created = now()
    config["created"] = created
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [diff_id]
    config.setdefault("history", []).append({"created": created, "created_by": created_by})
    return config


def rootfs_config(diff_id: str, created_by: str) -> dict:
    """The config of a one-layer image made of a root filesystem tar, as ``docker import`` makes it."""
    created = now()
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": created_by}],
    }


def manifest(manifest_type: str, config: tuple[str, int], layers: list[tuple[str, int, str]]) -> dict:
    """A manifest of ``manifest_type`` naming the ``config`` blob (digest, size) and ``layers`` (digest,
    size, media type), bottom first."""
    document: dict = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": _CONFIG[manifest_type], "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": kind, "digest": digest, "size": size} for digest, size, kind in layers],
    }
    return document


def with_layer(parent: dict, config: tuple[str, int], layer: tuple[str, int, str]) -> dict:
    """``parent`` (a manifest) with its config replaced and ``layer`` (digest, size, media type) on top."""
    document = copy.deepcopy(parent)
    document["config"] = {**document["config"], "digest": config[0], "size": config[1]}
    document["layers"] = list(document.get("layers") or []) + [
        {"mediaType": layer[2], "digest": layer[0], "size": layer[1]}
    ]
    document.pop("annotations", None)  # the parent's, such as its creation date or base name, are not ours
    return document
