"""The mounts containerd is handed for a snapshot, in the forms containerd's overlay snapshotter uses.

A snapshot without parents is its own directory bind-mounted, and a view of one committed layer is that
layer bind-mounted read-only: no filesystem is needed for either. Anything else is a layerfs mount of
type ``fuse3.layerfs``, which containerd mounts by running ``mount.fuse3 layerfs TARGET -o OPTIONS -t
layerfs``, and mount.fuse3 by running ``layerfs layerfs TARGET -o OPTIONS`` (the command line takes
that form: cli/dispatch.py). A view of several layers has no upper: a read-only mount.

containerd unpacks an image layer into a snapshot whose key starts ``extract-``: that one is handed out as
kernel overlayfs's mount, as containerd's overlay snapshotter would, because containerd's applier then
writes the layer straight into the upper directory (whiteouts in overlayfs's form, which layerfs reads)
and mounts nothing: no FUSE round trip per file. Were it mounted, kernel overlayfs would show the same.
"""

from __future__ import annotations

from typing import NamedTuple

from ..cli.dispatch import HELPER_SOURCE as SOURCE
from ..fs.options import escaped, for_dirs

TYPE = "fuse3.layerfs"


UNPACK_PREFIX = "extract-"  # the keys of containerd's unpacks (its snapshots.UnpackKeyFormat)


class Mount(NamedTuple):
    type: str
    source: str
    options: list[str]


def mounts(kind: str, upper: str, work: str, lowers: list[str], *, unpacking: bool = False) -> list[Mount]:
    """The mounts of a snapshot of ``kind`` whose directory is ``upper`` (work dir ``work``) over
    its parents' directories ``lowers``, nearest first; ``unpacking``: a layer is about to be written
    into it (the overlay form then, whose upperdir containerd's applier writes straight into)."""
    if unpacking and lowers:
        return [
            Mount(
                "overlay",
                "overlay",
                [
                    f"workdir={escaped(work)}",
                    f"upperdir={escaped(upper)}",
                    f"lowerdir={':'.join(map(escaped, lowers))}",
                ],
            )
        ]
    if not lowers:
        return [Mount("bind", upper, ["ro" if kind == "view" else "rw", "rbind"])]
    if kind == "view" and len(lowers) == 1:
        return [Mount("bind", lowers[0], ["ro", "rbind"])]
    if kind == "view":
        return [Mount(TYPE, SOURCE, ["lowerdir=" + ":".join(escaped(p) for p in lowers)])]
    return [Mount(TYPE, SOURCE, [for_dirs(lowers, upper, work)])]
