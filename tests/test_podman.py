"""Podman with layerfs as containers-storage's ``mount_program``, side by side with fuse-overlayfs in the
same role: a busybox image imported, a container that adds, changes, deletes files and renames a directory
(containers-storage diffs a mount program's containers through the mount, so layerfs's redirects serve
commit as they are), ``podman diff``,
``podman commit`` and the committed image run. Both must give the same output and the same diff.

Each run of Podman here has its own graphroot, runroot and temporary directory, set in config files of
its own (``CONTAINERS_STORAGE_CONF``, ``CONTAINERS_CONF``); nothing global is touched. The settings this
host needs (runc, cgroupfs, a file for events, no network, ulimits it allows) are in ``containers.conf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX
from conftest import LAYERFS, force_unmount, is_mounted
from processes import wait_for

from benchmarks.podman import storage_env, write_configs

pytestmark = pytest.mark.root  # Podman as root, with layerfs mounting its containers
LAYERFS_PROGRAM = str(Path(sys.executable).with_name("layerfs"))
IMAGE, COMMITTED, CONTAINER = "localhost/box:1", "localhost/box:2", "changer"

SCRIPT = """
echo added > /root/added.txt
sed -i s/v1/v2/ /etc/motd
rm /etc/obsolete
rm -r /opt/old
mkdir -p /var/new/sub && echo deep > /var/new/sub/file
rm -r /srv/data && mkdir /srv/data && echo fresh > /srv/data/fresh
mv /usr/share/doc /usr/share/moved
cat /etc/motd
ls /opt /srv/data
"""
EXPECTED_OUTPUT = "v2\n/opt:\nkept\n\n/srv/data:\nfresh\n"
EXPECTED_DIFF = [
    "C /etc",
    "C /etc/motd",
    "D /etc/obsolete",
    "C /opt",
    "D /opt/old",
    "C /root",
    "A /root/added.txt",
    "C /srv",
    "C /srv/data",
    "A /srv/data/fresh",
    "D /srv/data/stale",
    "C /usr",
    "C /usr/share",
    "D /usr/share/doc",
    "A /usr/share/moved",
    "A /usr/share/moved/pkg",
    "A /usr/share/moved/pkg/copyright",
    "C /var",
    "A /var/new",
    "A /var/new/sub",
    "A /var/new/sub/file",
]


class Podman:
    """``podman`` with a storage of its own under ``base``, its overlay driver mounting with ``program``
    (None: with kernel overlayfs)."""

    def __init__(self, base: Path, program: str | None) -> None:
        self.base = base
        write_configs(base, program)
        self.env = storage_env(base)

    def __call__(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *map(str, args)], env=self.env, capture_output=True, text=True, timeout=180)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
        return result

    def mounts(self, fstype_prefix: str = "") -> list[str]:
        """What is mounted below ``base`` (the storage's own home is a private bind mount: fstype "" finds it)."""
        with open("/proc/self/mounts") as f:
            fields = [line.split() for line in f]
        return [f[1] for f in fields if f[1].startswith(f"{self.base}/") and f[2].startswith(fstype_prefix)]

    def clean_up(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False)
        for point in reversed(self.mounts()):
            force_unmount(point)


@pytest.fixture
def rootfs_tar(tmp_path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "root", "tmp", "opt/old/inner", "opt/kept", "var", "srv/data", "usr/share/doc/pkg"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for tool in ("sh", "cat", "echo", "ls", "rm", "mkdir", "sed", "mv"):
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc/motd").write_text("v1\n")
    (root / "etc/obsolete").write_text("to be deleted\n")
    (root / "opt/old/inner/file").write_text("a deleted directory's file\n")
    (root / "srv/data/stale").write_text("in a directory replaced by a new one\n")
    (root / "usr/share/doc/pkg/copyright").write_text("in a directory renamed (by redirect on layerfs)\n")
    tar_file = tmp_path / "rootfs.tar"
    with tarfile.open(tar_file, "w") as tar:
        tar.add(root, arcname=".")
    return tar_file


def scenario(podman: Podman, rootfs_tar: Path) -> dict:
    """Import, run the changing script, diff, commit, run the committed image; what each printed."""
    podman("import", rootfs_tar, IMAGE)
    ran = podman("run", "--name", CONTAINER, IMAGE, "sh", "-c", SCRIPT)
    diff = podman("diff", CONTAINER).stdout.split("\n")
    podman("commit", CONTAINER, COMMITTED)
    again = podman(
        "run",
        "--rm",
        COMMITTED,
        "sh",
        "-c",
        "cat /root/added.txt /etc/motd /var/new/sub/file /usr/share/moved/pkg/copyright; ls /opt /srv/data",
    )
    return {"output": ran.stdout, "diff": sorted(line for line in diff if line), "committed": again.stdout}


@pytest.fixture
def podmans():
    """Podmans with storages of their own. Not under pytest's long tmp_path: with state paths of about 60
    characters, Podman 4.3 misses its containers' exits and waits out a 20 s timeout on each run."""
    made: list[Podman] = []

    def make(program: str | None) -> Podman:
        made.append(Podman(Path(tempfile.mkdtemp(prefix="lfspm-")), program))
        return made[-1]

    try:
        yield make
    finally:
        for podman in made:
            podman.clean_up()
            shutil.rmtree(podman.base)


def test_podman_runs_diffs_and_commits_with_layerfs_as_with_fuse_overlayfs(podmans, rootfs_tar):
    results = {
        name: scenario(podmans(program), rootfs_tar)
        for name, program in (("fuse-overlayfs", shutil.which("fuse-overlayfs")), ("layerfs", LAYERFS_PROGRAM))
    }
    assert results["layerfs"] == results["fuse-overlayfs"]
    assert results["layerfs"]["output"] == EXPECTED_OUTPUT
    assert results["layerfs"]["diff"] == sorted(EXPECTED_DIFF)
    assert results["layerfs"]["committed"] == (
        "added\nv2\ndeep\nin a directory renamed (by redirect on layerfs)\n" + EXPECTED_OUTPUT.split("\n", 1)[1]
    )


def test_the_mount_is_layerfs_and_layerfs_diff_reads_it_as_podman_does_on_kernel_overlayfs(podmans, rootfs_tar):
    podman, kernel = podmans(LAYERFS_PROGRAM), podmans(None)
    for p in (podman, kernel):
        p("import", rootfs_tar, IMAGE)
        p("run", "--name", CONTAINER, IMAGE, "sh", "-c", SCRIPT)
    # conmon's "podman container cleanup" unmounts the stopped container after run returns; mounting before
    # it has would leave Podman's mount count off by one.
    assert wait_for(lambda: not podman.mounts("fuse"))
    merged = podman("mount", CONTAINER).stdout.strip()
    with open("/proc/self/mounts") as f:
        assert [line.split()[2] for line in f if line.split()[1] == merged] == ["fuse.layerfs"]
    # The change index of the mount Podman made: the same changes, besides what Podman adds to every
    # container's upper layer (mount points, runtime files) and leaves out of its own diff.
    ours = subprocess.run(LAYERFS + ["diff", merged], capture_output=True, text=True, check=True).stdout.split("\n")
    podman_stubs = {
        "A /dev",
        "A /proc",
        "A /sys",
        "A /run",
        "A /run/.containerenv",
        "A /etc/hostname",
        "A /etc/hosts",
        "A /etc/mtab",
    }
    assert podman_stubs <= set(ours)
    # On kernel overlayfs Podman reads the upper layer, as layerfs diff does, and reports a replaced
    # directory as D (with a mount program it compares two trees: C, and D for each old entry).
    walked = sorted(line for line in kernel("diff", CONTAINER).stdout.split("\n") if line)
    assert "D /srv/data" in walked
    assert sorted(line for line in ours if line and line not in podman_stubs) == walked
    podman("unmount", CONTAINER)
    assert not is_mounted(merged)  # fusermount3 -u, as containers-storage unmounts a mount program's mount

    # An image mount: lowerdir only, read-only.
    image = podman("image", "mount", IMAGE).stdout.strip()
    with open("/proc/self/mounts") as f:
        (options,) = [line.split()[3] for line in f if line.split()[1] == image]
    assert options.split(",")[0] == "ro"
    assert Path(image, "etc/motd").read_text() == "v1\n"
    podman("image", "unmount", IMAGE)
    assert not is_mounted(image)
    # podman info asks the mount program for its version.
    assert "layerfs" in podman("info", "--format", "{{.Store.GraphOptions}}").stdout
