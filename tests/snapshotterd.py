"""A ``layerfs snapshotter`` of a test's own, on a socket and root under a temporary directory, and a
``layerfs`` on PATH for mount.fuse3 (containerd's fuse3.layerfs mounts) that runs this checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from layerfs.snapshotter.api import snapshots_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def layerfs_on_path(directory: Path) -> dict[str, str]:
    """An environment whose PATH finds a ``layerfs`` running this checkout with this interpreter."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "layerfs"
    program.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m layerfs "$@"\n')
    program.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


class Snapshotterd:
    def __init__(self, base: Path) -> None:
        self.address = base / "snapshotter.sock"
        self.root = base / "root"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "snapshotter", "--address", self.address, "--root", self.root],
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
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
