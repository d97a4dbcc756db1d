"""``layerfs run`` confines a container as docker does by default, and Podman (runc, this host's settings)
is the reference: the same probe run under both prints the same. Podman runs with docker's own seccomp
profile (the one layerfs ships) and no-new-privileges, since its defaults differ from docker's in just
those two; every other default (capabilities, masked and read-only paths, descriptors) is its own.

Each comparison also checks the values themselves, so that the two agreeing on something wrong fails too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX
from conftest import layerfs, runc_run
from test_podman import Podman

from layerfs.runtime import confinement

pytestmark = pytest.mark.root  # containers: namespaces, mounts, capabilities
IMAGE = "localhost/box:1"
PROFILE = Path(confinement.__file__).with_name("seccomp_default.json")
DOCKER_DEFAULT_CAPS = "00000000a80425fb"  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP

STATUS = "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status"
PROBE = f"""{STATUS}
unshare -U true 2>&1; echo "unshare $?"
mknod /tmp/block b 7 0; echo "mknod block $?"
cat /tmp/block >/dev/null 2>&1; echo "open block $?"
echo "masked files: $(cat /proc/keys /proc/timer_list | wc -c) bytes"
echo "masked dirs: $(ls /proc/acpi /sys/firmware | grep -v : | grep -c .) entries"
echo 1 > /proc/sys/kernel/domainname 2>/dev/null; echo "write /proc/sys $?"
ls /proc/self/fd | tr '\\n' ' '; echo
"""


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("confined") / "rootfs"
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for tool in ("sh", "grep", "cat", "ls", "tr", "wc", "echo", "mknod", "chown", "touch", "unshare", "true"):
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return root


@pytest.fixture(scope="module")
def podman(rootfs):
    """A Podman of its own with the rootfs imported as IMAGE (under /tmp: see test_podman's podmans)."""
    p = Podman(Path(tempfile.mkdtemp(prefix="lfspm-")), None)
    try:
        with tarfile.open(p.base / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        p("import", p.base / "rootfs.tar", IMAGE)
        yield p
    finally:
        p.clean_up()
        shutil.rmtree(p.base)


def _layerfs_run(rootfs: Path, script: str, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    return layerfs("run", *flags, "--lower", rootfs, "--", "/bin/sh", "-c", script, check=False, **kwargs)


def _podman_run(podman: Podman, script: str, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", "run", "--rm", *flags, IMAGE, "/bin/sh", "-c", script],
        env=podman.env,
        capture_output=True,
        text=True,
        timeout=180,
        **kwargs,
    )


def _docker_defaults(podman: Podman, script: str, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    """Podman as docker runs by default."""
    return _podman_run(
        podman, script, "--security-opt", f"seccomp={PROFILE}", "--security-opt", "no-new-privileges", *flags, **kwargs
    )


def _status(output: str) -> dict[str, str]:
    return dict(line.split(":\t") for line in output.splitlines() if ":\t" in line)


def test_a_container_is_confined_as_docker_confines_it(rootfs, podman):
    foreign = os.open("/", os.O_RDONLY)  # the caller's descriptor: not the container's
    try:
        ours = _layerfs_run(rootfs, PROBE, pass_fds=(foreign,))
        reference = _docker_defaults(podman, PROBE, pass_fds=(foreign,))
    finally:
        os.close(foreign)
    assert ours.stdout == reference.stdout, ours.stderr
    status = _status(ours.stdout)
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == DOCKER_DEFAULT_CAPS
    assert status["CapInh"] == status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    lines = ours.stdout.splitlines()
    # unshare is the profile's (CAP_SYS_ADMIN's) to allow; mknod is CAP_MKNOD's, opening the device is not
    assert "unshare: unshare(0x10000000): Operation not permitted" in lines and "unshare 1" in lines
    assert "mknod block 0" in lines and "open block 1" in lines
    assert "masked files: 0 bytes" in lines and "masked dirs: 0 entries" in lines and "write /proc/sys 1" in lines
    assert lines[-1] == "0 1 2 3 "  # (3: ls's own listing)


def test_privileged_lifts_it(rootfs, podman):
    script = (
        f"{STATUS}; grep -c -E ' /proc/| /sys/firmware' /proc/mounts; echo x > /tmp/x; mknod /tmp/b c 1 3; "
        "cat /tmp/b; echo $?"
    )
    ours = _layerfs_run(rootfs, script, "--privileged")
    assert ours.stdout == _podman_run(podman, script, "--privileged").stdout, ours.stderr
    status = _status(ours.stdout)
    assert status["Seccomp"] == "0" and status["NoNewPrivs"] == "0"
    with open("/proc/self/status") as f:
        assert status["CapBnd"] == _status(f.read())["CapBnd"]  # all the caller has
    assert ours.stdout.splitlines()[-2:] == ["0", "0"]  # nothing masked; a device node opens


@pytest.mark.parametrize(
    "flags",
    [
        ("--cap-drop", "CHOWN"),
        ("--cap-drop", "chown", "--cap-add", "CAP_SYS_ADMIN"),
        ("--cap-drop", "ALL", "--cap-add", "fowner"),
        ("--cap-add", "ALL"),
        ("-u", "1000"),
    ],
)
def test_capabilities_changed_by_flags_are_podmans(rootfs, podman, flags):
    script = f"{STATUS}; touch /tmp/f; chown 7 /tmp/f 2>&1; echo chown $?; unshare -U true 2>&1; echo unshare $?"
    ours = _layerfs_run(rootfs, script, *flags)
    assert ours.stdout == _docker_defaults(podman, script, *flags).stdout, ours.stderr
    status, lines = _status(ours.stdout), ours.stdout.splitlines()
    if flags == ("--cap-drop", "CHOWN"):
        assert status["CapEff"] == "00000000a80425fa"
        assert "chown: /tmp/f: Operation not permitted" in lines
    if "CAP_SYS_ADMIN" in flags:
        assert status["CapEff"] == "00000000a82425fa" and "unshare 0" in lines  # the profile allows it now


def test_an_unknown_capability_is_one_line(rootfs):
    result = _layerfs_run(rootfs, "true", "--cap-add", "SYS_NOTHING")
    assert result.returncode == 2 and result.stderr == "layerfs: unknown capability 'CAP_SYS_NOTHING'\n"


def test_runc_confines_a_bundle_as_layerfs_run_does(rootfs, tmp_path):
    store, bundle = tmp_path / "store", tmp_path / "bundle"
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    layerfs("import", "--root", store, f"rootfs:{tmp_path / 'rootfs.tar'}", "box:1")
    layerfs("create", "--root", store, "--name", "c", "box:1")
    layerfs("bundle", "--root", store, "c", bundle, "--", "/bin/sh", "-c", PROBE)
    config = json.loads((bundle / "config.json").read_text())
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    ran = runc_run(bundle, "layerfs-confined")
    ours = _layerfs_run(rootfs, PROBE)
    assert ran.stdout == ours.stdout, ran.stderr
