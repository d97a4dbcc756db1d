"""Twin mounts: kernel overlayfs (the oracle) and layerfs over identical copies of the same lower layers,
driven by the same operations and compared step by step.

``Twin.step(op)`` applies one operation (see fsops) to both mounts and fails the test, with the recent
history, when the outcomes differ or the touched paths and their parents no longer look the same.
``Twin.finish()`` compares the visible trees, then the upper layers after unmounting (same whiteouts and
opaque marks; an opaque mark that hides nothing is not compared, see snapshot.without_idle_opaque), then
the tree layerfs shows when mounted again.

The one deliberate difference is handled here: renaming a directory with lower parts is EXDEV on kernel
overlayfs (no redirect_dir) and works on layerfs, so on the kernel side the rename is done the way ``mv``
does it (fsops.rename_by_copy). Everything else must match at once, attributes of hard-linked files
included: layerfs invalidates what the kernel cached for a file's other names when one changes.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from pathlib import Path

import fsops
import pytest
from conftest import assert_journal_complete
from fsops import Op, apply, rename_by_copy, visible_kinds
from snapshot import Snapshot, assert_same, diff, entry_of, short_path, snapshot, snapshot_upper, without_idle_opaque
from treespec import TreeSpec, describe, render_all

from layerfs.core.changes import changes, indexed_changes
from layerfs.core.index import read_index
from layerfs.core.union import INDEX_DIR


def _state(root: Path, path: str) -> object:
    """What ``path`` looks like in a mount: an Entry, or the errno of looking at it."""
    if not fsops.inside(str(root), path):
        return "outside"
    try:
        return entry_of(os.path.join(root, path))
    except OSError as e:
        return os.strerror(e.errno)


def _with_parents(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        for q in (p, os.path.dirname(p) or "."):
            if q not in out:
                out.append(q)
    return out


def _has_hard_links(path: Path) -> bool:
    """Whether the file ``path``, or a file in the directory ``path``, has other names."""
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return os.lstat(path).st_nlink > 1
    for parent, _, files in os.walk(path):
        for name in files:  # os.walk lists symlinks, fifos and devices among files too
            if os.lstat(os.path.join(parent, name)).st_nlink > 1:
                return True
    return False


class Twin:
    """Kernel overlayfs (the oracle) and layerfs over identical copies of the same lower layers."""

    def __init__(
        self,
        mounts,
        base: Path,
        k_lowers: list[Path],
        l_lowers: list[Path],
        label: str,
        mount_base: Path | None = None,
        redirect_dir: bool = True,
        metacopy: bool = False,
    ) -> None:
        """Mount ``k_lowers`` (overlay form) with kernel overlayfs and ``l_lowers`` (same content, any
        form) with layerfs, each with an empty upper under ``base``; the mount points go in ``mount_base``
        (default ``base``; one other users can reach when operations run as them). ``label`` names the
        run in failures. With ``redirect_dir`` both rename directories by redirect (the kernel mounted
        with ``redirect_dir=on``); without, layerfs copies their trees and the kernel answers EXDEV, for
        ``step`` to do what mv does. With ``metacopy`` (which needs ``redirect_dir``) both copy up only the
        metadata of a lower file whose metadata changes."""
        self.mounts, self.metacopy = mounts, metacopy
        self.label = label + ("" if redirect_dir else ", redirect_dir=off") + (", metacopy=on" if metacopy else "")
        metacopy_option = ["metacopy=on"] if metacopy else []
        self.l_options = ",".join(([] if redirect_dir else ["redirect_dir=off"]) + metacopy_option)
        k_options = ",".join((["redirect_dir=on"] if redirect_dir else []) + (["metacopy=on"] if metacopy else []))
        self.k_lowers, self.l_lowers = k_lowers, l_lowers
        names = ("k-upper", "k-work", "l-upper", "l-work")
        self.k_upper, self.k_work, self.l_upper, self.l_work = (base / n for n in names)
        for d in (self.k_upper, self.k_work, self.l_upper, self.l_work):
            d.mkdir(parents=True)
        mount_base = mount_base or base
        self.kernel = mounts.overlay(mount_base / "k-mnt", self.k_lowers, self.k_upper, self.k_work, k_options)
        self.layerfs = mounts.layerfs(mount_base / "l-mnt", self.l_lowers, self.l_upper, self.l_work, self.l_options)
        # With the uppers still empty, the kernel shows the lower layers merged: where opaque marks matter.
        self.lower_dirs = {p for p, kind in visible_kinds(self.kernel).items() if kind == "d"}
        self.history: deque[str] = deque(maxlen=12)
        self.steps = 0
        self.renames_by_copy = 0
        self.skipped = 0

    @classmethod
    def from_spec(
        cls,
        mounts,
        base: Path,
        spec: TreeSpec,
        form: str,
        mount_base: Path | None = None,
        redirect_dir: bool = True,
        metacopy: bool = False,
    ) -> Twin:
        """Twin mounts of a generated tree; layerfs gets its lowers in whiteout ``form``."""
        k_lowers = render_all(spec, base / "k-lowers", "overlay")
        l_lowers = render_all(spec, base / "l-lowers", form)
        return cls(
            mounts,
            base,
            k_lowers,
            l_lowers,
            f"{describe(spec)}, layerfs lowers in {form} form",
            mount_base,
            redirect_dir,
            metacopy,
        )

    def _context(self) -> str:
        recent = "\n    ".join(self.history)
        return f"{self.label}; last steps:\n    {recent}"

    def step(self, op: Op) -> fsops.Outcome:
        """Apply ``op`` to both mounts and require the same outcome and the same resulting state."""
        self.steps += 1
        kernel = apply(self.kernel, op)
        if op.name == "rename" and kernel == ("err", "EXDEV"):
            # The deliberate difference: layerfs renames directories with lower parts (and, with metacopy,
            # files whose data is below) where the kernel refuses (no redirects, or one too long); do on
            # the kernel what mv does instead.
            assert self.metacopy or stat.S_ISDIR(os.lstat(self.kernel / op.args[0]).st_mode), (
                f"EXDEV for a non-directory: {op}"
            )
            if op.uid is not None or _has_hard_links(self.kernel / op.args[0]):
                # mv keeps hard links inside the tree and breaks those reaching out of it; layerfs's
                # rename keeps upper ones and (copying up as overlayfs does) breaks lower ones. Neither
                # is wrong, and no copy can reproduce the other: such renames are left out. So are
                # renames by another user, for whom mv could not keep owners.
                self.history.append(f"#{self.steps} {op} -> skipped: EXDEV on kernel, hard links or not root")
                self.skipped += 1
                return ("skip", "not mirrored")
            kernel = rename_by_copy(self.kernel, *op.args)
            self.renames_by_copy += 1
        mine = apply(self.layerfs, op)
        self.history.append(f"#{self.steps} {op} -> kernel {kernel}, layerfs {mine}")
        assert mine == kernel, f"step {self.steps}: {op}: kernel {kernel}, layerfs {mine}\n  {self._context()}"
        for path in _with_parents(op.paths):
            k, m = _state(self.kernel, path), _state(self.layerfs, path)
            if k != m:
                lines = (
                    diff({path: k}, {path: m}, names=("kernel", "layerfs"))
                    if not isinstance(k, str) and not isinstance(m, str)
                    else [f"{short_path(path)}: kernel {k}, layerfs {m}"]
                )
                pytest.fail(
                    f"step {self.steps}: after {op}, state differs:\n  " + "\n  ".join(lines) + f"\n  {self._context()}"
                )
        return kernel

    def check_trees(self) -> Snapshot:
        """Whole visible trees equal; returns the kernel's."""
        kernel = snapshot(self.kernel)
        assert_same(
            kernel,
            snapshot(self.layerfs),
            what=f"visible trees after {self.steps} steps ({self._context()})",
            names=("kernel", "layerfs"),
        )
        return kernel

    def finish(self) -> None:
        """Final comparison: trees, then upper layers after unmount, then layerfs mounted again."""
        final = self.check_trees()
        self.mounts.unmount(self.kernel)
        self.mounts.unmount(self.layerfs)
        assert_same(
            *without_idle_opaque(
                snapshot_upper(self.k_upper),
                snapshot_upper(self.l_upper),
                self.lower_dirs,
                (self.k_upper, self.l_upper),
            ),
            what=f"upper layers ({self._context()})",
            names=("kernel", "layerfs"),
        )
        self._check_index()
        again = self.mounts.layerfs(self.layerfs, self.l_lowers, self.l_upper, self.l_work, self.l_options)
        assert_same(
            final, snapshot(again), what="kernel's final tree vs layerfs remounted", names=("kernel", "layerfs")
        )

    def _check_index(self) -> None:
        """The change index layerfs kept while the operations ran, read back after the unmount: nothing
        in it is stale, and it gives the same changes as a walk of the upper layer."""
        lowers = [str(p) for p in self.l_lowers]
        with read_index(str(self.l_upper), str(self.l_work / INDEX_DIR), lowers=lowers) as index:
            assert_journal_complete(index)
            assert indexed_changes(index, lowers) == changes(str(self.l_upper), lowers), self._context()
