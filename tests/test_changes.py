"""layerfs.core.changes: a container's changes from its upper dir, as ``docker diff`` lists them.

Mostly hand-made layers, no mount. The last test lets kernel overlayfs write a real upper dir and
checks the walk against Docker's full two-tree comparison of the mounted image and container.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pair import make_opaque, whiteout, write
from treediff import two_tree_changes

from layerfs.core.changes import changes, indexed_changes
from layerfs.core.index import read_index


def diff(upper: Path, *lowers: Path) -> list[str]:
    """The walk's answer, checked against the change index's answer for the same upper (indexed from
    scratch in a state directory beside it)."""
    walked = changes(str(upper), [str(p) for p in lowers])
    with read_index(str(upper), str(upper.parent / f"{upper.name}-index"), lowers=[str(p) for p in lowers]) as index:
        assert indexed_changes(index, [str(p) for p in lowers]) == walked
    return [str(c) for c in walked]


def copy_dir(lower: Path, upper: Path, rel: str) -> Path:
    """What a copy-up does to a directory and its parents: same mode, owner and times, no content."""
    target = upper / rel
    target.mkdir(parents=True, exist_ok=True)
    for part in [Path(rel), *Path(rel).parents][:-1]:  # deepest first: making a child changes mtime
        shutil.copystat(lower / part, upper / part)
    return target


@pytest.fixture
def image(layers) -> tuple[Path, Path, Path]:
    """(upper, top lower, bottom lower) with a small tree in the bottom layer."""
    bottom = layers.dir("bottom")
    write(bottom / "etc/passwd", "root\n")
    write(bottom / "etc/skel/profile", "x\n")
    write(bottom / "var/cache/app/one", "1\n")
    write(bottom / "var/cache/app/two", "2\n")
    write(bottom / "file", "f\n")
    return layers.dir("upper"), layers.dir("top"), bottom


def test_empty_upper_changes_nothing(image):
    assert diff(*image) == []


def test_copied_up_directories_alone_are_no_change(image):
    upper, top, bottom = image
    copy_dir(bottom, upper, "etc/skel")
    assert diff(upper, top, bottom) == []


def test_added_entries_and_their_ancestors(image):
    upper, top, bottom = image
    copy_dir(bottom, upper, "var/cache/app")
    write(upper / "var/cache/app/new/deep/file", "n\n")
    write(upper / "brand-new", "b\n")
    assert diff(upper, top, bottom) == [
        "A /brand-new",
        "C /var",
        "C /var/cache",
        "C /var/cache/app",
        "A /var/cache/app/new",
        "A /var/cache/app/new/deep",
        "A /var/cache/app/new/deep/file",
    ]


def test_a_copied_up_file_is_changed(image):
    upper, top, bottom = image
    copy_dir(bottom, upper, "etc")
    write(upper / "etc/passwd", "root\nuser\n")
    assert diff(upper, top, bottom) == ["C /etc", "C /etc/passwd"]


@pytest.mark.parametrize("form", ["overlay", "oci"])
def test_whiteouts_are_deletions(form, image):
    upper, top, bottom = image
    copy_dir(bottom, upper, "var/cache/app")
    for parent, name in ((upper / "var/cache/app", "one"), (upper, "etc")):
        if form == "overlay":
            whiteout(parent, name)
        else:
            (parent / f".wh.{name}").touch()
    assert diff(upper, top, bottom) == ["D /etc", "C /var", "C /var/cache", "C /var/cache/app", "D /var/cache/app/one"]


def test_a_whiteout_that_hides_nothing_is_no_change(image):
    upper, top, bottom = image
    whiteout(upper, "never-existed")
    (upper / ".wh.nor-this").touch()
    assert diff(upper, top, bottom) == []


@pytest.mark.parametrize("form", [pytest.param("xattr", marks=pytest.mark.root), "marker"])
def test_an_opaque_directory_is_deleted_then_added_as_docker_says(form, image):
    upper, top, bottom = image
    app = copy_dir(bottom, upper, "var/cache/app")
    if form == "xattr":
        make_opaque(app)
    else:
        (app / ".wh..wh..opq").touch()
    write(app / "one", "replaced\n")  # same name as below, but the lower one is hidden: added
    write(app / "fresh", "f\n")
    assert diff(upper, top, bottom) == [
        "C /var",
        "C /var/cache",
        "D /var/cache/app",
        "A /var/cache/app/fresh",
        "A /var/cache/app/one",
    ]


def test_the_lowers_own_whiteouts_and_opaque_dirs_apply(image):
    # What the lowers had deleted is not there to change: writing it again is an addition.
    upper, top, bottom = image
    (top / ".wh.file").touch()
    whiteout(top, "etc")
    write(top / "var/cache/app/.wh..wh..opq", "")
    write(top / "var/cache/app/kept", "k\n")
    write(upper / "file", "again\n")
    write(upper / "etc/passwd", "again\n")
    copy_dir(top, upper, "var/cache/app")
    write(upper / "var/cache/app/one", "again\n")
    whiteout(upper / "var/cache/app", "two")  # hid nothing visible: no D
    whiteout(upper / "var/cache/app", "kept")
    assert diff(upper, top, bottom) == [
        "A /etc",
        "A /etc/passwd",
        "A /file",
        "C /var",
        "C /var/cache",
        "C /var/cache/app",
        "D /var/cache/app/kept",
        "A /var/cache/app/one",
    ]


def test_directory_metadata_change_alone(image):
    upper, top, bottom = image
    skel = copy_dir(bottom, upper, "etc/skel")
    skel.chmod(0o700)
    assert diff(upper, top, bottom) == ["C /etc", "C /etc/skel"]


def test_type_changes(image):
    upper, top, bottom = image
    write(upper / "file/inside", "now a directory\n")
    copy_dir(bottom, upper, "etc")
    write(upper / "etc/skel", "now a file\n")
    assert diff(upper, top, bottom) == ["C /etc", "C /etc/skel", "C /file", "A /file/inside"]


def test_no_lowers_means_everything_is_added(layers):
    upper = layers.dir("upper")
    write(upper / "a/b", "x")
    whiteout(upper, "gone")
    assert diff(upper) == ["A /a", "A /a/b"]


def test_a_tree_deeper_than_the_recursion_limit(layers):
    upper = layers.dir("upper")
    depth = 1200  # 2,400 bytes of path: within PATH_MAX, beyond Python's default recursion limit
    deep = upper
    for _ in range(depth):  # not mkdir(parents=True): that recurses too
        deep = deep / "d"
        deep.mkdir()
    (deep / "f").touch()
    try:
        found = diff(upper, layers.dir("lower"))
        assert len(found) == depth + 1 and found[-1] == "A " + "/d" * depth + "/f"
    finally:
        # pytest removes old temporary dirs with shutil.rmtree, which recurses and would fail here.
        (deep / "f").unlink()
        for _ in range(depth):
            deep.rmdir()
            deep = deep.parent


def test_upper_written_by_kernel_overlayfs_matches_the_two_tree_comparison(layers, mounts, tmp_path):
    upper, top, bottom = layers.dir("upper"), layers.dir("top"), layers.dir("bottom")
    write(bottom / "etc/passwd", "root\n")
    write(bottom / "etc/hosts", "localhost\n")
    write(bottom / "usr/share/doc/a/README", "a\n")
    write(bottom / "usr/share/doc/b/README", "b\n")
    write(bottom / "srv/data", "d\n")
    write(bottom / "var/log/syslog", "s\n")
    write(top / "etc/motd", "hi\n")
    (top / "srv").mkdir()
    whiteout(top / "srv", "data")
    write(top / "opt/tool", "t\n", mode=0o755)

    mnt = mounts.overlay(tmp_path / "ctr", [top, bottom], upper, layers.dir("work"))
    write(mnt / "etc/passwd", "root\nuser\n")  # edit
    (mnt / "etc/motd").unlink()  # delete from the top lower
    shutil.rmtree(mnt / "usr/share/doc/a")  # delete a lower subtree
    write(mnt / "usr/share/doc/c/README", "c\n")  # add below a lower dir
    (mnt / "opt/tool").rename(mnt / "opt/tool2")  # rename: delete + add
    (mnt / "srv/data").write_text("back\n")  # re-create what the top lower deleted
    (mnt / "etc/hosts").chmod(0o600)
    (mnt / "var/log/tmp").write_text("x")
    (mnt / "var/log/tmp").unlink()  # /var/log changed only through its mtime
    os.mkdir(mnt / "usr/share/doc/b/empty")
    mounts.unmount(mnt)

    # Image and container, mounted read-only side by side (the upper as the top lower).
    image = mounts.overlay(tmp_path / "image", [top, bottom])
    container = mounts.overlay(tmp_path / "container", [upper, top, bottom])
    expected = two_tree_changes(image, container)
    # The scenario did what it says:
    assert {"D /usr/share/doc/a", "A /srv/data", "C /var/log"} <= set(expected)
    assert diff(upper, top, bottom) == expected


def test_unchanged_copies_are_left_out_on_request(image):
    upper, top, bottom = image
    etc = copy_dir(bottom, upper, "etc")
    shutil.copy2(bottom / "etc/passwd", etc / "passwd")  # copied up, then written back the same
    os.utime(etc / "passwd", ns=(1, 2))  # with other times: an editor's rewrite
    skel = copy_dir(bottom, upper, "etc/skel")
    shutil.copy2(bottom / "etc/skel/profile", skel / "profile")
    os.chmod(skel / "profile", 0o600)  # the same content, another mode: a change
    cache = copy_dir(bottom, upper, "var/cache/app")
    shutil.copy2(bottom / "var/cache/app/one", cache / "one")
    os.setxattr(cache / "one", "user.note", b"x")  # an xattr more: a change
    shutil.copy2(bottom / "var/cache/app/two", cache / "two")
    (cache / "two").write_text("3\n")  # same size, other content: a change
    lowers = [str(top), str(bottom)]
    everything = [str(c) for c in changes(str(upper), lowers)]
    assert "C /etc/passwd" in everything
    real = [str(c) for c in changes(str(upper), lowers, unchanged_copies=False)]
    assert real == [
        "C /etc",
        "C /etc/skel",
        "C /etc/skel/profile",
        "C /var",
        "C /var/cache",
        "C /var/cache/app",
        "C /var/cache/app/one",
        "C /var/cache/app/two",
    ]
    with read_index(str(upper), str(upper.parent / "index-state"), lowers=lowers) as index:
        assert [str(c) for c in indexed_changes(index, lowers, unchanged_copies=False)] == real
