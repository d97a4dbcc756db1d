"""Containers of the store: ``STORE/containers/<name>/container.json`` (the image it came from, its
layers' diff_ids, the paths the runtime made in it) beside its ``upper``, ``work`` and ``merged``
(its default mount point) directories."""

from __future__ import annotations

import json
import os

from ..errors import LayerfsError
from .layers import Layers
from .root import Root


class ContainerMounted(LayerfsError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"container {name!r} is mounted at {where}")


def _status(where: str) -> str:
    """As docker says it (created, running, exited (CODE)), from what the runtime last wrote down
    (runtime/state.py; ``lifecycle.refresh`` sets a killed shim's record right)."""
    try:
        with open(os.path.join(where, "state.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        return "created"
    return f"exited ({state['exit_code']})" if state["status"] == "exited" else state["status"]


class Containers:
    def __init__(self, root: Root, layers: Layers) -> None:
        self.root = root
        self.layers = layers

    def dir(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise LayerfsError(f"{name!r}: not a container name")
        return self.root.sub("containers", name)

    def get(self, name: str) -> dict | None:
        """The record of container ``name``, with its directories; None if there is none."""
        where = self.dir(name)
        try:
            with open(os.path.join(where, "container.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        record.update(
            upper=os.path.join(where, "upper"),
            work=os.path.join(where, "work"),
            merged=os.path.join(where, "merged"),
            lowers=[self.layers.path(d) for d in reversed(record["layers"])],
            status=_status(where),
        )
        return record

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root.sub("containers")))
        except FileNotFoundError:
            return []

    def using(self, image: str) -> list[str]:
        """The containers made from image ``image``."""
        return [name for name in self.names() if (self.get(name) or {}).get("image") == image]

    def create(self, name: str, image: str, image_record: dict) -> dict:
        """(Holding the lock.) A new container of ``image``: an empty upper over the image's layers."""
        where = self.dir(name)
        if os.path.exists(where):
            raise LayerfsError(f"container {name!r} exists already")
        build = self.root.scratch()
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(build, sub), mode=0o755)
        with open(os.path.join(build, "container.json"), "w") as f:
            json.dump(
                {
                    "name": name,
                    "image": image,
                    "config_digest": image_record["config_digest"],
                    "layers": image_record["layers"],
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
        path = os.path.join(self.dir(name), "container.json")
        with open(path) as f:
            record = json.load(f)
        record["runtime_paths"] = sorted(set(record.get("runtime_paths", [])) | set(paths))
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)

    def remove(self, name: str) -> None:
        """(Holding the lock.) Container ``name`` gone, its upper with it; refused while it is mounted."""
        record = self.get(name)
        if record is None:
            raise LayerfsError(f"no container {name!r}")
        if os.path.ismount(record["merged"]):
            raise ContainerMounted(name, record["merged"])
        self.root.discard(self.dir(name))
