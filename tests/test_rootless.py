"""layerfs without root: in a user namespace (the forms kernel overlayfs writes with ``userxattr``)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from snapshot import Snapshot, assert_same

pytestmark = pytest.mark.root

TESTS = Path(__file__).parent


def _lower(base: Path) -> Path:
    lower = base / "lower"
    for d in ("a/sub", "b", "c", "d/inner"):
        (lower / d).mkdir(parents=True)
    for name, data in {"a/file1": b"one\n", "a/sub/deep": b"deep\n", "b/keep": b"keep\n", "c/gone": b"gone\n"}.items():
        (lower / name).write_bytes(data)
    (lower / "d/inner/x").write_bytes(b"x\n")
    return lower


def _without_uuid(upper: Snapshot) -> Snapshot:
    """The upper without the random id kernel overlayfs (6.6 on) keeps of it in its root's overlay.uuid;
    layerfs keeps none."""
    root = upper.entries["."]
    kept = tuple((name, value) for name, value in root.xattrs if name != "user.overlay.uuid")
    return Snapshot({**upper.entries, ".": root._replace(xattrs=kept)}, upper.inodes)


def test_user_namespace_forms_match_kernel_userxattr(tmp_path):
    """In ``unshare -Ur`` layerfs finds by itself that trusted.* is refused and writes the upper kernel
    overlayfs writes with ``-o userxattr``, record for record; and each reads the other's upper."""
    out = tmp_path / "result"
    helper = [sys.executable, str(TESTS / "userns_twin.py"), str(_lower(tmp_path)), str(tmp_path / "twin"), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    run = subprocess.run(["unshare", "-Ur", "--mount", *helper], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    seen = pickle.loads(out.read_bytes())
    upper = seen["kernel upper"]
    assert any(name.startswith("user.overlay.") for e in upper.entries.values() for name, _ in e.xattrs), upper
    assert_same(_without_uuid(upper), seen["layerfs upper"], what="uppers", names=("kernel", "layerfs"))
    assert_same(seen["kernel tree"], seen["layerfs tree"], what="trees", names=("kernel", "layerfs"))
    for reader, writer in (("kernel", "layerfs"), ("layerfs", "kernel")):
        assert_same(
            seen[f"{writer} tree"],
            seen[f"{reader} reads {writer}"],
            what=f"{writer}'s upper read by {reader}",
            names=(writer, reader),
        )


def test_userxattr_option_writes_user_forms_as_root(tmp_path, mounts):
    """``-o userxattr`` asks for the user.* records even where trusted.* may be written."""
    lower, upper, work = _lower(tmp_path), tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mnt = mounts.layerfs(tmp_path / "mnt", [lower], upper, work, extra="userxattr")
    shutil.rmtree(mnt / "d")
    (mnt / "d").mkdir()
    os.rename(mnt / "a/sub", mnt / "a/renamed")
    mounts.unmount(mnt)
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    assert os.getxattr(upper / "a/renamed", "user.overlay.redirect") == b"sub"
    assert os.getxattr(upper / "a/renamed", "user.overlay.origin")[:2] == b"\x00\xfb"  # (root opens handles)
    assert not [name for name in os.listxattr(upper / "a/renamed") if name.startswith("trusted.")]


def test_override_stat_records_are_shown_with_xattr_permissions(tmp_path, mounts):
    """fuse-overlayfs's xattr_permissions records (containers-storage's preferred) give the owner and
    mode getattr shows, with the same option; without it, the file's own."""
    lower = _lower(tmp_path)
    os.setxattr(lower / "b/keep", "user.fuseoverlayfs.override_stat", b"5:6:0600")
    os.setxattr(lower / "b/keep", "user.containers.override_stat", b"1000:1001:4750:file")
    os.setxattr(lower / "a/file1", "user.fuseoverlayfs.override_stat", b"7:8:0711")
    mnt = mounts.layerfs(tmp_path / "mnt", [lower], extra="xattr_permissions=2")
    shown = {name: os.lstat(mnt / name) for name in ("b/keep", "a/file1", "c/gone")}
    assert [(s.st_uid, s.st_gid, oct(s.st_mode)) for s in shown.values()] == [
        (1000, 1001, oct(0o104750)),
        (7, 8, oct(0o100711)),
        (0, 0, oct(0o100644)),
    ]
    mounts.unmount(mnt)
    mnt = mounts.layerfs(tmp_path / "plain", [lower])
    assert (os.lstat(mnt / "b/keep").st_uid, oct(os.lstat(mnt / "b/keep").st_mode)) == (0, oct(0o100644))
