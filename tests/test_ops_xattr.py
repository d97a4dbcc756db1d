"""Extended attributes on real mounts: get/set/list/remove compared with kernel overlayfs, and the
overlay implementations' own xattrs, which never show through layerfs."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from pair import ALL_FORMS, FORMS, Err, Stack, make_opaque, make_pair, outcome, tree, whiteout, write, xattrs


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    f = write(bottom / "f", "f")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "trusted.t", b"1")
    write(bottom / "plain", "no xattrs")
    write(bottom / "dir/old", "hidden by opaque mid")
    write(mid / "dir/new", "new")
    os.setxattr(mid / "dir", "user.d", b"dir")
    make_opaque(mid / "dir")
    os.symlink("f", top / "sym")
    os.mkfifo(top / "fifo")
    write(bottom / "gone", "deleted in top")
    whiteout(top, "gone")


@pytest.mark.parametrize("form", FORMS)
def test_get_set_list_remove(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)
    big = bytes(range(256)) * 15

    def scenario(mnt: Path):
        f, d = mnt / "f", mnt / "dir"
        steps = {
            "list lower": sorted(os.listxattr(f)),
            "get lower": outcome(os.getxattr, f, "user.color"),
            "get missing": outcome(os.getxattr, f, "user.missing"),
            "set on lower": outcome(os.setxattr, f, "user.new", b"v"),
            "create existing": outcome(os.setxattr, f, "user.color", b"x", os.XATTR_CREATE),
            "replace missing": outcome(os.setxattr, f, "user.none", b"x", os.XATTR_REPLACE),
            "replace existing": outcome(os.setxattr, f, "user.color", b"red", os.XATTR_REPLACE),
            "remove": outcome(os.removexattr, f, "trusted.t"),
            "remove again": outcome(os.removexattr, f, "trusted.t"),
            "remove missing on lower": outcome(os.removexattr, mnt / "plain", "user.none"),
            "get after remove": outcome(os.getxattr, f, "trusted.t"),
            "big value": outcome(os.setxattr, f, "user.big", big),
            "empty value": outcome(os.setxattr, f, "user.empty", b""),
            "set on opaque dir": outcome(os.setxattr, d, "user.more", b"m"),
            "user on symlink": outcome(os.setxattr, mnt / "sym", "user.x", b"x", follow_symlinks=False),
            "trusted on symlink": outcome(os.setxattr, mnt / "sym", "trusted.x", b"x", follow_symlinks=False),
            "user on fifo": outcome(os.setxattr, mnt / "fifo", "user.x", b"x"),
            "followed through symlink": outcome(os.getxattr, mnt / "sym", "user.color"),
            "on missing": outcome(os.listxattr, mnt / "missing"),
            "on whited-out": outcome(os.getxattr, mnt / "gone", "user.color"),
            "list plain": os.listxattr(mnt / "plain"),
        }
        steps["big back"] = os.getxattr(f, "user.big") == big
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    steps, files = seen["steps"], seen["tree"]
    assert steps["list lower"] == ["trusted.t", "user.color"] and steps["get missing"] == Err("ENODATA")
    assert steps["create existing"] == Err("EEXIST") and steps["replace missing"] == Err("ENODATA")
    assert steps["user on symlink"] == Err("EPERM") and steps["big back"]
    assert files["f"]["xattrs"]["user.color"] == b"red"
    assert files["dir"]["xattrs"] == {"user.d": b"dir", "user.more": b"m"}
    for side in pair.sides:  # the lower file itself is untouched
        assert xattrs(side.sources[2] / "f") == {"trusted.t": b"1", "user.color": b"blue"}
    pair.compare_uppers()


# Every private namespace: kernel overlayfs's (trusted and userxattr forms) and fuse-overlayfs's.
PRIVATE = ("trusted.overlay.opaque", "trusted.overlay.origin", "user.overlay.opaque", "user.fuseoverlayfs.origin")


@pytest.mark.parametrize("form", ALL_FORMS)
def test_internal_xattrs_are_invisible(mounts, tmp_path, form):
    def build_marked(s: Stack) -> None:
        build(s)
        for name in PRIVATE[1:]:
            os.setxattr(s.lowers[2] / "f", name, b"y")

    pair = make_pair(mounts, tmp_path, build_marked, form=form)

    def made_opaque(mnt: Path) -> None:
        os.unlink(mnt / "dir/new")
        os.rmdir(mnt / "dir")
        os.mkdir(mnt / "dir")  # opaque in the upper now

    # What both agree on: an opaque directory shows no xattr of its own kind.
    def scenario(mnt: Path):
        made_opaque(mnt)
        return {"list": os.listxattr(mnt / "dir"), "get": outcome(os.getxattr, mnt / "dir", PRIVATE[0])}

    seen = pair.compare(scenario)
    assert seen == {"list": [], "get": Err("ENODATA")}

    # layerfs's decided answers for every private name, on every kind of entry (the kernel lets some of
    # these through: it knows only its own names, and escapes trusted.overlay.* instead of refusing).
    mnt = pair.layerfs.mnt
    for rel in ("dir", "f", "."):
        shown = os.listxattr(mnt / rel)
        for name in PRIVATE:
            assert name not in shown, (rel, name)
            assert outcome(os.getxattr, mnt / rel, name) == Err("ENODATA"), (rel, name)
            assert outcome(os.setxattr, mnt / rel, name, b"y") == Err("EOPNOTSUPP"), (rel, name)
            assert outcome(os.removexattr, mnt / rel, name) == Err("EOPNOTSUPP"), (rel, name)
    assert sorted(os.listxattr(mnt / "f")) == ["trusted.t", "user.color"]
    # Nothing leaked into the lower either.
    assert set(xattrs(pair.layerfs.sources[2] / "f")) == {"trusted.t", "user.color", *PRIVATE[1:]}


# security.capability, VFS_CAP_REVISION_2 with the effective bit: cap_net_raw+ep.
_CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def test_file_capabilities_survive_copy_up(mounts, tmp_path):
    # A chown clears security.capability: a copy-up that sets the owner after the xattrs loses it.
    def build_tools(s: Stack) -> None:
        for name in ("ping", "setuid-ping"):
            tool = write(s.lowers[2] / name, "#!/bin/true\n", mode=0o4755 if name == "setuid-ping" else 0o755)
            os.chown(tool, 1000, 1000)
            os.setxattr(tool, "security.capability", _CAP_NET_RAW)

    pair = make_pair(mounts, tmp_path, build_tools)

    def scenario(mnt: Path):
        os.utime(mnt / "ping")  # copy-up by a metadata change
        with open(mnt / "setuid-ping", "a"):  # copy-up by an open for writing
            pass
        return {
            name: (outcome(os.getxattr, mnt / name, "security.capability"), oct(os.stat(mnt / name).st_mode))
            for name in ("ping", "setuid-ping")
        }

    seen = pair.compare(scenario)
    assert seen["ping"][0] == seen["setuid-ping"][0] == _CAP_NET_RAW
