"""``layerfs run --memory/--pids-limit/--cpus``: the limits in the cgroups the container runs in, the same
as Podman (runc, cgroupfs) writes for the same flags, and the cgroups gone when the container ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import LAYERFS, layerfs
from processes import wait_for
from test_run_volumes import box  # noqa: F401 (the fixture)

pytestmark = pytest.mark.root  # cgroups, containers

FLAGS = ("--memory", "64m", "--pids-limit", "50", "--cpus", "0.5")
FILES = {
    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "pids": ("pids.max",),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
}
SCRIPT = "grep -E ':(memory|pids|cpu):' /proc/self/cgroup; sleep 2"


def _limits_seen(command: list[str], env: dict | None = None) -> tuple[dict[str, str], list[str]]:
    """Run ``command`` (a container printing its cgroups, then sleeping) and read its limits from the host
    while it sleeps: {file: value}, and its cgroup directories; returns once it has ended."""
    container = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [container.stdout.readline() for _ in FILES]
        paths = {controller: path.strip() for _, controller, path in (line.split(":", 2) for line in lines)}
        dirs = [f"/sys/fs/cgroup/{controller}{paths[controller]}" for controller in FILES]
        seen = {}
        for controller, names in FILES.items():
            for name in names:
                with open(f"/sys/fs/cgroup/{controller}{paths[controller]}/{name}") as f:
                    seen[name] = f.read().strip()
    finally:
        assert container.wait(timeout=60) == 0, container.stderr.read()
    return seen, dirs


@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/memory/cgroup.procs"), reason="needs cgroup v1 controllers")
def test_limits_are_written_as_podman_writes_them_and_go_with_the_container(box):  # noqa: F811
    store, image, podman = box
    ours, dirs = _limits_seen(LAYERFS + ["run", "--root", str(store), "--rm", *FLAGS, "box:1", "/bin/sh", "-c", SCRIPT])
    theirs, _ = _limits_seen(["podman", "run", "--rm", *FLAGS, image, "/bin/sh", "-c", SCRIPT], env=podman.env)
    assert (
        ours
        == theirs
        == {
            "memory.limit_in_bytes": str(64 << 20),
            "memory.memsw.limit_in_bytes": str(128 << 20),  # as much swap as memory, docker's default
            "pids.max": "50",
            "cpu.cfs_quota_us": "50000",
            "cpu.cfs_period_us": "100000",
        }
    )
    assert all("/layerfs/" in d for d in dirs) and not any(os.path.exists(d) for d in dirs)


@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/pids/cgroup.procs"), reason="needs cgroup v1 controllers")
def test_a_container_ends_and_its_cgroup_goes_and_the_pids_limit_holds(box):  # noqa: F811
    store = box[0]
    # (The cgroup is read by the shell's builtins: the sleeps still hold the pids a grep would need.)
    script = (
        "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done 2>&1 | head -1; "
        "while read -r line; do case $line in *:pids:*) echo $line;; esac; done < /proc/self/cgroup"
    )
    result = layerfs("run", "--root", store, "--rm", "--pids-limit", "5", "box:1", "/bin/sh", "-c", script)
    fork_failed, cgroup = result.stdout.splitlines()
    assert "can't fork" in fork_failed or "Resource temporarily unavailable" in fork_failed, result.stdout
    assert not os.path.exists(f"/sys/fs/cgroup/pids{cgroup.split(':', 2)[2]}")


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--memory", "1k"), "layerfs: Minimum memory limit allowed is 6MB\n"),
        (("--memory", "lots"), "layerfs: invalid argument 'lots' for --memory: invalid size\n"),
        (("--cpus", "99"), f"layerfs: range of CPUs is from 0.01 to {os.cpu_count()}.00, as there are only"),
    ],
)
def test_a_bad_limit_is_one_line_and_nothing_is_made(box, flags, message):  # noqa: F811
    store = box[0]
    result = layerfs("run", "--root", store, "--name", "limited", *flags, "box:1", "/bin/true", check=False)
    assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (store / "containers" / "limited").exists()


@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/pids/cgroup.procs"), reason="needs cgroup v1 controllers")
def test_exec_joins_the_containers_cgroup_as_podman_exec_does(box):  # noqa: F811
    store, image, podman = box
    limits = ("--pids-limit", "10", "--memory", "64m")
    layerfs("run", "--root", store, "-d", "--name", "ex", *limits, "box:1", "sleep", "100")
    podman("run", "-d", "--name", "ex", *limits, image, "sleep", "100")
    ours = lambda *cmd: layerfs("exec", "--root", store, "ex", *cmd, check=False)  # noqa: E731
    theirs = lambda *cmd: podman("exec", "ex", *cmd, check=False)  # noqa: E731
    try:
        for run_in, where in ((ours, "/layerfs/ex"), (theirs, "/libpod-")):
            seen = [run_in("grep", "-E", ":(pids|memory):", f"/proc/{pid}/cgroup").stdout for pid in ("self", "1")]
            assert seen[0] == seen[1] and seen[0].count(where) == 2, seen
            # what it starts counts against the container's pids limit (with the container's own processes)
            forks = run_in("sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 2 & done 2>&1 | head -1").stdout
            assert "can't fork" in forks or "Resource temporarily unavailable" in forks, forks
    finally:
        layerfs("rm", "--root", store, "-f", "ex")
        podman("rm", "--force", "--time", "0", "ex")


@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/pids/cgroup.procs"), reason="needs cgroup v1 controllers")
def test_the_cgroup_of_a_killed_shim_goes_with_its_cleanup(box):  # noqa: F811
    store = box[0]
    layerfs("run", "--root", store, "-d", "--name", "kl", "--pids-limit", "10", "box:1", "sleep", "100")
    cgroup = "/sys/fs/cgroup/pids/layerfs/kl"
    assert os.path.isdir(cgroup)
    with open(store / "containers/kl/container.json") as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(cgroup))  # (with no layerfs command run)
    layerfs("rm", "--root", store, "kl")
