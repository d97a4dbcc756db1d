"""containerd with layerfs as its proxy snapshotter: a containerd of the test's own (its config, root,
state and sockets under a temporary directory, never the machine's), an image imported with
``ctr images import --snapshotter layerfs`` and containers run with ``ctr run --snapshotter layerfs``,
side by side with containerd's overlayfs snapshotter; the snapshotter killed -9 and restarted between runs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import _mounted_points, force_unmount
from processes import wait_for
from snapshotterd import Snapshotterd, layerfs_on_path
from test_images import make_layout

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("containerd") is None, reason="needs tools/setup's containerd"),
]
IMAGE = "docker.io/library/demo:v2"
# what a container sees of the image (a second layer over busybox's) and of what it writes
LOOK = "cat /etc/app/conf; ls /var/cache/app /etc; echo written > /tmp/x; cat /tmp/x; ls /tmp"


class Containerd:
    def __init__(self, base: Path, snapshotter: Snapshotterd, env: dict[str, str]) -> None:
        self.base = base
        # A namespace of its own (runc's state of containers is kept per namespace, for every containerd),
        # named as containerd allows: letters and digits, no "_" beside a "-" as mkdtemp's names may have.
        self.namespace = "lfs" + re.sub(r"[^A-Za-z0-9]", "", base.name)
        self.env = env
        self.address = base / "containerd.sock"
        config = base / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
            f'[proxy_plugins.layerfs]\n  type = "snapshot"\n  address = "{snapshotter.address}"\n'
        )
        self.log = open(base / "containerd.log", "w")  # noqa: SIM115 (closed in stop)
        # (containerd's shims mount a rootfs with mount.fuse3, which finds layerfs on PATH; so does ctr, to
        # read the image's /etc/group)
        self.process = subprocess.Popen(["containerd", "--config", config], env=env, stdout=self.log, stderr=self.log)
        answers = wait_for(lambda: self.ctr("version", check=False).returncode == 0, timeout=30)
        assert answers, (base / "containerd.log").read_text()[-2000:]

    def ctr(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        command = ["ctr", "-a", self.address, "-n", self.namespace, *map(str, args)]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        assert not check or result.returncode == 0, f"ctr {' '.join(map(str, args))}: {result.stderr}"
        return result

    def end_task(self, name: str) -> bool:
        """Kill a container's task and delete it once it has ended; whether it did."""
        self.ctr("tasks", "kill", "-s", "KILL", name, check=False)
        return wait_for(lambda: self.ctr("tasks", "delete", name, check=False).returncode == 0, timeout=30)

    def stop(self) -> None:
        """Stop containerd, and first what a failed test left running (a shim outlives containerd)."""
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.end_task(task)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/containerd/runc/{self.namespace}")  # (the shims' runc root of the namespace)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("image")
    layout, archive = make_layout(base), base / "image.tar"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:v2", f"docker-archive:{archive}:demo:v2"], check=True)
    return archive


@pytest.fixture
def containerd(tmp_path):
    # (short paths: containerd's sockets are unix sockets, at most 108 bytes)
    base = Path(tempfile.mkdtemp(prefix="lfsctr-"))
    env = layerfs_on_path(tmp_path / "bin")
    snapshotter = Snapshotterd(base / "layerfs")
    daemon = Containerd(base, snapshotter, env)
    try:
        yield daemon, snapshotter
    finally:
        daemon.stop()
        snapshotter.stop()
        for point in sorted((p for p in _mounted_points() if p.startswith(f"{base}/")), reverse=True):
            force_unmount(point)
        shutil.rmtree(base)


def test_containers_run_on_layerfs_as_on_overlayfs(containerd, archive):
    daemon, snapshotter = containerd
    seen = {}
    for name in ("overlayfs", "layerfs"):
        daemon.ctr("images", "import", "--snapshotter", name, archive)
        # the layers were unpacked straight into their directories, never through a layerfs mount (no index)
        assert not list(snapshotter.root.glob("snapshots/*/work/layerfs-index"))
        seen[name] = daemon.ctr("run", "--snapshotter", name, "--rm", IMAGE, "c1", "sh", "-c", LOOK).stdout
    assert seen["layerfs"] == seen["overlayfs"]
    assert seen["layerfs"].startswith("color=red\n") and "written\n" in seen["layerfs"]
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
    # a running container keeps its root filesystem: its mount is the shim's, not the snapshotter's
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
