"""``layerfs snapshotter``: containerd's snapshots API over its socket, with containerd's semantics and
error codes, crash-safe records, and the mounts it hands out mounted for real: bind mounts of the unions it
serves, or (--mount-helper) mount.fuse3's form."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import force_unmount, layerfs

from benchmarks.containerd import Snapshotterd, layerfs_on_path, wait_for
from layerfs.core.index import read_index
from layerfs.core.union import INDEX_DIR
from layerfs.fs.mounts import find as mounts_record
from layerfs.fs.mounts import start_time
from layerfs.snapshotter.api import snapshots_pb2 as api

Code = grpc.StatusCode


@pytest.fixture
def snapshotter(tmp_path):
    server = Snapshotterd(tmp_path / "snapshotter")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def helper_snapshotter(tmp_path):
    server = Snapshotterd(tmp_path / "snapshotter", mount_helper=True)
    try:
        yield server
    finally:
        server.stop()


def code_of(call, request) -> Code | None:
    try:
        call(request)
    except grpc.RpcError as e:
        return e.code()
    return None


def prepare(stub, key, parent="", **labels):
    return list(stub.Prepare(api.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)


def commit(stub, name, key, **labels):
    stub.Commit(api.CommitSnapshotRequest(name=name, key=key, labels=labels))


def names(stub, *filters) -> list[str]:
    return sorted(info.name for reply in stub.List(api.ListSnapshotsRequest(filters=filters)) for info in reply.info)


def test_the_api_is_containerds_and_needs_no_gogoproto():
    program = (
        "import sys; from layerfs.snapshotter.api import snapshots_pb2 as p, snapshots_pb2_grpc; "
        "print(p.DESCRIPTOR.services_by_name['Snapshots'].full_name, any('gogo' in m for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["containerd.services.snapshots.v1.Snapshots", "False"]


def test_snapshots_keys_parents_and_kinds(snapshotter):
    stub = snapshotter.stub
    [base] = prepare(stub, "base")
    assert (base.type, list(base.options)) == ("bind", ["rw", "rbind"])
    commit(stub, "layer1", "base")
    [child] = prepare(stub, "child", "layer1")
    assert (child.type, list(child.options)) == ("bind", ["rw", "rbind"])
    assert os.path.ismount(child.source) and child.source.startswith(f"{snapshotter.root}/snapshots/")
    [view] = stub.View(api.ViewSnapshotRequest(key="view", parent="layer1")).mounts
    assert (view.type, view.source, list(view.options)) == ("bind", base.source, ["ro", "rbind"])
    info = stub.Stat(api.StatSnapshotRequest(key="child")).info
    assert (info.name, info.parent, info.kind) == ("child", "layer1", api.ACTIVE)
    assert stub.Stat(api.StatSnapshotRequest(key="layer1")).info.kind == api.COMMITTED
    assert code_of(stub.Stat, api.StatSnapshotRequest(key="base")) == Code.NOT_FOUND  # (committed under a name)
    assert names(stub) == ["child", "layer1", "view"]
    assert stub.Mounts(api.MountsRequest(key="child")).mounts[0] == child
    # containerd's unpacks (keyed as its metadata store names them): kernel overlayfs's form, written straight into
    [unpack] = prepare(stub, "default/4/extract-1 sha256:0", "layer1")
    assert unpack.type == "overlay" and f"lowerdir={base.source}" in unpack.options
    stub.Remove(api.RemoveSnapshotRequest(key="default/4/extract-1 sha256:0"))

    # containerd's errors, each as the code its errdefs expects, and nothing changed by any of them
    assert code_of(stub.Prepare, api.PrepareSnapshotRequest(key="x", parent="nothing")) == Code.NOT_FOUND
    assert code_of(stub.Prepare, api.PrepareSnapshotRequest(key="x", parent="child")) == Code.INVALID_ARGUMENT
    assert code_of(stub.Prepare, api.PrepareSnapshotRequest(key="child", parent="layer1")) == Code.ALREADY_EXISTS
    assert code_of(stub.View, api.ViewSnapshotRequest(key="layer1")) == Code.ALREADY_EXISTS
    assert code_of(stub.Commit, api.CommitSnapshotRequest(name="n", key="view")) == Code.FAILED_PRECONDITION
    assert code_of(stub.Commit, api.CommitSnapshotRequest(name="layer1", key="child")) == Code.ALREADY_EXISTS
    assert code_of(stub.Commit, api.CommitSnapshotRequest(name="n", key="nothing")) == Code.NOT_FOUND
    assert code_of(stub.Remove, api.RemoveSnapshotRequest(key="layer1")) == Code.FAILED_PRECONDITION
    assert code_of(stub.Remove, api.RemoveSnapshotRequest(key="nothing")) == Code.NOT_FOUND
    too_big = api.PrepareSnapshotRequest(key="x", labels={"k": "v" * 4096})
    assert code_of(stub.Prepare, too_big) == Code.INVALID_ARGUMENT
    assert names(stub) == ["child", "layer1", "view"]

    for key in ("child", "view", "layer1"):
        stub.Remove(api.RemoveSnapshotRequest(key=key))
    assert names(stub) == []
    assert os.listdir(snapshotter.root / "snapshots") == []
    assert snapshotter.mountpoints() == []


def test_mount_helper_hands_out_containerds_fuse3_form(helper_snapshotter):
    stub = helper_snapshotter.stub
    [base] = prepare(stub, "base")
    commit(stub, "layer1", "base")
    [child] = prepare(stub, "child", "layer1")
    assert child.type == "fuse3.layerfs" and child.source == "layerfs"
    assert f"lowerdir={base.source}" in child.options[0]
    assert stub.Mounts(api.MountsRequest(key="child")).mounts[0] == child
    assert helper_snapshotter.mountpoints() == []


def test_update_changes_labels_only(snapshotter):
    stub = snapshotter.stub
    prepare(stub, "a", l1="v1", l2="v2")
    created = stub.Stat(api.StatSnapshotRequest(key="a")).info
    assert created.created_at == created.updated_at

    def update(labels, *paths):
        request = api.UpdateSnapshotRequest(info=api.Info(name="a", parent="other", labels=labels))
        request.update_mask.paths.extend(paths)
        return stub.Update(request).info

    info = update({"l1": "new", "l3": "v3"}, "labels.l1", "labels.l2")
    assert dict(info.labels) == {"l1": "new"}  # (l2 not given: removed; l3 not named: left out)
    assert info.parent == "" and info.created_at == created.created_at and info.updated_at != created.updated_at
    assert dict(update({"l4": "v4"}).labels) == {"l4": "v4"}
    request = api.UpdateSnapshotRequest(info=api.Info(name="a"))
    request.update_mask.paths.append("parent")
    assert code_of(stub.Update, request) == Code.INVALID_ARGUMENT
    assert code_of(stub.Update, api.UpdateSnapshotRequest(info=api.Info(name="b"))) == Code.NOT_FOUND


def test_list_takes_containerds_filters(snapshotter):
    stub = snapshotter.stub
    prepare(stub, "p-tmp")
    commit(stub, "p", "p-tmp", **{"containerd.io/gc.root": "x"})
    prepare(stub, "a", "p", l="2")
    stub.View(api.ViewSnapshotRequest(key="v", parent="p", labels={"l": "3"}))
    assert names(stub, "kind==active") == ["a"]
    assert names(stub, 'labels."containerd.io/gc.root"==x') == ["p"]
    assert names(stub, "parent==p,labels.l==3") == ["v"]
    assert names(stub, "name==p", "name==v") == ["p", "v"]
    assert names(stub, 'parent!=""') == ["a", "v"]
    assert names(stub, "labels.l") == ["a", "v"]
    assert names(stub, "name~=^[av]$") == ["a", "v"]
    assert code_of(lambda r: list(stub.List(r)), api.ListSnapshotsRequest(filters=["name=="])) == Code.INVALID_ARGUMENT


def test_a_root_or_socket_in_use_is_refused(snapshotter, tmp_path):
    for address, root, line in (
        (tmp_path / "other.sock", snapshotter.root, f"{snapshotter.root}: another snapshotter serves this root"),
        (snapshotter.address, tmp_path / "other", f"{snapshotter.address}: a server answers there already"),
    ):
        second = layerfs("snapshotter", "--address", address, "--root", root, check=False)
        assert (second.returncode, second.stderr) == (1, f"layerfs: {line}\n")
    assert names(snapshotter.stub) == []  # (the first still serves)


def test_stopped_the_moment_it_answers_it_ends_cleanly(tmp_path):
    """SIGTERM as soon as its socket is there (a conformance sub-test that is skipped at once does that): it
    ends as asked, with 0, not killed by the signal."""
    for attempt in range(5):
        address = tmp_path / f"{attempt}.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "snapshotter", "--address", address, "--root", tmp_path / str(attempt)]
        )
        deadline = time.monotonic() + 30
        while not address.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, attempt


def test_kill_9_at_any_moment_leaves_no_half_made_snapshot(snapshotter):
    stub = snapshotter.stub
    prepare(stub, "base")
    commit(stub, "layer", "base")
    stopped = threading.Event()

    def churn():
        n = 0
        while not stopped.is_set():
            try:
                prepare(stub, f"a{n}", "layer")
                commit(stub, f"c{n}", f"a{n}")
                stub.Remove(api.RemoveSnapshotRequest(key=f"c{n}"))
            except (grpc.RpcError, ValueError):  # (the server killed; ValueError: its channel closed by the kill)
                return
            n += 1

    worker = threading.Thread(target=churn)
    worker.start()
    time.sleep(1.5)
    snapshotter.kill()
    stopped.set()
    worker.join()
    snapshotter.start()
    stub = snapshotter.stub
    infos = [info for reply in stub.List(api.ListSnapshotsRequest()) for info in reply.info]
    assert "layer" in {info.name for info in infos}
    dirs = set(os.listdir(snapshotter.root / "snapshots"))
    mounts = [prepare(stub, "after", "layer")] + [
        list(stub.Mounts(api.MountsRequest(key=info.name)).mounts) for info in infos if info.kind == api.ACTIVE
    ]
    for [mount] in mounts:
        assert os.path.isdir(upper_of(mount)) and os.path.ismount(mount.source)
    # every directory left is a snapshot's (the new one's too): the half-made were removed at the start
    assert len(set(os.listdir(snapshotter.root / "snapshots"))) == len(infos) + 1
    assert len(dirs) == len(infos)


def disk_usage(directory) -> tuple[int, int]:
    """Bytes and inodes, as du counts them (every inode once, by its blocks), as containerd does."""

    def du(*flags) -> int:
        return int(
            subprocess.run(["du", "-s", *flags, directory], capture_output=True, text=True, check=True).stdout.split()[
                0
            ]
        )

    return du("-B1"), du("--inodes")


def upper_of(mount) -> str:
    """The snapshot directory's layer of a union the snapshotter serves (a bind of ROOT/snapshots/ID/mnt),
    or of a fuse3 mount's options."""
    if mount.type == "bind":
        return os.path.join(os.path.dirname(mount.source), "fs")
    return next(o for o in mount.options[0].split(",") if o.startswith("upperdir=")).removeprefix("upperdir=")


def test_commit_builds_the_change_index_of_a_layer_unpacked_into_it(snapshotter, tmp_path):
    """containerd's applier writes a layer straight into a snapshot's directory; Commit indexes it once, so
    that Usage and a diff of the layer read the index, never the whole tree again."""
    stub = snapshotter.stub
    [base] = prepare(stub, "default/1/extract-1 sha256:a")
    below = base.source
    for directory in ("etc", "usr/bin", "var/lib"):
        os.makedirs(os.path.join(below, directory))
    for n in range(20):
        with open(os.path.join(below, "usr/bin", f"tool{n}"), "wb") as f:
            f.write(b"x" * 1000 * n)
    os.link(os.path.join(below, "usr/bin/tool7"), os.path.join(below, "usr/bin/alias"))
    os.symlink("tool1", os.path.join(below, "usr/bin/link"))
    (tmp_path / "motd").write_text("hello\n")
    os.rename(tmp_path / "motd", os.path.join(below, "etc/motd"))
    time.sleep(0.05)
    commit(stub, "layer1", "default/1/extract-1 sha256:a")

    [unpack] = prepare(stub, "default/2/extract-2 sha256:b", "layer1")
    upper = next(o for o in unpack.options if o.startswith("upperdir=")).removeprefix("upperdir=")
    os.mknod(os.path.join(upper, "etc"), 0o600 | 0o020000, 0)  # overlay's whiteout: etc deleted
    os.makedirs(os.path.join(upper, "usr/bin"))
    with open(os.path.join(upper, "usr/bin/tool3"), "wb") as f:
        f.write(b"y" * 5000)
    time.sleep(0.05)  # (file times tick coarsely: a ctime in the tick the index is saved in counts as moved)
    commit(stub, "layer2", "default/2/extract-2 sha256:b")

    for name, fs in (("layer1", below), ("layer2", upper)):
        used = stub.Usage(api.UsageRequest(key=name))
        assert (used.size, used.inodes) == disk_usage(fs)
        work = os.path.join(os.path.dirname(fs), "work")
        with read_index(fs, os.path.join(work, INDEX_DIR)) as index:
            assert not index.rebuilt and not index.rescanned
    diff = ["diff", "--upperdir", upper, "--lowerdir", below]
    walked = layerfs(*diff).stdout
    assert layerfs(*diff, "--workdir", os.path.join(os.path.dirname(upper), "work")).stdout == walked
    assert walked.splitlines() == ["D /etc", "C /usr", "C /usr/bin", "C /usr/bin/tool3"]


def mount_as_containerd(mount, target, env) -> None:
    """As containerd's mount package mounts a fuse3 type."""
    command = ["mount.fuse3", mount.source, str(target), "-o", ",".join(mount.options), "-t", "layerfs"]
    subprocess.run(command, env=env, check=True)


def test_mounts_mount_as_containerd_mounts_them(helper_snapshotter, tmp_path, mounts):
    stub = helper_snapshotter.stub
    env = layerfs_on_path(tmp_path / "bin")
    [base] = prepare(stub, "base")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "f").write_text("lower\n")
    (tmp_path / "base" / "gone").write_text("x\n")
    subprocess.run(["cp", "-a", f"{tmp_path / 'base'}/.", base.source], check=True)
    commit(stub, "layer1", "base")
    [union] = prepare(stub, "child", "layer1")
    target = tmp_path / "target"
    target.mkdir()
    mounts.points.append(target)
    mount_as_containerd(union, target, env)
    assert (target / "f").read_text() == "lower\n"
    (target / "new").write_text("upper\n")
    (target / "gone").unlink()
    layerfs("umount", target)
    commit(stub, "layer2", "child")
    used = stub.Usage(api.UsageRequest(key="layer2"))
    assert (used.size, used.inodes) == disk_usage(upper_of(union))  # (the mount's index)

    [view] = stub.View(api.ViewSnapshotRequest(key="view", parent="layer2")).mounts
    assert view.type == "fuse3.layerfs" and "upperdir" not in view.options[0]
    mount_as_containerd(view, target, env)
    try:
        assert sorted(os.listdir(target)) == ["f", "new"]
        try:
            (target / "other").write_text("x")
            written = None
        except OSError as e:
            written = e.errno
        assert written == errno.EROFS
    finally:
        force_unmount(target)


def daemon_of(mountpoint: str) -> int:
    return mounts_record(mountpoint).pid


def test_unions_are_served_by_daemons_of_their_own_that_outlive_the_snapshotter(snapshotter, tmp_path, mounts):
    """The snapshotter mounts a union itself and hands out a bind of it (a mount containerd makes with no
    helper): its writes land in the snapshot's layer; a kill -9 of the snapshotter leaves it served; a
    killed daemon's union is served again when containerd asks for its mounts; Commit ends its daemon; a
    view of several layers is read-only; Remove leaves nothing mounted."""
    stub = snapshotter.stub
    [base] = prepare(stub, "base")
    (Path(base.source) / "f").write_text("lower\n")
    (Path(base.source) / "gone").write_text("x\n")
    commit(stub, "layer1", "base")
    [union] = prepare(stub, "child", "layer1")
    target = tmp_path / "rootfs"
    target.mkdir()
    mounts.points.append(target)
    subprocess.run(["mount", "--rbind", union.source, target], check=True)  # (as containerd mounts a bind)
    assert (target / "f").read_text() == "lower\n"
    (target / "new").write_text("upper\n")
    (target / "gone").unlink()
    assert (Path(upper_of(union)) / "new").read_text() == "upper\n"

    first = daemon_of(union.source)
    snapshotter.kill()
    assert (target / "new").read_text() == "upper\n"  # (the container's root lives on)
    snapshotter.start()
    stub = snapshotter.stub
    assert stub.Mounts(api.MountsRequest(key="child")).mounts[0] == union
    assert daemon_of(union.source) == first

    force_unmount(target)
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: mounts_record(union.source) is None)
    assert stub.Mounts(api.MountsRequest(key="child")).mounts[0] == union  # (served again by a new daemon)
    assert sorted(os.listdir(union.source)) == ["f", "new"]

    commit(stub, "layer2", "child")
    assert not os.path.ismount(union.source) and mounts_record(union.source) is None
    used = stub.Usage(api.UsageRequest(key="layer2"))
    assert (used.size, used.inodes) == disk_usage(upper_of(union))

    [view] = stub.View(api.ViewSnapshotRequest(key="view", parent="layer2")).mounts
    assert (view.type, list(view.options)) == ("bind", ["ro", "rbind"])
    assert sorted(os.listdir(view.source)) == ["f", "new"]
    with pytest.raises(OSError) as written:
        (Path(view.source) / "other").write_text("x")
    assert written.value.errno == errno.EROFS
    for key in ("view", "layer2", "layer1"):
        stub.Remove(api.RemoveSnapshotRequest(key=key))
    assert snapshotter.mountpoints() == [] and os.listdir(snapshotter.root / "snapshots") == []


def test_a_killed_mounter_is_replaced(snapshotter):
    """The process that starts the daemons, killed, fails the request it was in, and the next one starts
    another."""
    stub = snapshotter.stub
    prepare(stub, "base")
    commit(stub, "layer", "base")
    pgrep = subprocess.run(["pgrep", "-P", str(snapshotter.process.pid)], capture_output=True, text=True)
    [mounter] = map(int, pgrep.stdout.split())
    os.kill(mounter, signal.SIGKILL)
    assert wait_for(lambda: start_time(mounter) is None)  # (dead: a zombie until the snapshotter looks)
    [union] = prepare(stub, "a", "layer")
    assert os.path.ismount(union.source)


def test_a_lower_directory_renamed_in_a_snapshot_stays_renamed_in_its_children(snapshotter, tmp_path, mounts):
    """containerd's suite skips Rename: a directory of a parent layer renamed through a served union is a
    redirect in the committed layer, which a child snapshot, and kernel overlayfs over the same layers, show
    as renamed (its files with it), not as a copy or as both names."""
    stub = snapshotter.stub
    [base] = prepare(stub, "base")
    os.makedirs(Path(base.source) / "d" / "sub")
    for name in ("a", "sub/b"):
        (Path(base.source) / "d" / name).write_text(name + "\n")
    commit(stub, "layer1", "base")
    [union] = prepare(stub, "renaming", "layer1")
    os.rename(Path(union.source) / "d", Path(union.source) / "e")
    commit(stub, "layer2", "renaming")
    [child] = prepare(stub, "child", "layer2")

    def tree(top: Path) -> list[str]:
        return sorted(str(p.relative_to(top)) + ("" if p.is_dir() else "=" + p.read_text()) for p in top.rglob("*"))

    kernel = tmp_path / "kernel"
    kernel.mkdir()
    mounts.points.append(kernel)
    lowers = f"{upper_of(union)}:{base.source}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers},redirect_dir=on", kernel], check=True
    )
    assert tree(Path(child.source)) == tree(kernel) == ["e", "e/a=a\n", "e/sub", "e/sub/b=sub/b\n"]
    assert not (Path(upper_of(union)) / "e" / "a").exists()  # (a redirect, not a copy)
