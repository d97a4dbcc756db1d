"""``layerfs run`` by a plain user: a throwaway user with subordinate ids imports a busybox image into a
store of their own and runs it. The container is in a user namespace mapped as rootless Podman maps its
own (root inside is the user, 1..N the subordinate range), which rootless Podman's ``/proc/self/uid_map``
shows the same; the files it writes land in the upper with the owners that map gives; ``-d``, ``logs``,
``exec``, ``stop``, ``diff``, ``commit`` and ``rm`` work for the user; a cgroup limit is one line's error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from busybox_images import busybox_tree
from conftest import User, end_processes_of, give_subordinate_ids, processes_of
from processes import wait_for
from test_podman_rootless import rootless_podmans as rootless_podmans  # (the fixture)

from layerfs.usernamespace import SUBGID, SUBUID, subordinate_range

pytestmark = pytest.mark.root  # (a user made, its subordinate ids given)
TOOLS = ("sh", "id", "cat", "echo", "sleep", "ls", "stat")
IDS = "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map"


@dataclass
class Rootless:
    user: User  # with XDG_DATA_HOME (the store's place) and XDG_RUNTIME_DIR of their own
    store: Path
    image: Path  # the busybox rootfs tar the store's image "box" was imported from
    shared: Path  # a directory of the user's, for bind mounts

    def first_ids(self) -> tuple[int, int]:
        """The first subordinate uid and gid: container id 1 on the host."""
        entry = pwd.getpwuid(self.user.uid)
        uids, gids = subordinate_range(SUBUID, entry), subordinate_range(SUBGID, entry)
        assert uids and gids
        return uids[0], gids[0]

    def container(self, name: str) -> dict:
        """Its record as ``layerfs inspect`` shows it (its upper, its lower layers...)."""
        return json.loads(self.user.layerfs("inspect", name).stdout)


@pytest.fixture
def rootless(plain_user: User) -> Iterator[Rootless]:
    give_subordinate_ids(plain_user)
    base = Path(tempfile.mkdtemp(prefix="lfsrr-"))
    try:
        base.chmod(0o755)
        root = busybox_tree(base / "rootfs", TOOLS, dirs=("home/u",))
        os.chown(root / "home/u", 1000, 1000)
        with tarfile.open(base / "box.tar", "w") as tar:
            tar.add(root, arcname=".")
        (base / "box.tar").chmod(0o644)
        home = base / "home"
        for d in (home, home / "run", home / "shared"):
            d.mkdir(mode=0o700)
            os.chown(d, plain_user.uid, plain_user.gid)
        env = {**plain_user.env, "XDG_DATA_HOME": str(home / "data"), "XDG_RUNTIME_DIR": str(home / "run")}
        user = dataclasses.replace(plain_user, env=env)
        user.layerfs("import", f"rootfs:{base / 'box.tar'}", "box")
        yield Rootless(user, home / "data/layerfs", base / "box.tar", home / "shared")
    finally:
        end_processes_of(plain_user.uid)  # (a container left running, and the mounts in its namespaces)
        shutil.rmtree(base)


def test_run_is_root_inside_mapped_as_rootless_podman_maps(rootless, rootless_podmans):
    ran = rootless.user.layerfs("run", "--rm", "box", "sh", "-c", IDS)
    podman = rootless_podmans(shutil.which("fuse-overlayfs") or "fuse-overlayfs")
    shutil.copy(rootless.image, podman.base / "box.tar")
    podman("import", podman.base / "box.tar", "box")
    assert ran.stdout == podman("run", "--rm", "box", "sh", "-c", IDS).stdout
    uid, gid = rootless.first_ids()
    user = rootless.user
    assert ran.stdout.split() == f"0 0 0 {user.uid} 1 1 {uid} 65536 0 {user.gid} 1 1 {gid} 65536".split()
    assert rootless.user.layerfs("ps", "-a").stdout.count("\n") == 1  # (the header: --rm left nothing)


def test_files_land_with_the_owners_the_map_gives(rootless):
    """Container root's files are the user's on the host, container uid 1000's the first subordinate
    uid + 999's: in the upper, in a bind-mounted directory, and in the imported layer."""
    user, shared = rootless.user, rootless.shared
    user.layerfs(
        "run", "--name", "c0", "-v", f"{shared}:/shared", "box", "sh", "-c", "echo r > /root/f; echo s > /shared/f"
    )
    inside = "echo u > /work/f; stat -c '%u:%g %n' /work/f /home/u"
    shown = user.layerfs("run", "--name", "c1", "-u", "1000", "-w", "/work", "box", "sh", "-c", inside).stdout
    assert shown == "1000:0 /work/f\n1000:1000 /home/u\n"
    uid, gid = rootless.first_ids()
    owners = [
        (os.lstat(path).st_uid, os.lstat(path).st_gid)
        for path in (
            Path(rootless.container("c0")["upper"]) / "root/f",
            shared / "f",
            Path(rootless.container("c1")["upper"]) / "work/f",
            Path(rootless.container("c1")["lowers"][0]) / "home/u",
        )
    ]
    assert owners == [(user.uid, user.gid), (user.uid, user.gid), (uid + 999, user.gid), (uid + 999, gid + 999)]


def test_detached_logs_exec_stop_diff_commit_rm(rootless):
    user = rootless.user
    script = "echo started; echo x > /root/d; while :; do sleep 0.1; done"
    assert user.layerfs("run", "-d", "--name", "d1", "box", "sh", "-c", script).stdout == "d1\n"
    wait_for(lambda: user.layerfs("logs", "d1").stdout == "started\n", 30)
    assert user.layerfs("exec", "d1", "sh", "-c", "id -u; cat /root/d").stdout == "0\nx\n"
    assert user.layerfs("exec", "-u", "1000", "d1", "id", "-u").stdout == "1000\n"
    user.layerfs("stop", "-t", "1", "d1")
    assert "Exited (137)" in user.layerfs("ps", "-a").stdout
    assert user.layerfs("diff", "d1").stdout == "C /root\nA /root/d\n"
    user.layerfs("commit", "d1", "box2")
    # The commit holds the container's ids, not the host's: root's file is root's in the next container.
    assert user.layerfs("run", "--rm", "box2", "stat", "-c", "%u:%g %n", "/root/d").stdout == "0:0 /root/d\n"
    user.layerfs("rm", "d1")
    assert not (rootless.store / "containers/d1").exists()
    # rm -f of a running container whose process is not the user's on the host (container uid 1000)
    user.layerfs("run", "-d", "-u", "1000", "--name", "d2", "box", "sh", "-c", "while :; do sleep 0.1; done")
    assert user.layerfs("rm", "-f", "d2").stdout == "d2\n"
    assert not (rootless.store / "containers/d2").exists()
    assert not [line for line in Path("/proc/self/mounts").read_text().splitlines() if str(rootless.store) in line]


def test_a_killed_shim_takes_everything_with_it(rootless):
    """The container (as uid 1000: its process is not the user's on the host) and the rootfs's daemon
    end with a SIGKILLed shim; the next command finds it exited, and rm removes it."""
    user = rootless.user
    user.layerfs("run", "-d", "-u", "1000", "--name", "k", "box", "sleep", "100")
    os.kill(rootless.container("k")["pid"], signal.SIGKILL)
    container_uid = rootless.first_ids()[0] + 999
    assert wait_for(lambda: not processes_of(user.uid) and not processes_of(container_uid), 30)
    assert "Exited (137)" in user.layerfs("ps", "-a").stdout
    user.layerfs("rm", "k")
    assert not (rootless.store / "containers/k").exists()


def test_a_cgroup_limit_is_refused_in_one_line(rootless):
    refused = rootless.user.layerfs("run", "--rm", "--memory", "64m", "box", "true", check=False)
    assert (refused.returncode, refused.stderr) == (
        1,
        "layerfs: --memory: resource limits need root (a container run without root gets no cgroup)\n",
    )
    assert rootless.user.layerfs("ps", "-a").stdout.count("\n") == 1


def test_run_without_subordinate_ids_is_refused_in_one_line(plain_user):
    entry = pwd.getpwuid(plain_user.uid)
    for table, option in ((SUBUID, "--del-subuids"), (SUBGID, "--del-subgids")):
        while found := subordinate_range(table, entry):  # (whatever useradd gave)
            subprocess.run(["usermod", option, f"{found[0]}-{sum(found) - 1}", plain_user.name], check=True)
    refused = plain_user.layerfs("run", "--rm", "box", "true", check=False)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"layerfs: a container without root needs subordinate ids: {plain_user.name} has none in /etc/subuid"
        f" (usermod --add-subuids FROM-TO {plain_user.name})\n",
    )
