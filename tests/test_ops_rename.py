"""rename(2) on real mounts, over three lower layers in both whiteout forms.

Files, upper-only directories and every error are compared with kernel overlayfs. Renaming a directory
that has lower parts is the one deliberate difference: kernel overlayfs (without redirect_dir) answers
EXDEV, layerfs copies the merged subtree up and renames it. That case is asserted directly, and the
upper layer it leaves is then mounted with kernel overlayfs, which must show the same tree.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from pair import ALL_FORMS, FORMS, Err, Stack, errname, make_opaque, make_pair, outcome, tree, whiteout, write


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    write(bottom / "a", "a")
    write(bottom / "b", "b")
    write(top / "c", "c")
    os.symlink("a", bottom / "sym")
    write(bottom / "gone", "deleted in mid")
    write(bottom / "goned/child", "deleted with its dir in mid")
    whiteout(mid, "gone")
    whiteout(mid, "goned")
    write(bottom / "dir/f", "f")
    write(bottom / "dir/sub/g", "g")
    write(bottom / "dir/sub/dropped", "deleted in mid")
    (mid / "dir/sub").mkdir(parents=True)
    whiteout(mid / "dir/sub", "dropped")
    write(mid / "dir/h", "h")
    os.chmod(mid / "dir", 0o750)
    write(bottom / "dir/opq/old", "hidden by opaque top")
    write(top / "dir/opq/new", "new")
    make_opaque(top / "dir/opq")
    (bottom / "edir").mkdir()
    write(bottom / "full/x", "x")
    write(top / "other/y", "y")


def _rename_steps(mnt: Path) -> dict:
    os.mkdir(mnt / "up")
    write(mnt / "up/file", "in an upper-only dir")
    os.mkdir(mnt / "up2")
    os.mkdir(mnt / "up3")
    write(mnt / "up3/file", "3")
    write(mnt / "new", "new")
    ino_a = os.lstat(mnt / "a").st_ino
    steps = {
        "lower file to fresh name": outcome(os.rename, mnt / "a", mnt / "a2"),
        "lower file over lower file": outcome(os.rename, mnt / "b", mnt / "c"),
        "new file over lower-deleted name": outcome(os.rename, mnt / "new", mnt / "gone"),
        "into another lower dir": outcome(os.rename, mnt / "dir/f", mnt / "other/f"),
        "within merged dir": outcome(os.rename, mnt / "dir/h", mnt / "dir/h2"),
        "symlink": outcome(os.rename, mnt / "sym", mnt / "sym2"),
        "onto itself": outcome(os.rename, mnt / "c", mnt / "c"),
        "file over dir": outcome(os.rename, mnt / "c", mnt / "edir"),
        "dir over file": outcome(os.rename, mnt / "up", mnt / "c"),
        "dir over non-empty dir": outcome(os.rename, mnt / "up2", mnt / "up"),
        "dir into itself": outcome(os.rename, mnt / "up", mnt / "up/inner"),
        "missing": outcome(os.rename, mnt / "missing", mnt / "x"),
        "deleted": outcome(os.rename, mnt / "goned", mnt / "x"),
        "into missing dir": outcome(os.rename, mnt / "c", mnt / "nodir/c"),
        "upper dir over empty lower dir": outcome(os.rename, mnt / "up", mnt / "edir"),
        "upper dir over lower-deleted dir": outcome(os.rename, mnt / "up2", mnt / "goned"),
        "upper dir to fresh name": outcome(os.rename, mnt / "up3", mnt / "dir/up3"),
    }
    steps["inode kept"] = os.lstat(mnt / "a2").st_ino == ino_a
    return {"steps": steps, "tree": tree(mnt)}


@pytest.mark.parametrize("form", FORMS)
def test_rename_files_and_upper_dirs(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)
    seen = pair.compare(_rename_steps)
    steps, files = seen["steps"], seen["tree"]
    assert files["a2"]["data"] == b"a" and files["c"]["data"] == b"b" and files["gone"]["data"] == b"new"
    assert "goned/child" not in files and files["sym2"]["target"] == "a" and steps["inode kept"]
    assert steps["file over dir"] == Err("EISDIR") and steps["dir over file"] == Err("ENOTDIR")
    assert steps["dir over non-empty dir"] == Err("ENOTEMPTY") and steps["dir into itself"] == Err("EINVAL")
    pair.compare_uppers()


@pytest.mark.parametrize("form", FORMS)
def test_rename_over_names_deleted_through_the_mount(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.unlink(mnt / "b")
        os.unlink(mnt / "full/x")
        os.rmdir(mnt / "full")
        os.mkdir(mnt / "fresh")
        write(mnt / "fresh/z", "z")
        steps = {
            "lower file onto deleted file": outcome(os.rename, mnt / "a", mnt / "b"),
            "upper dir onto deleted dir": outcome(os.rename, mnt / "fresh", mnt / "full"),
            "old name after": outcome(os.lstat, mnt / "a") == Err("ENOENT"),
        }
        return {"steps": steps, "full": sorted(os.listdir(mnt / "full")), "tree": tree(mnt)}

    seen = pair.compare(scenario)
    assert seen["full"] == ["z"] and seen["tree"]["b"]["data"] == b"a" and seen["steps"]["old name after"]
    upper = pair.compare_uppers()
    assert upper["full"]["opaque"] and upper["a"] == "whiteout"


def test_rename_of_open_files(mounts, tmp_path):
    """Descriptors opened before a rename keep working, whether the open copied the file up or not."""
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        reader = os.open(mnt / "a", os.O_RDONLY)  # lower, not copied up
        writer = os.open(mnt / "b", os.O_RDWR)  # copied up on open
        try:
            os.rename(mnt / "a", mnt / "a-moved")
            os.rename(mnt / "b", mnt / "dir/b-moved")
            os.pwrite(writer, b"B", 1)
            seen = {
                "reader": os.pread(reader, 10, 0),
                "writer": os.pread(writer, 10, 0),
                "fstat sizes": (os.fstat(reader).st_size, os.fstat(writer).st_size),
            }
        finally:
            os.close(reader)
            os.close(writer)
        seen["moved"] = [(mnt / n).read_bytes() for n in ("a-moved", "dir/b-moved")]
        seen["old names"] = [errname(os.lstat, mnt / n) for n in ("a", "b")]
        return seen

    seen = pair.compare(scenario)
    assert seen["reader"] == b"a" and seen["moved"] == [b"a", b"bB"] and seen["old names"] == ["ENOENT"] * 2


def _without_dir_nlink(view: dict) -> dict:
    """A tree minus the link counts of directories: a merged dir reports 1, the same dir copied up its
    real count, and both are right."""
    return {rel: {k: v for k, v in d.items() if not (d["type"] == "dir" and k == "nlink")} for rel, d in view.items()}


def _subtree(view: dict, prefix: str) -> dict:
    return {rel[len(prefix) + 1 :]: d for rel, d in view.items() if rel.startswith(prefix + "/")}


@pytest.mark.parametrize("form", ALL_FORMS)
def test_rename_of_dirs_with_lower_parts_moves_the_tree(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)
    kmnt, lmnt = pair.kernel.mnt, pair.layerfs.mnt
    # The documented difference: kernel overlayfs refuses, and its tree is untouched.
    before = tree(kmnt)
    assert outcome(os.rename, kmnt / "dir", kmnt / "moved") == Err("EXDEV")
    assert tree(kmnt) == before
    assert tree(lmnt) == before

    assert outcome(os.rename, lmnt / "dir", lmnt / "moved") is None  # merged over two layers, to a fresh name
    assert outcome(os.rename, lmnt / "full", lmnt / "edir") is None  # over an empty lower dir
    assert outcome(os.rename, lmnt / "other", lmnt / "goned") is None  # onto a name deleted in a lower
    after = tree(lmnt)
    for old, new in (("dir", "moved"), ("full", "edir"), ("other", "goned")):
        assert old not in after and outcome(os.lstat, lmnt / old) == Err("ENOENT")
        assert _without_dir_nlink(_subtree(after, new)) == _without_dir_nlink(_subtree(before, old)), new
        assert after[new]["mode"] == before[old]["mode"]
    assert "moved/sub/dropped" not in after and "moved/opq/old" not in after  # still deleted, still hidden
    assert "goned/child" not in after  # what the lower had at the new name does not come back

    # The upper layer left behind reads the same through kernel overlayfs (over the overlay-form copy of
    # the same lowers).
    pair.unmount()
    work = tmp_path / "work-for-kernel"
    work.mkdir()
    again = mounts.overlay(tmp_path / "kernel-again", pair.kernel.lowers, pair.layerfs.upper, work)
    assert tree(again) == after


_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
_NOREPLACE, _EXCHANGE = 1, 2


def _rename2(old: Path, new: Path, flags: int) -> None:
    if _renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


@pytest.mark.parametrize("form", FORMS)
def test_rename_noreplace(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.unlink(mnt / "b")
        steps = {
            "lower file to fresh name": outcome(_rename2, mnt / "a", mnt / "a2", _NOREPLACE),
            "over lower file": outcome(_rename2, mnt / "a2", mnt / "c", _NOREPLACE),
            "over deleted name": outcome(_rename2, mnt / "a2", mnt / "b", _NOREPLACE),
            "onto itself": outcome(_rename2, mnt / "c", mnt / "c", _NOREPLACE),
            "dir over empty dir": outcome(_rename2, mnt / "other", mnt / "edir", _NOREPLACE),
            "missing": outcome(_rename2, mnt / "missing", mnt / "x", _NOREPLACE),
        }
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    steps = seen["steps"]
    assert steps["over lower file"] == Err("EEXIST") and steps["dir over empty dir"] == Err("EEXIST")
    assert seen["tree"]["b"]["data"] == b"a" and "a2" not in seen["tree"]
    pair.compare_uppers()


@pytest.mark.parametrize("form", FORMS)
def test_rename_exchange(mounts, tmp_path, form):
    """renameat2(RENAME_EXCHANGE) through the mount, as kernel overlayfs does it (tests/test_exchange.py
    covers the union's every case; this is the FUSE request's way there)."""
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.mkdir(mnt / "up")
        write(mnt / "up/file", "upper")
        write(mnt / "new", "new")
        ino_a, ino_c = os.lstat(mnt / "a").st_ino, os.lstat(mnt / "c").st_ino
        steps = {
            "lower file with lower file": outcome(_rename2, mnt / "a", mnt / "c", _EXCHANGE),
            "new file with lower file": outcome(_rename2, mnt / "new", mnt / "b", _EXCHANGE),
            "upper dir with lower file": outcome(_rename2, mnt / "up", mnt / "a", _EXCHANGE),
            "with a missing name": outcome(_rename2, mnt / "c", mnt / "missing", _EXCHANGE),
            "with itself": outcome(_rename2, mnt / "c", mnt / "c", _EXCHANGE),
            "dir with its child": outcome(_rename2, mnt / "a", mnt / "a/file", _EXCHANGE),
        }
        # Each file keeps its inode number under its new name.
        numbers = (os.lstat(mnt / "c").st_ino == ino_a, os.lstat(mnt / "up").st_ino == ino_c)
        return {"steps": steps, "numbers": numbers, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    assert seen["steps"]["lower file with lower file"] is None and seen["numbers"] == (True, True)
    assert seen["tree"]["c"]["data"] == b"a" and seen["tree"]["a"]["type"] == "dir"
    pair.compare_uppers()
