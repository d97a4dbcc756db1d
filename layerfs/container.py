"""A container: its layers, found from the store, a running mount or given as directories, and its changes
(``layerfs diff``, as ``docker diff`` lists them; the changes ``layerfs export`` writes as an OCI layer tar
and ``layerfs commit`` stores as a layer, both by ``oci.entries``' rules).

For a mount, the layers come from the daemon's record (fs.mounts) and the answer from its change index,
read beside the running daemon: what the daemon journaled is caught up with, everything checked once
against the upper. For an unmounted container (``--upperdir``, ``--lowerdir``), the index in its
``--workdir`` is used if there is one; otherwise the upper is walked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .core.changes import ADDED, CHANGED, DELETED, Change, changes, indexed_changes
from .core.index import read_index
from .core.union import INDEX_DIR
from .errors import UsageError
from .fs import mounts
from .fs.options import checked_directory, split_escaped
from .store import Store

_DOCKER_KIND = {CHANGED: 0, ADDED: 1, DELETED: 2}  # Docker's ContainerChanges API numbers


@dataclass
class Container:
    lowers: list[str]
    upper: str | None
    work: str | None
    # What the runtime made for itself (mount points it had to create), never shown as a change.
    runtime_paths: tuple[str, ...] = ()
    # Where volumes are mounted: nothing there or below is the container's change.
    volume_targets: tuple[str, ...] = ()


def of_mount(mountpoint: str) -> Container:
    mount = mounts.find(os.path.abspath(mountpoint))
    if mount is None:
        raise UsageError(
            f"{mountpoint}: not a running layerfs mount (for an unmounted container give --upperdir and --lowerdir)"
        )
    return Container(mount.lowers, mount.upper, mount.work)


def of_name_or_mount(target: str, store_root: str) -> Container:
    """A container of the store by name, else the running mount at ``target``."""
    record = Store(store_root).containers.get(target) if "/" not in target else None
    if record is not None:
        return Container(
            record["lowers"],
            record["upper"],
            record["work"],
            tuple(record.get("runtime_paths", ())),
            tuple(m["Destination"] for m in record.get("mounts", ())),
        )
    return of_mount(target)


def of_dirs(lowerdir: str, upperdir: str, workdir: str | None) -> Container:
    lowers = [checked_directory("lowerdir", p) for p in split_escaped(lowerdir, ":")]
    return Container(
        lowers, checked_directory("upperdir", upperdir), checked_directory("workdir", workdir) if workdir else None
    )


def container_changes(container: Container, *, under: str = "/", unchanged_copies: bool = False) -> list[Change]:
    """The changes, limited to ``under`` and below."""
    if container.upper is None:
        return []  # a read-only mount changes nothing
    state = os.path.join(container.work, INDEX_DIR) if container.work else None
    ignore, ignore_below = frozenset(container.runtime_paths), frozenset(container.volume_targets)
    if state is not None and os.path.isdir(state):
        with read_index(container.upper, state, lowers=container.lowers) as index:
            found = indexed_changes(
                index, container.lowers, unchanged_copies=unchanged_copies, ignore=ignore, ignore_below=ignore_below
            )
    else:
        found = changes(
            container.upper,
            container.lowers,
            unchanged_copies=unchanged_copies,
            ignore=ignore,
            ignore_below=ignore_below,
        )
    under = "/" + under.strip("/")
    if under == "/":
        return found
    return [c for c in found if c.path == under or c.path.startswith(under + "/")]


def render(found: list[Change], *, as_json: bool) -> str:
    if as_json:
        return json.dumps([{"Path": c.path, "Kind": _DOCKER_KIND[c.kind]} for c in found], indent=1) + "\n"
    return "".join(f"{c}\n" for c in found)


def layer_changes(container: Container, *, unchanged_copies: bool = False) -> tuple[list[Change], str]:
    """The changes a layer of the container is made of, and the upper they are in."""
    if container.upper is None:
        raise UsageError("a read-only mount has no changes")
    return container_changes(container, unchanged_copies=unchanged_copies), container.upper
