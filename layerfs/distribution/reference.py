"""Image references as docker and podman read them, checked by the distribution spec's grammar.

    busybox                      docker.io/library/busybox:latest
    127.0.0.1:5000/app:v1        that registry, repository ``app``, tag ``v1``
    quay.io/x/y@sha256:<hex>     by digest (a tag beside it, ``y:v1@sha256:...``, is kept but the digest rules)

The first part of a name is a registry when it has a ``.`` or a ``:`` or is ``localhost``, as docker decides;
otherwise the image is on Docker Hub, and a one-part name there is in ``library/``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import LayerfsError, printable
from ..oci.layout import checked_digest

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_MAX_NAME = 255  # registry and repository together, as docker's reference package allows


class Reference(NamedTuple):
    registry: str  # "docker.io", "127.0.0.1:5000"
    repository: str  # "library/busybox"
    tag: str | None  # None only beside a digest
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository``, as ``podman images`` shows it."""
        return f"{self.registry}/{self.repository}"

    @property
    def version(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """``text`` as a full reference (see the module's doc); a LayerfsError naming what is wrong otherwise."""
    shown = printable(text)
    rest, at, digest = text.partition("@")
    if at:
        digest = checked_digest(digest, f"reference {shown}")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = None
    if colon > slash:  # a colon after the last slash is a tag's; before it, a registry's port
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise LayerfsError(f"reference {shown}: {printable(tag)!r} is not a valid tag")
    first, slash_found, remainder = rest.partition("/")
    if slash_found and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
        if not _REGISTRY.fullmatch(registry):
            raise LayerfsError(f"reference {shown}: {printable(registry)!r} is not a valid registry name")
    else:
        registry, repository = DOCKER_HUB, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if not _REPOSITORY.fullmatch(repository):
        why = " (names are lowercase)" if _REPOSITORY.fullmatch(repository.lower()) else ""
        raise LayerfsError(f"reference {shown}: {printable(repository)!r} is not a valid repository name{why}")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(registry) + 1 + len(repository) > _MAX_NAME:
        raise LayerfsError(f"reference {shown}: the name is longer than {_MAX_NAME} characters")
    if tag is None and not digest:
        tag = "latest"
    return Reference(registry, repository, tag, digest or None)
