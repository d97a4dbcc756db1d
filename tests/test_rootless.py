"""layerfs without root: in a user namespace (the forms kernel overlayfs writes with ``userxattr``), and
as a plain user outside any namespace (fusermount3 mounts), with a throwaway user made for the test."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import User, force_unmount, is_mounted
from conftest import layerfs as run_layerfs
from pair import run_as
from processes import daemon_pids, wait_for
from snapshot import Snapshot, assert_same, snapshot, snapshot_upper

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


RECORD = "user.fuseoverlayfs.override_stat"


def _owner_changes(mnt: Path) -> None:
    """chown and chmod of lower and new directories and files, as a container's set-up makes them."""
    os.chown(mnt / "a/file1", 5, 6)
    os.chmod(mnt / "b/keep", 0o640)
    os.chown(mnt / "a", 7, 8)
    fd = os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"new\n")
    os.close(fd)
    os.chmod(mnt / "new", 0o4755)
    os.chown(mnt / "new", 9, 10)  # (clears setuid)
    os.mkdir(mnt / "nd", 0o755)  # (fuse-overlayfs before 1.14 records 0755 whatever mkdir asks)
    os.chown(mnt / "nd", 11, 12)


def test_xattr_permissions_records_owners_and_modes_as_fuse_overlayfs_does(tmp_path, mounts):
    """With xattr_permissions=2 a chown, chmod or creation of a directory or regular file is kept in its
    override_stat record, as fuse-overlayfs keeps it, and shown from there: the same records and the same
    owners and modes through both; the files stay root's."""
    lower = _lower(tmp_path)
    records, shown = {}, {}
    for side, mount in (("fuse-overlayfs", mounts.fuse_overlayfs), ("layerfs", mounts.layerfs)):
        upper, work = tmp_path / side / "upper", tmp_path / side / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        mnt = mount(tmp_path / side / "mnt", [lower], upper, work, extra="xattr_permissions=2")
        os.umask(old := os.umask(0))
        try:
            _owner_changes(mnt)
        finally:
            os.umask(old)
        found = {
            str(p.relative_to(upper)): os.getxattr(p, RECORD) for p in upper.rglob("*") if RECORD in os.listxattr(p)
        }
        records[side] = found
        shown[side] = {name: (s.st_uid, s.st_gid, oct(s.st_mode)) for name in found for s in [os.lstat(mnt / name)]}
        mounts.unmount(mnt)
        assert {os.lstat(upper / name).st_uid for name in found} == {0}
    # fuse-overlayfs also records the owner of a directory it copies up (b, for b/keep): layerfs gives the
    # copy that owner itself, as without the option.
    assert set(records["fuse-overlayfs"]) - set(records["layerfs"]) == {"b"}
    assert records["layerfs"] == {name: records["fuse-overlayfs"][name] for name in records["layerfs"]}
    assert shown["layerfs"] == {name: shown["fuse-overlayfs"][name] for name in shown["layerfs"]}
    assert shown["layerfs"]["a/file1"] == (5, 6, oct(0o100644)) and shown["layerfs"]["new"] == (9, 10, oct(0o100755))


def test_xattr_permissions_records_keep_unchanged_ids_and_follow_open_files(tmp_path, mounts):
    """A chown's -1 keeps that id of the record; mkdir's mode is recorded as asked; a file open with no name
    left has its chown recorded through its descriptor, and fstat shows it."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mnt = mounts.layerfs(tmp_path / "mnt", [_lower(tmp_path)], upper, work, extra="xattr_permissions=2")
    os.chown(mnt / "a/file1", 5, 6)
    os.chown(mnt / "a/file1", -1, 7)
    os.mkdir(mnt / "private", 0o700)
    fd = os.open(mnt / "b/gone-soon", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.unlink(mnt / "b/gone-soon")
        os.fchown(fd, 3, 4)
        assert (os.fstat(fd).st_uid, os.fstat(fd).st_gid) == (3, 4)
    finally:
        os.close(fd)
    assert os.getxattr(upper / "a/file1", RECORD) == b"5:7:100644"
    assert os.getxattr(upper / "private", RECORD) == b"0:0:40700"
    assert (os.lstat(mnt / "a/file1").st_uid, os.lstat(mnt / "a/file1").st_gid) == (5, 7)


@pytest.fixture
def user_layers(plain_user: User) -> Iterator[Path]:
    """lower (the user's files, readable by all), upper, work and mnt of the user, in a directory every
    user can reach; nothing left mounted there afterwards."""
    base = Path(tempfile.gettempdir()) / f"layerfs-{plain_user.name}"
    base.mkdir(mode=0o755)
    try:
        lower = _lower(base)
        for name in ("upper", "work", "mnt"):
            (base / name).mkdir()
        for path in [base, base / "upper", base / "work", base / "mnt", *lower.rglob("*"), lower]:
            os.lchown(path, plain_user.uid, plain_user.gid)
        yield base
    finally:
        force_unmount(base / "mnt")
        shutil.rmtree(base)


def _changes_as(user: User, mnt: Path) -> None:
    user.run("sh", "-ec", f"cd {mnt}; echo new > new; rm c/gone; rm -r d; mkdir d; echo more >> a/file1")


def test_plain_user_mounts_through_fusermount3(plain_user, user_layers):
    """fuse-overlayfs's form run by a plain user: mounted by fusermount3, changed, diffed, unmounted
    with fusermount3 -u; the upper is in the user forms kernel overlayfs reads with userxattr."""
    base, mnt = user_layers, user_layers / "mnt"
    options = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
    mounted = plain_user.layerfs("-o", options, mnt)
    assert mounted.stderr == ""
    assert is_mounted(mnt)
    _changes_as(plain_user, mnt)
    seen = run_as(plain_user.uid, plain_user.gid, snapshot, mnt)  # (root may not enter the user's mount)
    diff = plain_user.layerfs("diff", mnt).stdout  # (from the daemon's change index)
    assert {"A /new", "D /c/gone", "C /a/file1", "D /d"} <= set(diff.splitlines())
    plain_user.run("fusermount3", "-u", mnt)
    assert wait_for(lambda: not daemon_pids(mnt))
    walked = run_layerfs("diff", "--upperdir", base / "upper", "--lowerdir", base / "lower").stdout
    assert walked == diff
    upper = snapshot_upper(base / "upper")
    assert upper.entries["c/gone"].kind == "whiteout"  # (a 0/0 device: since Linux 5.8 anyone may make one)
    assert dict(upper.entries["d"].xattrs).get("user.overlay.opaque") == b"y"
    assert not [n for e in upper.entries.values() for n, _ in e.xattrs if n.startswith("trusted.")]
    kernel = base / "kernel"
    kernel.mkdir()
    (base / "kwork").mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options.replace("/work", "/kwork") + ",userxattr", str(kernel)],
        check=True,
    )
    try:
        assert_same(seen, snapshot(kernel), what="the user's mount and kernel overlayfs on its upper")
    finally:
        subprocess.run(["umount", str(kernel)], check=True)


def test_plain_user_layerfs_mount_and_umount(plain_user, user_layers):
    """``layerfs mount`` by a plain user: allow_other, which /etc/fuse.conf does not allow it here, is
    dropped with a one-line note; passthrough's fallback is logged; the mount's record is in the user's
    runtime directory, the store in their data directory; ``layerfs umount`` unmounts."""
    base, mnt = user_layers, user_layers / "mnt"
    plain_user.run("mkdir", "-m", "0700", base / "run", base / "data")
    plain_user.env.update(XDG_RUNTIME_DIR=str(base / "run"), XDG_DATA_HOME=str(base / "data"))
    log = base / "work.log"
    options = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},allow_other,log={log}"
    allowed = any(line.strip() == "user_allow_other" for line in Path("/etc/fuse.conf").read_text().splitlines())
    mounted = plain_user.layerfs("mount", "-o", options, mnt)
    assert ("user_allow_other" in mounted.stderr) != allowed
    _changes_as(plain_user, mnt)
    assert plain_user.run("cat", mnt / "a/file1").stdout == "one\nmore\n"
    assert len(list((base / "run/layerfs").glob("*.json"))) == 1
    assert plain_user.layerfs("images").returncode == 0
    assert (base / "data/layerfs/layers").is_dir()
    plain_user.layerfs("umount", mnt)
    assert not is_mounted(mnt) and not daemon_pids(mnt)
    assert "passthrough refused by the kernel (Operation not permitted)" in log.read_text()
    assert (base / "upper/a/file1").read_bytes() == b"one\nmore\n"
