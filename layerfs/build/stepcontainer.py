"""A build step's container: an empty upper over the layers of the step's parent, mounted with layerfs
(one empty lower for ``scratch``), in which RUN runs its command (as ``layerfs run`` would, through the
runtime's shim) and COPY and ADD put their files; then its changes, read from the mount's change index,
committed as one layer (none where nothing changed), and the container removed.

The builder imports this module only when a step has to run: a rebuild served from the cache loads
neither the filesystem nor the runtime.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from ..container import Container, container_changes
from ..errors import LayerfsError
from ..fs import mount, options
from ..runtime import shim
from ..store import Store
from .cache import State

HOSTNAME = "layerfs-build"


class Mounted:
    """A step's container while it is mounted: where, and its layers (with what the runtime made in it
    for itself, never its changes)."""

    def __init__(self, merged: str, container: Container) -> None:
        self.merged = merged
        self.container = container
        self._mounted = True

    def run(self, process: shim.Process) -> int:
        """``process`` run in the container (its /etc/hostname, /etc/hosts and /etc/resolv.conf the
        runtime's); its exit code."""
        runtime = tempfile.mkdtemp(prefix="layerfs-build-")
        try:
            process.binds, files = shim.runtime_files(self.merged, runtime, process.hostname, process.network)
            made = shim.make_mount_points(self.merged) + files
            self.container.runtime_paths = (*self.container.runtime_paths, *made)
            return shim.run(self.merged, process)
        finally:
            shutil.rmtree(runtime, ignore_errors=True)

    def unmount(self) -> None:
        if self._mounted:
            mount.umount(self.merged)
            self._mounted = False


@contextlib.contextmanager
def mounted(store: Store, state: State) -> Iterator[Mounted]:
    """A container of ``state``, mounted for a step; unmounted (if the step has not) and removed after."""
    name = f"build-{uuid.uuid4().hex[:12]}"
    with store.root.locked():
        record = store.containers.create(name, "(build)", {"config_digest": state.id, "layers": state.layers})
    try:
        lowers = record["lowers"]
        if not lowers:  # scratch: one empty lower, since a mount needs one
            lowers = [os.path.join(os.path.dirname(record["upper"]), "empty")]
            os.mkdir(lowers[0])
        box = Mounted(record["merged"], Container(lowers, record["upper"], record["work"]))
        text = options.for_dirs(lowers, record["upper"], record["work"], x_layerfs_owner=os.getpid())
        if mount.mount(options.parse([text], box.merged)) != 0:
            raise LayerfsError("cannot mount the build container")
        try:
            yield box
        finally:
            box.unmount()
    finally:
        store.remove(name)


def committed(store: Store, parent: State, box: Mounted, created_by: str) -> State:
    """The state after a step, from its container (unmounted here): its changes as one layer on
    ``parent``'s, none where nothing changed."""
    box.unmount()
    changes = container_changes(box.container)
    config = copy.deepcopy(parent.config)
    if not changes:
        return parent.after(config, created_by, empty=True)
    layer, blob = store.commit_step(box.container.upper or "", changes)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), layer.diff_id]
    return State(config, [*parent.blobs, blob], parent.manifest_type).after(config, created_by)
