"""Run inside ``unshare -Ur --mount`` (root of a user namespace, where ``trusted.*`` xattrs are refused):
the same changes through kernel overlayfs ``-o userxattr`` and through layerfs (no option: it must find
the user.* forms itself), over one shared lower; then each upper mounted by the other implementation.

    userns_twin.py LOWER BASE OUT

writes to OUT (pickled) each side's merged tree and upper layer as ``snapshot`` records them (the
``user.overlay.*`` records included), and each side's upper as the other implementation shows it. Every
mount is gone when it exits, even on failure: they live in this namespace, which ends with it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

from conftest import Mounts
from snapshot import snapshot, snapshot_upper


def changes(mnt: Path) -> None:
    """Every kind of record an upper gets: new entries, copy-ups (origin, impure), whiteouts, an
    opaque directory, a renamed file."""
    (mnt / "new").mkdir()
    (mnt / "new/file").write_bytes(b"new\n")
    with open(mnt / "a/file1", "ab") as f:
        f.write(b"more\n")
    os.unlink(mnt / "c/gone")
    shutil.rmtree(mnt / "d")
    (mnt / "d").mkdir()
    (mnt / "d/fresh").write_bytes(b"fresh\n")
    os.chmod(mnt / "b/keep", 0o600)
    os.setxattr(mnt / "b/keep", "user.note", b"kept")
    os.rename(mnt / "a/sub/deep", mnt / "a/deep-moved")
    os.symlink("new/file", mnt / "link")
    os.mkfifo(mnt / "new/fifo")


def main(lower: Path, base: Path, out: Path) -> None:
    mounts = Mounts()
    sides = ("kernel", "layerfs")
    for side in sides:
        for part in ("upper", "work", "cross-work"):
            (base / side / part).mkdir(parents=True)
    mount = {"kernel": lambda *a: mounts.overlay(*a, extra="userxattr"), "layerfs": mounts.layerfs}
    result: dict[str, object] = {}
    try:
        for side in sides:
            mnt = mount[side](base / side / "mnt", [lower], base / side / "upper", base / side / "work")
            changes(mnt)
            result[f"{side} tree"] = snapshot(mnt)
            mounts.unmount(mnt)
            result[f"{side} upper"] = snapshot_upper(base / side / "upper")
        for reader, writer in (("kernel", "layerfs"), ("layerfs", "kernel")):
            mnt = mount[reader](
                base / f"{reader}-reads-{writer}", [lower], base / writer / "upper", base / writer / "cross-work"
            )
            result[f"{reader} reads {writer}"] = snapshot(mnt)
            mounts.unmount(mnt)
    finally:
        mounts.cleanup()
    out.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
