"""``layerfs run`` with a busybox rootfs: PID 1 in its own namespaces over a layerfs mount, pivot_root,
/proc, /dev, the exit code, the container's changes seen by ``layerfs diff``, and nothing left mounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX
from conftest import LAYERFS, layerfs, table_rows
from processes import wait_for

pytestmark = pytest.mark.root  # containers: namespaces, mounts, pivot_root


def _run_mounts(tmp: Path) -> list[str]:
    """The layerfs mounts ``layerfs run`` made in ``tmp`` (its ``layerfs-run-*`` temporary directories)."""
    where = os.path.join(tmp, "layerfs-run-")
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    return sorted(fields[1] for fields in mounts if fields[2] == "fuse.layerfs" and fields[1].startswith(where))


@pytest.fixture
def new_mounts(tmp_path, monkeypatch):
    """``new_mounts()``: the mounts of the test's ``layerfs run`` commands, made in a temporary directory
    of the test's own (others on the machine, another test session's included, are not the test's to judge)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # for the layerfs commands the test starts
    return lambda: _run_mounts(tmp)


@pytest.fixture
def rootfs(tmp_path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "tmp", "root"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for tool in ("sh", "ls", "cat", "echo", "hostname", "rm", "sleep", "env", "id"):
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return root


@pytest.fixture
def store(rootfs, tmp_path) -> Path:
    """A store holding the rootfs as image box:1."""
    root = tmp_path / "store"
    tar_file = tmp_path / "rootfs.tar"
    with tarfile.open(tar_file, "w") as tar:
        tar.add(rootfs, arcname=".")
    layerfs("import", "--root", root, f"rootfs:{tar_file}", "box:1")
    return root


@contextlib.contextmanager
def _running(*run_args: str | os.PathLike, stdin: bool = False):
    """``layerfs run RUN_ARGS`` in the background, once its command has printed "ready"; killed on the
    way out if it still runs."""
    shim = subprocess.Popen(
        LAYERFS + ["run", *map(str, run_args)],
        stdout=subprocess.PIPE,
        text=True,
        stdin=subprocess.PIPE if stdin else None,
    )
    try:
        assert shim.stdout.readline() == "ready\n"
        yield shim
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


def test_a_command_runs_as_pid_1_in_its_own_root(rootfs, tmp_path, new_mounts):
    (tmp_path / "host-only").write_text("secret")
    script = (
        'echo "pid=$$ host=$(hostname) color=$COLOR pwd=$(pwd)"; ls /; ls /..; cat /proc/1/cmdline | '
        'tr "\\0" " "; echo; ls /dev; cat /host-only 2>&1; exit 7'
    )
    result = layerfs(
        "run",
        "--hostname",
        "box",
        "-e",
        "COLOR=red",
        "-w",
        "/etc",
        "--lower",
        rootfs,
        "--",
        "/bin/sh",
        "-c",
        script,
        check=False,
    )
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "pid=1 host=box color=red pwd=/etc"
    listing = sorted(["bin", "dev", "etc", "proc", "root", "sys", "tmp"])
    assert lines[1:8] == listing and lines[8:15] == listing  # "/.." is "/": the host is out of reach
    assert lines[15].startswith("/bin/sh -c ")
    assert {"null", "zero", "random", "urandom", "tty", "ptmx", "pts", "shm"} <= set(lines[16:-1])
    assert "No such file" in lines[-1]
    assert new_mounts() == []


def test_changes_made_inside_show_in_diff_and_rm_leaves_nothing(store, new_mounts):
    layerfs("run", "--root", store, "--name", "c1", "box:1", "/bin/sh", "-c", "echo made > /root/new; rm /etc/motd")
    assert layerfs("diff", "--root", store, "c1").stdout.splitlines() == [
        "C /etc",
        "D /etc/motd",
        "C /root",
        "A /root/new",
    ]
    with _running(
        "--root",
        store,
        "--name",
        "c2",
        "--rm",
        "-i",
        "box:1",
        "/bin/sh",
        "-c",
        "echo x > /root/y; echo ready; read line",
        stdin=True,
    ) as shim:
        image = "docker.io/library/box:1"  # (the image's full name, as docker reads "box:1")
        running = table_rows(layerfs("ps", "--root", store).stdout)
        assert [(r["NAMES"], r["IMAGE"], r["STATUS"][:3]) for r in running] == [("c2", image, "Up ")]
        assert running[0]["COMMAND"] == '"/bin/sh -c \'echo x …"' and running[0]["CREATED"].endswith(" ago")
        everything = table_rows(layerfs("ps", "--root", store, "-a").stdout)
        assert [(r["NAMES"], r["STATUS"].split(" ")[0]) for r in everything] == [("c1", "Exited"), ("c2", "Up")]
        assert everything[0]["STATUS"].startswith("Exited (0) ") and everything[0]["STATUS"].endswith(" ago")
        ids = layerfs("ps", "--root", store, "-a", "-q").stdout.split()
        assert ids == [r["CONTAINER ID"] for r in everything] and all(len(i) == 12 for i in ids)
        assert layerfs("diff", "--root", store, ids[0]).stdout.splitlines()[-1] == "A /root/new"  # an id names it
        shim.stdin.write("done\n")
        shim.stdin.close()
        assert shim.wait(timeout=30) == 0
    assert sorted(os.listdir(store / "containers")) == ["c1"]
    assert new_mounts() == []


def test_sigterm_reaches_the_container_and_nothing_stays_mounted(rootfs, new_mounts):
    with _running(
        "--lower",
        rootfs,
        "--",
        "/bin/sh",
        "-c",
        "trap 'echo got TERM; exit 9' TERM; echo ready; while true; do sleep 0.1; done",
    ) as shim:
        shim.send_signal(signal.SIGTERM)
        assert shim.wait(timeout=30) == 9
        assert "got TERM" in shim.stdout.read()
    assert wait_for(lambda: not new_mounts()), new_mounts()


def test_a_killed_shim_takes_its_container_and_mount_with_it(rootfs, new_mounts):
    with _running("--lower", rootfs, "--", "/bin/sh", "-c", "echo ready; while true; do sleep 0.1; done") as shim:
        assert new_mounts()
        shim.kill()
        shim.wait(timeout=30)
    assert wait_for(lambda: not new_mounts()), new_mounts()
    leftover = subprocess.run(["pgrep", "-f", f"lowerdir={rootfs}"], capture_output=True, text=True).stdout.split()
    assert leftover == [], leftover  # neither the container's processes nor the daemon


def test_runc_runs_the_bundle_and_the_diff_is_the_same_as_layerfs_runs(store, tmp_path):
    script = "echo made > /root/new; rm /etc/motd; hostname > /tmp/host"
    layerfs("run", "--root", store, "--name", "by-layerfs", "box:1", "/bin/sh", "-c", script)
    layerfs("create", "--root", store, "--name", "by-runc", "box:1")
    bundle = tmp_path / "bundle"
    layerfs("bundle", "--root", store, "by-runc", bundle, "--", "/bin/sh", "-c", script)
    try:
        ran = subprocess.run(
            ["runc", "run", "--bundle", str(bundle), f"layerfs-test-{os.getpid()}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        assert (bundle / "rootfs/tmp/host").read_text() == "by-runc\n"
    finally:
        layerfs("umount", bundle / "rootfs")
    assert layerfs("diff", "--root", store, "by-runc").stdout == layerfs("diff", "--root", store, "by-layerfs").stdout
    assert "A /root/new" in layerfs("diff", "--root", store, "by-runc").stdout


def test_the_runtime_gives_hostname_hosts_and_resolv_conf_which_are_not_changes(store):
    seen = layerfs(
        "run",
        "--root",
        store,
        "--name",
        "c",
        "--hostname",
        "web",
        "box:1",
        "/bin/sh",
        "-c",
        "cat /etc/hostname; grep -c web /etc/hosts; test -f /etc/resolv.conf && echo resolv",
    ).stdout
    assert seen.splitlines() == ["web", "1", "resolv"]
    assert layerfs("diff", "--root", store, "c").stdout == ""


def test_user_and_a_network_of_its_own(rootfs):
    seen = layerfs(
        "run",
        "-u",
        "1000:100",
        "--net",
        "none",
        "--lower",
        rootfs,
        "--",
        "/bin/sh",
        "-c",
        "id -u; id -g; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    ).stdout.splitlines()
    assert seen == ["1000", "100", "lo"]
    host_side = layerfs(
        "run", "--lower", rootfs, "--", "/bin/sh", "-c", "cat /proc/net/dev | tail -n +3 | wc -l"
    ).stdout.strip()
    assert int(host_side) >= 1  # --net host (the default) sees the host's interfaces


def test_a_named_container_of_lower_dirs_is_kept(rootfs, tmp_path, new_mounts):
    store = tmp_path / "store"
    layerfs("run", "--root", store, "--name", "low", "--lower", rootfs, "--", "/bin/sh", "-c", "echo x > /root/new")
    assert layerfs("diff", "--root", store, "low").stdout.splitlines() == ["C /root", "A /root/new"]
    assert [r["NAMES"] for r in table_rows(layerfs("ps", "--root", store, "-a").stdout)] == ["low"]
    layerfs("rm", "--root", store, "low")
    assert new_mounts() == []
