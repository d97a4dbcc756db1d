"""Containers of the store: ``STORE/containers/<name>/container.json`` (the image it came from and its
layers' diff_ids, or the plain lower directories it was run on; when it was made; the paths the runtime
made in it; the volumes mounted in it) beside its ``upper``, ``work`` and ``merged`` (its default mount
point) directories."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime

from ..errors import LayerfsError
from .layers import Layers
from .root import Root


class ContainerMounted(LayerfsError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"container {name!r} is mounted at {where}")


class Containers:
    def __init__(self, root: Root, layers: Layers) -> None:
        self.root = root
        self.layers = layers

    def dir(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise LayerfsError(f"{name!r}: not a container name")
        return self.root.sub("containers", name)

    def get(self, name: str) -> dict | None:
        """The record of container ``name`` (or of the one container whose id starts with ``name``, as docker
        takes either), with its directories; None if there is none."""
        where = self.dir(name)
        try:
            with open(os.path.join(where, "container.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            return self._by_id(name)
        record.update(
            upper=os.path.join(where, "upper"),
            work=os.path.join(where, "work"),
            merged=os.path.join(where, "merged"),
            lowers=record.get("lower_dirs") or [self.layers.path(d) for d in reversed(record["layers"])],
        )
        return record

    def _by_id(self, prefix: str) -> dict | None:
        if not all(c in "0123456789abcdef" for c in prefix):
            return None
        found = []
        for name in self.names():
            with contextlib.suppress(FileNotFoundError), open(self.root.sub("containers", name, "container.json")) as f:
                if json.load(f).get("id", "").startswith(prefix):
                    found.append(name)
        return self.get(found[0]) if len(found) == 1 else None

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root.sub("containers")))
        except FileNotFoundError:
            return []

    def using(self, image: str) -> list[str]:
        """The containers made from image ``image``."""
        return [name for name in self.names() if (self.get(name) or {}).get("image") == image]

    def create(self, name: str, image: str, image_record: dict | None, lower_dirs: list[str] | None = None) -> dict:
        """(Holding the lock.) A new container of ``image``: an empty upper over the image's layers (or, with
        no image, over the plain directories ``lower_dirs``, top first)."""
        where = self.dir(name)
        if os.path.exists(where):
            raise LayerfsError(f"container {name!r} exists already")
        build = self.root.scratch()
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(build, sub), mode=0o755)
        with open(os.path.join(build, "container.json"), "w") as f:
            json.dump(
                {
                    "id": os.urandom(32).hex(),
                    "name": name,
                    "image": image,
                    "config_digest": image_record["config_digest"] if image_record else "",
                    "layers": image_record["layers"] if image_record else [],
                    **({"lower_dirs": lower_dirs} if lower_dirs else {}),
                    "created": datetime.now(UTC).isoformat(),
                },
                f,
                indent=1,
            )
        os.makedirs(os.path.dirname(where), exist_ok=True)
        os.rename(build, where)
        made = self.get(name)
        if made is None:
            raise LayerfsError(f"container {name}: gone as soon as it was made")
        return made

    def add_runtime_paths(self, name: str, paths: list[str]) -> None:
        """(Holding the lock.) Paths the runtime made in container ``name`` for itself: its diff leaves
        them out."""
        record = self._stored(name)
        self.update(name, runtime_paths=sorted(set(record.get("runtime_paths", [])) | set(paths)))

    def update(self, name: str, **fields: object) -> None:
        """(Holding the lock.) ``fields`` set in container ``name``'s record."""
        record = {**self._stored(name), **fields}
        path = os.path.join(self.dir(name), "container.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)

    def _stored(self, name: str) -> dict:
        with open(os.path.join(self.dir(name), "container.json")) as f:
            return json.load(f)

    def remove(self, name: str) -> None:
        """(Holding the lock.) Container ``name`` gone, its upper with it; refused while it is mounted."""
        record = self.get(name)
        if record is None:
            raise LayerfsError(f"no container {name!r}")
        if os.path.ismount(record["merged"]):
            raise ContainerMounted(name, record["merged"])
        self.root.discard(self.dir(record["name"]))
