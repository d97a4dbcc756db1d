"""containerd with layerfs as its proxy snapshotter: a containerd of the test's own (its config, root,
state and sockets under a temporary directory, never the machine's), an image imported with
``ctr images import --snapshotter layerfs`` and containers run with ``ctr run --snapshotter layerfs``,
side by side with containerd's overlayfs snapshotter; the snapshotter killed -9 and restarted between runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import _mounted_points, force_unmount
from processes import wait_for
from test_images import make_layout

from benchmarks.containerd import Containerd, Snapshotterd, layerfs_on_path

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("containerd") is None, reason="needs tools/setup's containerd"),
]
IMAGE = "docker.io/library/demo:v2"
# what a container sees of the image (a second layer over busybox's) and of what it writes
LOOK = "cat /etc/app/conf; ls /var/cache/app /etc; echo written > /tmp/x; cat /tmp/x; ls /tmp"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("image")
    layout, archive = make_layout(base), base / "image.tar"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:v2", f"docker-archive:{archive}:demo:v2"], check=True)
    return archive


@pytest.fixture(params=["served"])
def containerd(tmp_path, request):
    # (short paths: containerd's sockets are unix sockets, at most 108 bytes)
    base = Path(tempfile.mkdtemp(prefix="lfsctr-"))
    env = layerfs_on_path(tmp_path / "bin")
    snapshotter = Snapshotterd(base / "layerfs", mount_helper=request.param == "mount-helper")
    daemon = Containerd(base, {"layerfs": snapshotter}, env)
    try:
        yield daemon, snapshotter
    finally:
        daemon.stop()
        snapshotter.stop()
        for point in sorted((p for p in _mounted_points() if p.startswith(f"{base}/")), reverse=True):
            force_unmount(point)
        shutil.rmtree(base)


@pytest.mark.parametrize("containerd", ["served", "mount-helper"], indirect=True)
def test_containers_run_on_layerfs_as_on_overlayfs(containerd, archive):
    daemon, snapshotter = containerd
    seen = {}
    for name in ("overlayfs", "layerfs"):
        daemon.ctr("images", "import", "--snapshotter", name, archive)
        # the layers were unpacked straight into their directories, never through a layerfs mount (whose
        # daemon would have saved the index at its start): Commit indexed each, once
        indexes = list(snapshotter.root.glob("snapshots/*/work/layerfs-index"))
        assert len(indexes) == (2 if name == "layerfs" else 0)
        assert all(sorted(os.listdir(index)) == ["journal-1", "records"] for index in indexes)
        seen[name] = daemon.ctr("run", "--snapshotter", name, "--rm", IMAGE, "c1", "sh", "-c", LOOK).stdout
    assert seen["layerfs"] == seen["overlayfs"]
    assert seen["layerfs"].startswith("color=red\n") and "written\n" in seen["layerfs"]
    if not snapshotter.flags:
        assert daemon.helper_races == 0  # (containerd mounted binds: no mount helper to lose)
    # the image's two layers, committed; the container's snapshot went with --rm
    listed = daemon.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout.splitlines()[1:]
    assert len(listed) == 2 and all(line.split()[-1] == "Committed" for line in listed)
    # containerd's garbage collector removes what no image uses, through List and Remove
    daemon.ctr("images", "rm", "--sync", IMAGE)
    assert daemon.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout.splitlines()[1:] == []
    assert os.listdir(snapshotter.root / "snapshots") == []


def test_a_snapshotter_killed_9_comes_back_with_its_snapshots(containerd, archive):
    daemon, snapshotter = containerd
    daemon.ctr("images", "import", "--snapshotter", "layerfs", archive)
    first = daemon.ctr("run", "--snapshotter", "layerfs", "--rm", IMAGE, "c1", "sh", "-c", LOOK).stdout
    daemon.ctr("run", "-d", "--snapshotter", "layerfs", IMAGE, "running", "busybox", "sleep", "600")
    snapshotter.kill()
    # a running container keeps its root filesystem: its union's daemon is not the snapshotter's process
    assert daemon.ctr("tasks", "exec", "--exec-id", "e1", "running", "sh", "-c", LOOK).stdout == first
    snapshotter.start()
    # containerd's connection to the snapshotter reconnects after its gRPC backoff (a second or so)
    assert wait_for(lambda: daemon.ctr("snapshots", "--snapshotter", "layerfs", "ls", check=False).returncode == 0)
    again = daemon.ctr("run", "--snapshotter", "layerfs", "--rm", IMAGE, "c2", "sh", "-c", LOOK).stdout
    assert again == first
    # the running container's writes were kept in its active snapshot
    written = daemon.ctr("tasks", "exec", "--exec-id", "e2", "running", "busybox", "cat", "/tmp/x").stdout
    assert written == "written\n"
    assert daemon.end_task("running")
    daemon.ctr("containers", "delete", "running")  # (and its snapshot)
    listed = daemon.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout.splitlines()[1:]
    assert [line.split()[-1] for line in listed] == ["Committed", "Committed"]
