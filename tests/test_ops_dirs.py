"""Directories on real mounts, compared with kernel overlayfs: mkdir, rmdir, listings of merged and opaque
directories, over three lower layers in both whiteout forms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pair import ALL_FORMS, FORMS, Err, Stack, make_opaque, make_pair, outcome, tree, whiteout, write


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    write(bottom / "d/x", "x")
    write(bottom / "d/sub/deep", "deep")
    (bottom / "empty").mkdir()
    # "merged": children in two layers, one already deleted in mid; "wiped": every child deleted below.
    write(bottom / "merged/a", "a")
    write(bottom / "merged/b", "b")
    write(mid / "merged/c", "c")
    whiteout(mid / "merged", "b")
    write(bottom / "wiped/a", "a")
    (mid / "wiped").mkdir()
    whiteout(mid / "wiped", "a")
    write(bottom / "keep/one", "1")
    write(top / "keep/two", "2")
    write(bottom / "deleted/child", "gone with its dir")
    whiteout(mid, "deleted")
    write(bottom / "opaque/hidden", "hidden")
    write(mid / "opaque/shown", "shown")
    make_opaque(mid / "opaque")
    write(top / "file", "f")
    (top / "t").mkdir()


@pytest.mark.parametrize("form", ALL_FORMS)
def test_mkdir(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        umask = os.umask(0o027)  # applied once, by the kernel, to the mode asked for
        steps = {
            "new": outcome(os.mkdir, mnt / "new", 0o755),
            "sticky": outcome(os.mkdir, mnt / "tmp", 0o1777),
            "in lower dir": outcome(os.mkdir, mnt / "d/sub/new"),
            "over lower dir": outcome(os.mkdir, mnt / "d"),
            "over lower file": outcome(os.mkdir, mnt / "file"),
            "below a deleted dir": outcome(os.mkdir, mnt / "deleted/child"),
            "over deleted dir": outcome(os.mkdir, mnt / "deleted"),
            "over hidden by opaque": outcome(os.mkdir, mnt / "opaque/hidden"),
            "missing parent": outcome(os.mkdir, mnt / "nope/new"),
            "below a file": outcome(os.mkdir, mnt / "file/new"),
            "trailing slash": outcome(os.mkdir, f"{mnt}/slash/"),
        }
        os.umask(umask)
        return {"steps": steps, "tree": tree(mnt), "deleted": os.listdir(mnt / "deleted")}

    seen = pair.compare(scenario)
    assert seen["steps"]["over lower dir"] == Err("EEXIST") and seen["steps"]["below a deleted dir"] == Err("ENOENT")
    assert seen["deleted"] == [] and seen["tree"]["tmp"]["mode"] == "1750"
    # Where the upper layer itself hides a lower dir (rmdir, then mkdir), the new dir must be opaque:
    # checked in test_rmdir. Here the lower whiteout already hides it, and both leave the dir plain.
    pair.compare_uppers()


@pytest.mark.parametrize("form", ALL_FORMS)
def test_rmdir(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.mkdir(mnt / "fresh")
        steps = {
            "upper-only": outcome(os.rmdir, mnt / "fresh"),
            "empty lower": outcome(os.rmdir, mnt / "empty"),
            "non-empty lower": outcome(os.rmdir, mnt / "d"),
            "non-empty merged": outcome(os.rmdir, mnt / "keep"),
            "children all deleted below": outcome(os.rmdir, mnt / "wiped"),
            "opaque, hiding children": outcome(os.rmdir, mnt / "opaque"),
            "file": outcome(os.rmdir, mnt / "file"),
            "missing": outcome(os.rmdir, mnt / "missing"),
            "deleted": outcome(os.rmdir, mnt / "deleted"),
            "dot": outcome(os.rmdir, mnt / "t/."),
        }
        # A merged dir whose lower children are deleted through the mount becomes removable.
        os.unlink(mnt / "merged/a")
        steps["one child left"] = outcome(os.rmdir, mnt / "merged")
        os.unlink(mnt / "merged/c")
        steps["all children deleted"] = outcome(os.rmdir, mnt / "merged")
        # Same for a whole lower tree removed bottom-up, then made again: the old content stays gone.
        os.unlink(mnt / "d/sub/deep")
        os.rmdir(mnt / "d/sub")
        os.unlink(mnt / "d/x")
        steps["emptied tree"] = outcome(os.rmdir, mnt / "d")
        os.mkdir(mnt / "d")
        steps["remade"] = os.listdir(mnt / "d")
        os.mkdir(mnt / "keep/sub")
        os.rmdir(mnt / "keep/sub")
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    steps = seen["steps"]
    assert steps["empty lower"] is None and steps["children all deleted below"] is None
    assert steps["non-empty lower"] == Err("ENOTEMPTY") and steps["one child left"] == Err("ENOTEMPTY")
    assert steps["all children deleted"] is None and steps["remade"] == []
    upper = pair.compare_uppers()
    assert upper["merged"] == "whiteout" and upper["d"]["opaque"]


@pytest.mark.parametrize("form", FORMS)
def test_large_merged_listing(mounts, tmp_path, form):
    """A directory too big for one readdir reply, spread over three layers with a third deleted."""

    def build_big(s: Stack) -> None:
        top, mid, bottom = s.lowers
        for i in range(900):
            layer = (top, mid, bottom)[i % 3]
            write(layer / "big" / f"entry-{i:04d}-{'x' * 40}", str(i))
        for i in range(0, 900, 9):
            whiteout(top / "big", f"entry-{i + 2:04d}-{'x' * 40}")

    pair = make_pair(mounts, tmp_path, build_big, form=form)

    def scenario(mnt: Path):
        with os.scandir(mnt / "big") as it:
            names = sorted(e.name for e in it)
        os.unlink(mnt / "big" / names[0])
        return names, len(os.listdir(mnt / "big"))

    names, after = pair.compare(scenario)
    assert len(names) == 800 and after == 799 and len(set(names)) == len(names)
