"""Symbolic and hard links on real mounts, compared with kernel overlayfs: symlink, readlink, link, the
st_ino and st_nlink hard links report (right after each change: the kernel caches attributes for 1 s),
and hard links that already exist in a lower layer."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from pair import FORMS, Err, Stack, describe, make_pair, outcome, tree, whiteout, write


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    write(bottom / "a", "a")
    write(bottom / "dir/f", "f")
    write(mid / "dir/g", "g")
    os.symlink("dir/f", bottom / "lower-link")
    os.symlink("/nowhere", mid / "dangling")
    write(bottom / "gone", "deleted in top")
    whiteout(top, "gone")
    write(bottom / "hl1", "shared")
    os.link(bottom / "hl1", bottom / "hl2")
    os.link(bottom / "hl1", bottom / "dir/hl3")


@pytest.mark.parametrize("form", FORMS)
def test_symlink_and_readlink(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)
    long_target = "/".join(["x" * 200] * 20)[:4095]

    def scenario(mnt: Path):
        steps = {
            "relative": outcome(os.symlink, "a", mnt / "s-rel"),
            "absolute": outcome(os.symlink, "/etc/hostname", mnt / "s-abs"),
            "to dir": outcome(os.symlink, "dir", mnt / "s-dir"),
            "in lower dir": outcome(os.symlink, "../a", mnt / "dir/s-up"),
            "over whited-out": outcome(os.symlink, "a", mnt / "gone"),
            "over existing": outcome(os.symlink, "a", mnt / "dir/f"),
            "long target": outcome(os.symlink, long_target, mnt / "s-long"),
            "readlink file": outcome(os.readlink, mnt / "a"),
            "readlink missing": outcome(os.readlink, mnt / "missing"),
            "readlink lower": outcome(os.readlink, mnt / "lower-link"),
            "through dir link": sorted(os.listdir(mnt / "s-dir")),
            "through lower link": (mnt / "lower-link").read_bytes(),
            "lchown": outcome(os.chown, mnt / "dangling", 1000, 1000, follow_symlinks=False),
        }
        # Writing through a lower symlink copies up the file it points to, not the link.
        with open(mnt / "lower-link", "ab") as f:
            f.write(b"+")
        steps["long target back"] = os.readlink(mnt / "s-long") == long_target
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    files = seen["tree"]
    assert files["s-rel"]["type"] == "symlink" and files["s-rel"]["mode"] == "0777" and files["s-rel"]["size"] == 1
    assert files["gone"]["target"] == "a" and files["dir/f"]["data"] == b"f+" and seen["steps"]["long target back"]
    assert seen["steps"]["over existing"] == Err("EEXIST") and seen["steps"]["readlink file"] == Err("EINVAL")
    assert files["dangling"]["uid"] == 1000
    upper = pair.compare_uppers()
    assert "lower-link" not in upper and upper["dir/f"]["data"] == b"f+"


def _links(mnt: Path, *names: str) -> dict:
    """How the names relate: their link counts, and which share an inode with the first."""
    st = [os.lstat(mnt / n) for n in names]
    return {"nlink": [s.st_nlink for s in st], "same ino": [s.st_ino == st[0].st_ino for s in st]}


@pytest.mark.parametrize("form", FORMS)
def test_link(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        write(mnt / "new", "upper")
        steps = {
            "lower file": outcome(os.link, mnt / "a", mnt / "a-link"),
            "into lower dir": outcome(os.link, mnt / "a", mnt / "dir/a-link"),
            # Right away: the name just made has the right count, and every name the same inode number.
            "newest name's count": os.lstat(mnt / "dir/a-link").st_nlink,
            "same inode": _links(mnt, "a", "a-link", "dir/a-link")["same ino"],
            "upper file": outcome(os.link, mnt / "new", mnt / "dir/new-link"),
            "over whited-out": outcome(os.link, mnt / "new", mnt / "gone"),
            "onto existing": outcome(os.link, mnt / "a", mnt / "dir/f"),
            "dir": outcome(os.link, mnt / "dir", mnt / "dir-link"),
            "missing": outcome(os.link, mnt / "missing", mnt / "x"),
            "symlink itself": outcome(os.link, mnt / "lower-link", mnt / "link-link", follow_symlinks=False),
        }
        # Data written through one name is read through the others at once.
        with open(mnt / "a-link", "ab") as f:
            f.write(b"+")
        steps["shared data"] = [(mnt / n).read_bytes() for n in ("a", "dir/a-link")]
        os.unlink(mnt / "a")
        os.unlink(mnt / "gone")
        steps["data after unlink"] = [(mnt / n).read_bytes() for n in ("a-link", "dir/a-link", "dir/new-link")]
        # Link counts seen through the other names follow at once.
        steps["after unlink"] = _links(mnt, "a-link", "dir/a-link")
        steps["after unlink upper"] = _links(mnt, "new", "dir/new-link")
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    steps = seen["steps"]
    assert steps["newest name's count"] == 3 and steps["same inode"] == [True, True, True]
    assert steps["after unlink"] == {"nlink": [2, 2], "same ino": [True, True]}
    assert steps["after unlink upper"]["nlink"] == [2, 2]
    assert steps["shared data"] == [b"a+", b"a+"] and steps["data after unlink"] == [b"a+", b"a+", b"upper"]
    assert steps["dir"] == Err("EPERM") and steps["onto existing"] == Err("EEXIST")
    pair.compare_uppers()


def test_hard_links_of_a_lower_layer(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        names = ("hl1", "hl2", "dir/hl3")
        steps = {"as found": _links(mnt, *names)}
        # Copy-up breaks a lower hard link (overlayfs without index): the other names keep the old data.
        with open(mnt / "hl1", "ab") as f:
            f.write(b"+")
        steps["after write"] = _links(mnt, *names)
        steps["data"] = [(mnt / n).read_bytes() for n in names]
        steps["rename onto another name"] = outcome(os.rename, mnt / "hl2", mnt / "dir/hl3")
        steps["names left"] = sorted(n for n in names if os.path.lexists(mnt / n))
        return {"steps": steps, "hl1": describe(mnt / "hl1")}

    seen = pair.compare(scenario)
    assert seen["steps"]["as found"] == {"nlink": [3, 3, 3], "same ino": [True, True, True]}
    assert seen["steps"]["data"][0] == b"shared+"


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "nopassthrough"])
def test_mmap_through_one_name_read_through_another(mounts, tmp_path, passthrough):
    """A file is one kernel inode, whatever name it is reached by: a shared mapping written through one
    name is read(2) through another at once, without msync, as on kernel overlayfs; and the other way
    round, a write(2) through one name shows in the mapping made through the other."""
    pair = make_pair(mounts, tmp_path, build, layerfs_options="" if passthrough else "nopassthrough")

    def scenario(mnt: Path):
        write(mnt / "m", "0123456789" * 500)
        os.link(mnt / "m", mnt / "dir/m2")
        os.link(mnt / "a", mnt / "a2")  # a lower file: copied up by the link, then mapped
        seen = {}
        for first, second in (("m", "dir/m2"), ("a2", "a")):
            fd = os.open(mnt / first, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                with mmap.mmap(fd, size) as mapped:
                    mapped[0:1] = b"X"
                    seen[f"{second} read after mapped write"] = (mnt / second).read_bytes()[:4]
                    with open(mnt / second, "r+b") as other:
                        other.write(b"YZ")
                    seen[f"{first} mapping after write"] = mapped[0:4]
            finally:
                os.close(fd)
        return seen

    seen = pair.compare(scenario)
    assert seen["dir/m2 read after mapped write"] == b"X123" and seen["m mapping after write"] == b"YZ23"
    assert seen["a read after mapped write"] == b"X" and seen["a2 mapping after write"] == b"Y"  # a 1-byte map
