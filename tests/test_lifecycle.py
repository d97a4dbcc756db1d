"""A container's life as docker users expect it: ``run -d`` with its output in ``logs [-f]``, ``stop``
(the image's StopSignal, then SIGKILL), ``kill``, ``start``, ``wait``, ``rm -f``, ``--init``, and whatever
ends a container, its shim SIGKILLed included, nothing left mounted or running. The image is a busybox
made by umoci with a StopSignal, run by layerfs and by Podman (runc, this host's settings) alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from busybox_images import busybox_tree, one_layer_layout, umoci
from conftest import LAYERFS, is_mounted, layerfs, table_rows
from processes import daemon_pids, wait_for
from test_podman import Podman

from layerfs.fs import mounts

pytestmark = pytest.mark.root  # containers: namespaces, mounts
TOOLS = ("sh", "echo", "cat", "sleep", "ps", "tty", "stty", "true", "id", "hostname")
# Says which signal stopped it, and exits with a code of its own for each.
TRAPS = (
    "trap 'echo got USR1; exit 3' USR1; trap 'echo got TERM; exit 4' TERM; echo started; while :; do sleep 0.1; done"
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(layerfs's store, Podman's image id of the same image, the Podman): box:usr1 stops with SIGUSR1."""
    base = tmp_path_factory.mktemp("lifecycle")
    root = busybox_tree(base / "rootfs", TOOLS)
    layout, store = one_layer_layout(base, root, "plain"), base / "store"
    umoci("config", "--image", f"{layout}:plain", "--tag", "usr1", "--config.stopsignal", "SIGUSR1")
    layerfs("import", "--root", store, f"oci:{layout}:usr1", "box:usr1")
    podman = Podman(Path(tempfile.mkdtemp(prefix="lfspm-")), None)
    try:
        image = podman("pull", "-q", f"oci:{layout}:usr1").stdout.split()[-1]
        yield store, image, podman
    finally:
        podman.clean_up()
        shutil.rmtree(podman.base)


def _state(store: Path, name: str) -> dict:
    """The pids its record holds: its shim's, and its first process's (its PID 1's parent)."""
    record = json.loads((store / "containers" / name / "container.json").read_text())
    return {"shim": record["pid"], "pid": record["first_pid"]}


def _statuses(store: Path) -> list[tuple[str, str]]:
    """``ps -a``'s names and statuses (without their times: Up, Exited (N))."""
    rows = table_rows(layerfs("ps", "--root", store, "-a").stdout)
    return [
        (row["NAMES"], row["STATUS"].split(") ")[0] + ")" if "(" in row["STATUS"] else row["STATUS"].split()[0])
        for row in rows
    ]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_detached_logs_stop_start_wait_rm(images):
    store = images[0]
    started = layerfs("run", "--root", store, "-d", "--name", "d1", "box:usr1", "sh", "-c", TRAPS)
    assert started.stdout == "d1\n"
    merged = store / "containers/d1/merged"
    assert is_mounted(merged)
    follower = subprocess.Popen(LAYERFS + ["logs", "--root", str(store), "-f", "d1"], stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "started\n"
        assert _statuses(store) == [("d1", "Up")]
        assert layerfs("stop", "--root", store, "-t", "60", "d1").stdout == "d1\n"
        assert follower.wait(timeout=30) == 0
        assert follower.stdout.read() == "got USR1\n"  # the image's StopSignal, not SIGTERM
    finally:
        follower.kill()
        follower.wait()
    assert layerfs("wait", "--root", store, "d1").stdout == "3\n"
    assert _statuses(store) == [("d1", "Exited (3)")]
    assert not is_mounted(merged) and _gone(_state(store, "d1")["pid"])

    # start: the same container again (its log goes on), killed this time
    assert layerfs("start", "--root", store, "d1").stdout == "d1\n"
    assert wait_for(lambda: layerfs("logs", "--root", store, "d1").stdout.count("started") == 2)
    layerfs("kill", "--root", store, "-s", "TERM", "d1")
    assert layerfs("wait", "--root", store, "d1").stdout == "4\n"
    assert layerfs("logs", "--root", store, "d1").stdout == "started\ngot USR1\nstarted\ngot TERM\n"
    layerfs("rm", "--root", store, "d1")
    assert not (store / "containers/d1").exists()


def test_stop_is_podmans(images):
    """The same image stopped by Podman: the same signal, the same exit code and output."""
    store, image, podman = images
    layerfs("run", "--root", store, "-d", "--name", "p1", "box:usr1", "sh", "-c", TRAPS)
    podman("run", "-d", "--name", "p1", image, "sh", "-c", TRAPS)
    for logs in (lambda: layerfs("logs", "--root", store, "p1").stdout, lambda: podman("logs", "p1").stdout):
        assert wait_for(lambda logs=logs: logs() == "started\n")
    layerfs("stop", "--root", store, "p1")
    podman("stop", "p1")
    assert layerfs("wait", "--root", store, "p1").stdout == podman("wait", "p1").stdout == "3\n"
    assert layerfs("logs", "--root", store, "p1").stdout == podman("logs", "p1").stdout == "started\ngot USR1\n"
    layerfs("rm", "--root", store, "p1")
    podman("rm", "p1")


def test_a_pid_1_without_handlers_is_killed_after_the_timeout_and_init_passes_the_signal_on(images):
    store = images[0]
    layerfs("run", "--root", store, "-d", "--name", "bare", "box:usr1", "sleep", "100")
    layerfs("stop", "--root", store, "-t", "0.5", "bare")
    assert layerfs("wait", "--root", store, "bare").stdout == "137\n"  # sleep as PID 1 ignored SIGUSR1
    layerfs("run", "--root", store, "-d", "--init", "--name", "init", "box:usr1", "sleep", "100")
    layerfs("stop", "--root", store, "-t", "60", "init")
    assert layerfs("wait", "--root", store, "init").stdout == str(128 + signal.SIGUSR1) + "\n"
    layerfs("rm", "--root", store, "bare", "init")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _children_named(store: Path, name: str) -> list[str]:
    """The command lines of the children of the container's PID 1 (a zombie's is empty)."""
    (pid1,) = _children(_state(store, name)["pid"])
    return [
        Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() for child in _children(pid1)
    ]


def _zombies(store: Path, name: str) -> int:
    """How many of the children of the container's PID 1 are zombies."""
    (pid1,) = _children(_state(store, name)["pid"])
    return sum(_gone(child) for child in _children(pid1))


@pytest.mark.parametrize("init", [False, True])
def test_init_reaps_orphans(images, init):
    """An orphan is given to PID 1: a sleep as PID 1 leaves it a zombie, the init reaps it."""
    store = images[0]
    flags = ["--init"] if init else []
    script = "(sleep 0.1 &); exec sleep 100"
    layerfs("run", "--root", store, "-d", *flags, "--name", "orphans", "box:usr1", "sh", "-c", script)
    try:
        if init:  # (its one child: the sleep 100, once sh has exec'd it; the orphan was reaped)
            assert wait_for(lambda: _children_named(store, "orphans") == ["sleep 100"])
        else:
            assert wait_for(lambda: _zombies(store, "orphans") == 1)
    finally:
        layerfs("rm", "--root", store, "-f", "orphans")


def test_sigterm_to_a_foreground_run_reaches_the_command_under_init(images):
    store = images[0]
    shim = subprocess.Popen(
        LAYERFS + ["run", "--root", str(store), "--rm", "--init", "--name", "fg", "box:usr1", "sh", "-c", TRAPS],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shim.stdout.readline() == "started\n"
        shim.send_signal(signal.SIGTERM)
        assert shim.wait(timeout=30) == 4
        assert shim.stdout.read() == "got TERM\n"
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()
    assert not (store / "containers/fg").exists()


@pytest.mark.parametrize("rm, user", [(False, "0"), (True, "0"), (False, "1000")])
def test_a_killed_shim_leaves_nothing_with_no_command_run(images, rm, user):
    """The rootfs's daemon, once it has unmounted, runs the container's cleanup: no later layerfs command
    is needed. (As another user too: a change of user clears the signal a process gets when its parent dies.)"""
    store = images[0]
    flags = ["--rm"] if rm else []
    layerfs("run", "--root", store, "-d", *flags, "-u", user, "--name", "k", "box:usr1", "sleep", "100")
    state = _state(store, "k")
    (sleeper,) = _children(state["pid"])
    daemon = mounts.find(str(store / "containers/k/merged"))
    assert daemon is not None
    record = store / "containers/k/container.json"
    os.kill(state["shim"], signal.SIGKILL)
    if rm:
        assert wait_for(lambda: not (store / "containers/k").exists())
    else:
        assert wait_for(lambda: json.loads(record.read_text()).get("exit_code") == 137)
    assert wait_for(lambda: all(_gone(pid) for pid in (state["shim"], state["pid"], sleeper, daemon.pid)))
    assert wait_for(lambda: not daemon_pids(store))  # its log writer and its cleanup too
    assert not is_mounted(store / "containers/k/merged")
    assert _statuses(store) == ([] if rm else [("k", "Exited (137)")])
    if not rm:
        layerfs("rm", "--root", store, "k")


def test_rm_of_a_running_container_needs_force(images):
    store = images[0]
    layerfs("run", "--root", store, "-d", "--name", "r", "box:usr1", "sleep", "100")
    refused = layerfs("rm", "--root", store, "r", check=False)
    assert refused.returncode == 1
    assert refused.stderr == "layerfs: container 'r' is running (layerfs stop it first, or rm -f)\n"
    pid = _state(store, "r")["pid"]
    assert layerfs("rm", "--root", store, "-f", "r").stdout == "r\n"
    assert not (store / "containers/r").exists() and _gone(pid)


def test_run_rm_leaves_nothing_after_a_failure(images):
    store = images[0]
    failed = layerfs("run", "--root", store, "--rm", "--name", "f", "box:usr1", "/no/such/command", check=False)
    assert failed.returncode == 127 and "/no/such/command" in failed.stderr
    assert not (store / "containers/f").exists()
    detached = layerfs("run", "--root", store, "-d", "--rm", "--name", "fd", "box:usr1", "/no/such/command")
    assert detached.stdout == "fd\n"
    assert wait_for(lambda: not (store / "containers/fd").exists())


CONFINED = "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status"


def test_exec_joins_a_running_container_and_ends_with_it(images):
    store = images[0]
    flags = ("--hostname", "box", "-e", "FROM_RUN=1", "--cap-drop", "CHOWN")
    layerfs("run", "--root", store, "-d", *flags, "--name", "x1", "box:usr1", "sh", "-c", TRAPS)
    try:
        assert wait_for(lambda: layerfs("logs", "--root", store, "x1").stdout == "started\n")
        script = "echo $X $FROM_RUN $HOSTNAME $(hostname) $(id -u) $(pwd); tr '\\0' ' ' < /proc/1/cmdline; echo"
        inside = layerfs("exec", "--root", store, "-e", "X=1", "-u", "1000", "-w", "/tmp", "x1", "sh", "-c", script)
        assert inside.stdout == f"1 1 box box 1000 /tmp\nsh -c {TRAPS} \n"
        # confined as the container is (its capabilities, no_new_privs, seccomp)
        confined = layerfs("exec", "--root", store, "x1", "sh", "-c", CONFINED).stdout
        assert confined == layerfs("run", "--root", store, "--rm", *flags, "box:usr1", "sh", "-c", CONFINED).stdout
        assert "Seccomp:\t2" in confined and "NoNewPrivs:\t1" in confined
        # a process exec'd ends with the container
        sleeper = subprocess.Popen(LAYERFS + ["exec", "--root", str(store), "x1", "sleep", "100"])
        assert wait_for(lambda: "sleep 100" in layerfs("exec", "--root", store, "x1", "ps").stdout)
        layerfs("stop", "--root", store, "x1")
        assert sleeper.wait(timeout=30) == 128 + signal.SIGKILL
    finally:
        layerfs("rm", "--root", store, "-f", "x1")
    result = layerfs("run", "--root", store, "--name", "x2", "box:usr1", "true")
    result = layerfs("exec", "--root", store, "x2", "true", check=False)
    assert (result.returncode, result.stderr) == (1, "layerfs: container 'x2' is not running\n")
    layerfs("rm", "--root", store, "x2")
