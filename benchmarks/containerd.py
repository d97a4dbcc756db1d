"""A containerd and a ``layerfs snapshotter`` of one's own (their config, roots, state and sockets under a
directory, never the machine's), for the containerd tests and the containerd benchmark; and a ``layerfs``
on PATH for mount.fuse3 (containerd's fuse3.layerfs mounts) that runs this checkout."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from layerfs.snapshotter.api import snapshots_pb2_grpc

from .util import mounted_points

REPO = Path(__file__).resolve().parent.parent


def layerfs_on_path(directory: Path) -> dict[str, str]:
    """An environment whose PATH finds a ``layerfs`` running this checkout with this interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "layerfs"
    program.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m layerfs "$@"\n')
    program.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def wait_for(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Snapshotterd:
    """``layerfs snapshotter`` (``mount_helper``: with --mount-helper); stopped, it leaves nothing mounted."""

    def __init__(self, base: Path, *, mount_helper: bool = False) -> None:
        self.address = base / "snapshotter.sock"
        self.root = base / "root"
        self.flags = ["--mount-helper"] if mount_helper else []
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "snapshotter", "--address", self.address, "--root", self.root]
            + self.flags,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.channel.close()
        self.process.send_signal(signal_number)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop it, and detach the unions it served (a snapshotter's own stop leaves them to containers)."""
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
        for mountpoint in self.mountpoints():
            subprocess.run(["umount", "-l", mountpoint], check=False)

    def mountpoints(self) -> list[str]:
        """The mounts under its root."""
        return [p for p in mounted_points() if p.startswith(f"{self.root}/")]


# containerd 1.6's shim reaps every child it has, and may take the exit status of the mount helper that
# mounts a fuse3.layerfs rootfs before the helper's caller does (containerd #4387, as for fuse-overlayfs's
# snapshotter). containerd mounts again up to ten times, then fails the run; under CPU load ten losses in
# a row happen. Kubernetes retries a failed start; the tests and the benchmark do the same, and count it.
_HELPER_RACE = "failed with ECHILD"
_ECHILD_RUNS = 3


class Containerd:
    """containerd with ``snapshotters`` as its proxy plugins (by name: ``layerfs``...); ``base`` must be short
    (its sockets are unix sockets, at most 108 bytes)."""

    def __init__(self, base: Path, snapshotters: dict[str, Snapshotterd], env: dict[str, str]) -> None:
        self.base = base
        # A namespace of its own (runc's state of containers is kept per namespace, for every containerd),
        # named as containerd allows: letters and digits, no "_" beside a "-" as mkdtemp's names may have.
        self.namespace = "lfs" + re.sub(r"[^A-Za-z0-9]", "", base.name)
        self.env = env
        self.helper_races = 0  # runs failed by containerd's mount helper race, and run again
        self.address = base / "containerd.sock"
        config = base / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
            + "".join(
                f'[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{snapshotter.address}"\n'
                for name, snapshotter in snapshotters.items()
            )
        )
        self.log = open(base / "containerd.log", "w")  # noqa: SIM115 (closed in stop)
        # (containerd's shims mount a rootfs with mount.fuse3, which finds layerfs on PATH; so does ctr, to
        # read the image's /etc/group)
        self.process = subprocess.Popen(["containerd", "--config", config], env=env, stdout=self.log, stderr=self.log)
        if not wait_for(lambda: self.ctr("version", check=False).returncode == 0):
            raise RuntimeError("containerd did not start: " + (base / "containerd.log").read_text()[-2000:])

    def ctr(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        command = ["ctr", "-a", self.address, "-n", self.namespace, *map(str, args)]
        for _ in range(_ECHILD_RUNS):
            result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300)
            if not (result.returncode and _HELPER_RACE in result.stderr and args[0] == "run" and "--rm" in args):
                break
            self.helper_races += 1  # (a run --rm leaves no container behind: run it again)
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(map(str, args))}: {result.stderr}")
        return result

    def end_task(self, name: str) -> bool:
        """Kill a container's task and delete it once it has ended; whether it did."""
        self.ctr("tasks", "kill", "-s", "KILL", name, check=False)
        return wait_for(lambda: self.ctr("tasks", "delete", name, check=False).returncode == 0)

    def stop(self) -> None:
        """Stop containerd, and first what a failed run left running (a shim outlives containerd)."""
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.end_task(task)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/containerd/runc/{self.namespace}")  # (the shims' runc root of the namespace)
