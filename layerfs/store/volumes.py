"""Volumes of the store, as docker's local driver keeps them: ``STORE/volumes/<name>/_data`` (what
containers mount) beside ``volume.json`` (when it was made, whether it is anonymous). A named volume is
made on first use (``-v NAME:/path``) or by ``layerfs volume create``; an anonymous one (``-v /path``)
gets a random 64-hex name and goes with its container's ``run --rm`` or ``rm -v``."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime

from ..errors import LayerfsError
from .root import Root

NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


class VolumeInUse(LayerfsError):
    def __init__(self, name: str, users: list[str]) -> None:
        super().__init__(f"volume {name} is in use by container {', '.join(users)}")


def checked_name(name: str) -> str:
    """``name`` if docker takes it as a volume's name; a LayerfsError in docker's words otherwise."""
    if not NAME.fullmatch(name):
        raise LayerfsError(
            f'"{name}" includes invalid characters for a local volume name, only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are '
            "allowed. If you intended to pass a host directory, use absolute path"
        )
    return name


class Volumes:
    def __init__(self, root: Root) -> None:
        self.root = root

    def data(self, name: str) -> str:
        """Where volume ``name``'s content is (what a container mounts)."""
        return self.root.sub("volumes", checked_name(name), "_data")

    def get(self, name: str) -> dict | None:
        """Volume ``name`` as docker's ``volume inspect`` shows one; None if there is none."""
        try:
            with open(self.root.sub("volumes", checked_name(name), "volume.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        return {
            "CreatedAt": record["created"],
            "Driver": "local",
            "Labels": {"com.docker.volume.anonymous": ""} if record.get("anonymous") else {},
            "Mountpoint": self.data(name),
            "Name": name,
            "Options": {},
            "Scope": "local",
        }

    def is_anonymous(self, name: str) -> bool:
        return "com.docker.volume.anonymous" in (self.get(name) or {}).get("Labels", {})

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root.sub("volumes")) if self.get(n) is not None)
        except FileNotFoundError:
            return []

    def create(self, name: str | None) -> tuple[str, bool]:
        """(Holding the lock.) Volume ``name`` (a new anonymous one for None), made if missing; its name, and
        whether it was made now."""
        anonymous = name is None
        name = os.urandom(32).hex() if name is None else checked_name(name)
        if self.get(name) is not None:
            return name, False
        build = self.root.scratch()
        os.makedirs(os.path.join(build, "_data"), mode=0o755)
        with open(os.path.join(build, "volume.json"), "w") as f:
            json.dump({"created": datetime.now(UTC).isoformat(), "anonymous": anonymous}, f, indent=1)
        os.makedirs(self.root.sub("volumes"), exist_ok=True)
        os.rename(build, self.root.sub("volumes", name))
        return name, True

    def remove(self, name: str) -> None:
        """(Holding the lock.) Volume ``name`` gone with its content."""
        if self.get(name) is None:
            raise LayerfsError(f"no such volume: {name}")
        self.root.discard(self.root.sub("volumes", name))
