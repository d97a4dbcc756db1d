"""containerd's own snapshotter conformance suite (snapshots/testsuite, through its proxy client) against
``layerfs snapshotter``: tests/containerd/suite_test.go, built with Debian's Go in GOPATH mode from the
containerd sources tools/setup installs. Every sub-test must pass (the suite skips Rename itself)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.containerd import layerfs_on_path

GOPATH = "/usr/share/gocode"
SUITE = Path(GOPATH, "src/github.com/containerd/containerd/snapshots/testsuite")
DRIVER = Path(__file__).resolve().parent / "containerd"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("go") is None or not SUITE.is_dir(), reason="needs tools/setup's Go and suite"),
]


@pytest.mark.parametrize("flags", ["", "--mount-helper"])
def test_containerds_snapshotter_suite_passes(tmp_path, flags):
    env = {**layerfs_on_path(tmp_path / "bin"), "GOPATH": GOPATH, "GO111MODULE": "off"}
    env["LAYERFS"] = str(tmp_path / "bin" / "layerfs")
    env["LAYERFS_FLAGS"] = flags
    program = tmp_path / "suite.test"
    subprocess.run(["go", "test", "-c", "-o", program, "."], cwd=DRIVER, env=env, check=True, timeout=600)
    # (to files: a snapshotter the suite left running would hold pipes open, and hide the suite's own report)
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        code = subprocess.run(
            [program, "-test.v", "-test.timeout", "10m"], cwd=tmp_path, env=env, stdout=out, stderr=err, timeout=900
        ).returncode
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    panic = stderr.find("panic: ")  # (a timeout's panic names the sub-test it stopped, first)
    report = stdout[-4000:] + (stderr[panic : panic + 6000] if panic >= 0 else stderr[-4000:])
    results = {name: outcome for outcome, name in re.findall(r"--- (PASS|FAIL|SKIP): TestLayerfs/(\S+)", stdout)}
    failed = sorted(name for name, outcome in results.items() if outcome == "FAIL")
    assert not failed, f"failed: {failed}\n{report}"
    assert code == 0, report
    assert len(results) >= 20 and {n for n, o in results.items() if o == "SKIP"} <= {"Rename"}
