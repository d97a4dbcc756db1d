"""Inode numbers across unmounts, remounts and layer rotation, held against kernel overlayfs.

Each side (kernel overlayfs, layerfs) has its own copy of the same layers on one filesystem, so both
report real inode numbers of their own layer files. A number is therefore compared by whose it is: the
layer and path of the real file that has it ("L:/d/f"), which must be the same on both sides, and the same
after a remount as before it. Three rounds: changes, unmount, remount the same upper (nothing may move),
then rotate the upper under a new one as a lower (as a commit does) and make more changes. On the kernel,
a copy-up keeps its lower's number across a remount (its origin record) but not across a rotation, where
the copy is a lower entry of its own; layerfs must do the same, and each must read the upper the other
wrote to the same numbers. All of it on two filesystems: one that tells no UUID and a tmpfs, whose UUID
the origin records carry.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from pair import walk, write

ROUNDS = 3


def build_bottom(root: Path) -> None:
    write(root / "f", "f")
    write(root / "d/g", "g")
    write(root / "d/e/h", "h")
    write(root / "linked", "two names")
    os.link(root / "linked", root / "d/linked2")
    os.symlink("f", root / "s")
    (root / "empty").mkdir()


def change(mnt: Path, round_: int) -> None:
    """Copy-ups of every kind (chmod, a write, a directory chain, a link, a rename), new entries, a removal."""
    os.chmod(mnt / "f", 0o600 + round_)
    with open(mnt / "d/e/h", "a") as f:
        f.write(str(round_))
    os.chown(mnt / "s", round_, round_, follow_symlinks=False)
    os.chmod(mnt / "linked", 0o640)
    os.link(mnt / "d/g", mnt / f"g-link{round_}")
    write(mnt / f"new{round_}", "new")
    os.mkdir(mnt / f"dir{round_}")
    os.rename(mnt / "f", mnt / "d" / f"f{round_}")
    os.rename(mnt / "d" / f"f{round_}", mnt / "f")
    os.rmdir(mnt / "empty") if round_ == 0 else None


def owners(layers: dict[str, Path]) -> dict[int, str]:
    """Inode number -> the real file that has it, as LAYER:/path (the first name of a hard-linked one)."""
    found: dict[int, str] = {}
    for name, root in layers.items():
        for rel, st in walk(root):
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                found.setdefault(st.st_ino, f"{name}:/{rel}")
        found.setdefault(os.lstat(root).st_ino, f"{name}:/")
    return found


def identities(mnt: Path, layers: dict[str, Path]) -> dict[str, str]:
    """Each merged entry's number told by whose it is; every entry must show the mount's st_dev."""
    who = owners(layers)
    dev = os.lstat(mnt).st_dev
    seen = {}
    for rel, st in [(".", os.lstat(mnt)), *walk(mnt)]:
        assert st.st_dev == dev, f"{rel}: st_dev {st.st_dev}, the mount's is {dev}"
        seen[rel] = who.get(st.st_ino, f"unknown number {st.st_ino}")
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(mnt / rel) as it:
                for entry in it:  # readdir's d_ino must be the number lstat gives
                    assert entry.inode() == entry.stat(follow_symlinks=False).st_ino, f"{rel}/{entry.name}: d_ino"
    return seen


def side(base: Path, mounts, kind: str) -> dict[int, dict[str, str]]:
    """Run the rounds on one side; returns what each step saw."""
    bottom = base / "L"
    build_bottom(bottom)
    mount = mounts.overlay if kind == "overlay" else mounts.layerfs
    lowers = [bottom]
    layers = {"L": bottom}
    seen: dict[int, dict[str, str]] = {}
    for round_ in range(ROUNDS):
        upper, work, mnt = base / f"U{round_}", base / f"W{round_}", base / "mnt"
        upper.mkdir()
        work.mkdir()
        layers[f"U{round_}"] = upper
        mount(mnt, lowers, upper, work)
        change(mnt, round_)
        before = identities(mnt, layers)
        mounts.unmount(mnt)
        mount(mnt, lowers, upper, work)
        after = identities(mnt, layers)
        assert after == before, f"{kind}, round {round_}: numbers moved at a remount"
        seen[round_] = after
        mounts.unmount(mnt)
        # The other implementation reads the same numbers from what this one wrote.
        other = mounts.layerfs if kind == "overlay" else mounts.overlay
        other(mnt, lowers, upper, work)
        assert identities(mnt, layers) == after, f"round {round_}: the upper {kind} wrote, read by the other"
        mounts.unmount(mnt)
        shutil.rmtree(work)
        lowers = [upper] + lowers
    return seen


@pytest.fixture(params=["here", "tmpfs"])
def where(request, tmp_path):
    """Where the layers are: the test directory's filesystem (which tells no UUID on this machine), or a
    tmpfs, which has one: origin records carry it, as the kernel writes them."""
    return tmp_path if request.param == "here" else request.getfixturevalue("tmpfs")


def test_numbers_survive_a_remount_and_rotate_as_on_overlayfs(where, mounts):
    kernel = side(where / "kernel", mounts, "overlay")
    ours = side(where / "layerfs", mounts, "layerfs")
    for round_ in range(ROUNDS):
        assert ours[round_] == kernel[round_], f"round {round_}"
    # Not vacuous: copies show their lower's number, and rotated copies their own.
    assert kernel[0]["f"] == "L:/f" and kernel[1]["f"].startswith("U0:")
