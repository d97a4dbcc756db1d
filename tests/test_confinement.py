"""The daemon never follows a path out of a layer's root.

Hostile layers hold symlinks to ``/``, to ``../..`` and in place of parent directories; they must show as
the symlinks they are (kernel overlayfs is the oracle) and never let the daemon reach what they point at.
And a layer changed behind the mount's back, a directory swapped for a symlink to somewhere else after
the mount looked it up, must not lead the daemon there either: reads and changes fail (ELOOP) and the
outside stays untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import errno_of
from pair import tree

SECRET = "the host's secret\n"


def fingerprint(root: Path) -> dict[str, tuple]:
    """Content and metadata of everything below ``root``, to show it was not touched."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        found[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, data)
    return found


@pytest.fixture
def outside(tmp_path) -> Path:
    """What a layer must never reach: a directory beside the layers holding a secret."""
    where = tmp_path / "outside"
    (where / "etc").mkdir(parents=True)
    (where / "secret").write_text(SECRET)
    (where / "etc" / "secret").write_text(SECRET)
    (where / "d").mkdir()
    (where / "d" / "file").write_text(SECRET)
    return where


def hostile_layers(tmp_path: Path, outside: Path) -> tuple[Path, Path]:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "motd").write_text("top\n")
    # The bottom layer's etc is a symlink out: it must not merge into the top's etc.
    bottom.mkdir()
    os.symlink(str(outside / "etc"), bottom / "etc")
    os.symlink("/", bottom / "root-link")
    os.symlink("../..", bottom / "up")
    os.symlink("../../outside", top / "escape")
    # A symlinked parent directory, with a whiteout and a file "inside" it in the layer above.
    os.symlink(str(outside), bottom / "lib")
    (top / "lib").mkdir()
    (top / "lib" / "own").write_text("mine\n")
    (top / "lib" / ".wh.secret").write_text("")
    return top, bottom


def test_hostile_symlinks_show_as_on_kernel_overlayfs_and_lead_nowhere(tmp_path, mounts, outside):
    top, bottom = hostile_layers(tmp_path, outside)
    before = fingerprint(outside)
    # (kernel overlayfs does not read .wh. files: it gets the top layer without them.)
    plain_top = tmp_path / "plain-top"
    shutil.copytree(top, plain_top, symlinks=True)
    (plain_top / "lib" / ".wh.secret").unlink()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    ours = mounts.layerfs(tmp_path / "layerfs", [top, bottom], upper, work)
    kernel = mounts.overlay(tmp_path / "kernel", [plain_top, bottom])
    seen = tree(ours)
    assert seen == tree(kernel)
    assert SECRET.encode() not in [entry.get("data") for entry in seen.values()]
    assert sorted(os.listdir(ours / "etc")) == ["motd"]
    assert sorted(os.listdir(ours / "lib")) == ["own"]

    # Changes through the mount next to and below the symlinks stay in the upper layer.
    (ours / "etc" / "new").write_text("new\n")
    (ours / "lib" / "own").write_text("changed\n")
    os.chmod(ours / "lib" / "own", 0o600)
    (ours / "etc" / "motd").unlink()
    os.rename(ours / "lib", ours / "lib2")
    assert fingerprint(outside) == before


def swap_for_symlink(directory: Path, target: Path) -> None:
    """Replace ``directory`` (in a layer, behind the mount's back) by a symlink to ``target``."""
    shutil.rmtree(directory)
    os.symlink(str(target), directory)


@pytest.mark.parametrize("layer", ["lower", "upper"])
def test_a_directory_swapped_for_a_symlink_after_lookup_is_not_followed(tmp_path, mounts, outside, layer):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower / "d", upper, work):
        d.mkdir(parents=True)
    home = lower if layer == "lower" else upper
    (home / "d").mkdir(exist_ok=True)
    (home / "d" / "file").write_text("the layer's own\n")
    os.symlink("the layer's target", home / "d" / "link")
    (outside / "d" / "link").symlink_to("the host's target")
    os.setxattr(outside / "d" / "file", "user.secret", SECRET.encode())
    mnt = mounts.layerfs(tmp_path / "mnt", [lower], upper, work)
    assert (mnt / "d" / "file").read_text() == "the layer's own\n"  # looked up: the daemon knows d is a directory
    assert os.path.islink(mnt / "d" / "link")  # looked up, its target not read (the kernel would keep that)

    swap_for_symlink(home / "d", outside / "d")
    before = fingerprint(outside)
    # The kernel still has d/file cached and asks the daemon for it by name: every way in fails. (ELOOP
    # where the path is taken apart, ENOTDIR or ENOENT where the lookup sees the symlink for what it is
    # now: no directory, so nothing in it.)
    file = mnt / "d" / "file"
    refused = {errno.ELOOP, errno.ENOTDIR, errno.ENOENT}
    for action in (
        file.read_text,
        lambda: file.write_text("overwritten\n"),
        lambda: os.chmod(file, 0o777),
        lambda: os.chown(file, 1234, 1234),
        lambda: os.utime(file, (1, 1)),
        lambda: os.setxattr(file, "user.x", b"x"),
        lambda: os.truncate(file, 0),
        lambda: os.link(file, mnt / "linked"),
        lambda: os.unlink(file),
        lambda: os.rename(file, mnt / "moved"),
        lambda: os.readlink(mnt / "d" / "link"),
        lambda: os.getxattr(file, "user.secret"),
        lambda: os.listxattr(file),
        lambda: os.removexattr(file, "user.secret"),
    ):
        assert errno_of(action) in refused, action
    assert fingerprint(outside) == before
    assert (outside / "d" / "file").read_text() == SECRET
    # Nothing of it was copied up as if it were still a directory.
    assert not os.path.islink(upper / "d") or layer == "upper"
