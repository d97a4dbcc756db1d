"""The containerd benchmark runs (one repetition, over a small busybox root), so that it cannot rot."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from busybox_images import busybox_tree

from benchmarks.containerdbench import SNAPSHOTTERS, WORKLOADS

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("containerd") is None, reason="needs tools/setup's containerd"),
]


def test_the_benchmark_measures_every_snapshotter(tmp_path):
    root = busybox_tree(tmp_path / "root", ["sh", "true", "find", "tar", "wc", "mkdir", "echo"], dirs=["usr/share/doc"])
    (root / "usr/share/doc/readme").write_text("a lower file\n")
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(root, arcname=".")
    command = [sys.executable, "-m", "benchmarks.containerdbench", "--reps", "1", "--pause", "0"]
    result = subprocess.run(
        [*command, "--rootfs", tmp_path / "rootfs.tar"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and " s (" in line]
    measured = [row[0].removeprefix("| ") for row in rows]
    assert measured == ["import (unpack)", "run --rm true (start)", *(f"run --rm: {w}" for w in WORKLOADS)]
    column = {name: 1 + SNAPSHOTTERS.index(name) for name in ("layerfs", "layerfs-helper", "overlayfs")}
    assert all(len(row) == len(SNAPSHOTTERS) + 2 for row in rows)
    assert all(row[column["layerfs"]].endswith(")") and row[column["overlayfs"]].endswith(")") for row in rows)
    assert all(row[column["layerfs-helper"]].endswith(")") for row in rows[:2])  # (unpack and start)
    assert result.stdout.count("goal ") == 2
