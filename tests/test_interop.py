"""Interop with kernel overlayfs through the layers on disk.

- An upper layer written through layerfs, mounted by kernel overlayfs over the same lowers, shows the
  tree layerfs showed, and nothing of layerfs's own bookkeeping (no ``.wh.`` names, no private xattrs).
- An upper layer written through kernel overlayfs (origin/impure xattrs, whiteouts that are hard links of
  one inode) mounted by layerfs shows what overlayfs showed.
- An old upper stacked as the top lower under a new upper (what a commit does) keeps its whiteouts and
  opaque directories applying, with either implementation reading it; both then keep agreeing as the
  new upper is changed.

Each upper is made with seeded random operations plus two changes that always leave markers: a lower
directory emptied and made anew (opaque) and a lower directory renamed (whiteout at its old name).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from fsops import RandomOps, drive, rename_by_copy, visible_kinds
from snapshot import OVERLAY_PRIVATE, Snapshot, assert_same, snapshot, snapshot_upper
from treespec import FORMS, TreeSpec, describe, generate, render_all
from twin import Twin

OPS = 250
PRIVATE_XATTRS = (OVERLAY_PRIVATE, "user.overlay.", "user.fuseoverlayfs.")


def _lower_dirs_by_size(root: Path) -> list[str]:
    """Directories of the mount, fewest entries first (deterministic order)."""
    kinds = visible_kinds(root)
    dirs = [p for p, k in kinds.items() if k == "d"]
    return sorted(dirs, key=lambda d: (sum(1 for p in kinds if p.startswith(d + "/")), d))


def _leave_markers(root: Path) -> None:
    """Changes that must leave an opaque directory and whiteouts in the upper layer."""
    dirs = _lower_dirs_by_size(root)
    replaced = next(d for d in dirs if os.listdir(root / d))  # a non-empty lower directory
    shutil.rmtree(root / replaced)
    os.mkdir(root / replaced, 0o750)
    (root / replaced / "new").write_bytes(b"in the new directory\n")
    moved = next(d for d in reversed(dirs) if "/" not in d and d != replaced)  # a big top-level one
    try:
        os.rename(root / moved, root / "renamed-dir")
    except OSError as e:  # EXDEV on kernel overlayfs: what mv does
        assert e.errno == errno.EXDEV, e
        rename_by_copy(root, moved, "renamed-dir")


def _write_upper(mount: Path, spec: TreeSpec) -> Snapshot:
    _leave_markers(mount)
    drive(mount, RandomOps(spec.seed, spec), OPS)
    return snapshot(mount)


def _assert_has_markers(upper: Path) -> None:
    entries = snapshot_upper(upper).entries.values()
    assert any(e.kind == "whiteout" for e in entries), "no whiteout in the upper: the test proves little"
    assert any(e.opaque for e in entries), "no opaque directory in the upper: the test proves little"


def _assert_no_bookkeeping(view: Snapshot) -> None:
    stray = [p for p in view.entries if any(part.startswith(".wh.") for part in p.split("/"))]
    stray += [
        f"{p}: {name}" for p, e in view.entries.items() for name, _ in e.xattrs if name.startswith(PRIVATE_XATTRS)
    ]
    assert not stray, f"bookkeeping visible: {stray}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("writer, reader, seed", [("layerfs", "kernel", 31), ("kernel", "layerfs", 32)])
def test_an_upper_reads_the_same_with_the_other_implementation(writer, reader, seed, form, mounts, tmp_path):
    """An upper written through one implementation, mounted with the other over the same lowers."""
    spec = generate(seed)
    print(describe(spec))
    lowers = {
        "kernel": render_all(spec, tmp_path / "k-lowers", "overlay"),
        "layerfs": render_all(spec, tmp_path / "l-lowers", form),
    }
    mount = {"kernel": mounts.overlay, "layerfs": mounts.layerfs}
    upper = tmp_path / "upper"
    upper.mkdir()
    works = {name: tmp_path / f"{name}-work" for name in (writer, reader)}
    for work in works.values():
        work.mkdir()
    mnt = mount[writer](tmp_path / f"{writer}-mnt", lowers[writer], upper, works[writer])
    seen = _write_upper(mnt, spec)
    mounts.unmount(mnt)
    _assert_has_markers(upper)
    other = snapshot(mount[reader](tmp_path / f"{reader}-mnt", lowers[reader], upper, works[reader]))
    if reader == "kernel":
        _assert_no_bookkeeping(other)
    assert_same(seen, other, what=f"{writer}'s view and {reader}'s view of its upper", names=(writer, reader))


@pytest.mark.parametrize("writer", ["layerfs", "kernel"])
def test_old_upper_stacked_as_lower_keeps_its_whiteouts_and_opaque_dirs(writer, mounts, tmp_path):
    spec = generate(33)
    print(describe(spec), f"; first upper written by {writer}")
    lowers = render_all(spec, tmp_path / "lowers", "overlay")
    old_upper, work = tmp_path / "old-upper", tmp_path / "old-work"
    old_upper.mkdir(), work.mkdir()
    mount = mounts.layerfs if writer == "layerfs" else mounts.overlay
    mnt = mount(tmp_path / "first", lowers, old_upper, work)
    seen = _write_upper(mnt, spec)
    mounts.unmount(mnt)
    _assert_has_markers(old_upper)

    # The commit: the old upper becomes the top lower; both implementations read the same stack.
    stack = [old_upper] + lowers
    twin = Twin(
        mounts, tmp_path / "second", stack, stack, f"{describe(spec)} + upper by {writer} as lower", redirect_dir=True
    )
    assert_same(seen, snapshot(twin.kernel), what="first view vs kernel over the stack", names=("first", "kernel"))
    assert_same(seen, snapshot(twin.layerfs), what="first view vs layerfs over the stack", names=("first", "layerfs"))
    ops = RandomOps(spec.seed + 1, spec)
    for _ in range(OPS):
        twin.step(ops.next(visible_kinds(twin.kernel)))
    twin.finish()
