"""``layerfs run``'s volumes (``-v``, ``--mount``, ``--tmpfs``), ``--read-only`` and ``layerfs volume``,
each against ``podman run`` (runc) of the same umoci-made busybox image where Podman can, and what a
volume holds left out of the container's diff and commit.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX, busybox_tree, one_layer_layout
from conftest import layerfs, table_rows
from test_podman import Podman

pytestmark = pytest.mark.root  # containers: namespaces, mounts


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A busybox image with ``/srv/data/seed`` in a directory owned by 1000: (layerfs's store, Podman's
    image id, the Podman)."""
    base = tmp_path_factory.mktemp("volumes")
    tools = ("sh", "cat", "echo", "ls", "touch", "stat", "grep", "sort", "rm", "mkdir", "true", "sleep")
    root = busybox_tree(base / "rootfs", tools, dirs=("srv/data",))
    (root / "srv/data/seed").write_text("from the image\n")
    os.chown(root / "srv/data", 1000, 1000)
    layout, store = one_layer_layout(base, root, "1"), base / "store"
    layerfs("import", "--root", store, f"oci:{layout}:1", "box:1")
    podman = Podman(Path(tempfile.mkdtemp(prefix="lfsvol-")), None)
    try:
        yield store, podman("pull", "-q", f"oci:{layout}:1").stdout.split()[-1], podman
    finally:
        podman.clean_up()
        podman("volume", "rm", "--all", "--force", check=False)
        shutil.rmtree(podman.base)


def _both(box, script: str, *flags: str | os.PathLike, podman_flags: tuple = ()) -> str:
    """``sh -c SCRIPT`` in the image under ``layerfs run --rm`` and ``podman run --rm`` with ``flags`` (Podman's
    own where given): the output, the same from both."""
    store, image, podman = box
    ours = layerfs("run", "--root", store, "--rm", *flags, "box:1", "/bin/sh", "-c", script, check=False)
    theirs = podman("run", "--rm", *(podman_flags or flags), image, "/bin/sh", "-c", script, check=False)
    assert ours.stdout == theirs.stdout, (ours.stderr, theirs.stderr)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    return ours.stdout


def _host_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two host directories alike, one for each runtime."""
    dirs = tmp_path / "ours", tmp_path / "podmans"
    for d in dirs:
        d.mkdir()
        (d / "there").write_text("from the host\n")
    return dirs


def test_a_bind_shows_the_hosts_directory_and_writes_go_there(box, tmp_path):
    ours, podmans = _host_dirs(tmp_path)
    script = "cat /mnt/h/there; echo new > /mnt/h/new; ls /mnt/h"
    shown = _both(box, script, "-v", f"{ours}:/mnt/h", podman_flags=("-v", f"{podmans}:/mnt/h"))
    assert shown == "from the host\nnew\nthere\n"
    assert (ours / "new").read_text() == (podmans / "new").read_text() == "new\n"


def test_a_read_only_bind_refuses_writes_with_erofs(box, tmp_path):
    ours, podmans = _host_dirs(tmp_path)
    script = "cat /mnt/h/there; touch /mnt/h/x 2>&1; echo $?"
    for flag, podman_flag in (
        (f"{ours}:/mnt/h:ro", f"{podmans}:/mnt/h:ro"),
        (f"type=bind,source={ours},target=/mnt/h,readonly", f"type=bind,source={podmans},target=/mnt/h,readonly"),
    ):
        kind = "-v" if ":" in flag else "--mount"
        shown = _both(box, script, kind, flag, podman_flags=(kind, podman_flag))
        assert shown == "from the host\ntouch: /mnt/h/x: Read-only file system\n1\n"
    assert sorted(os.listdir(ours)) == ["there"]


def test_a_named_volume_is_filled_from_the_image_and_kept(box):
    store = box[0]
    first = "stat -c '%u %n' /srv/data; cat /srv/data/seed; echo kept > /srv/data/more"
    assert _both(box, first, "-v", "vol:/srv/data") == "1000 /srv/data\nfrom the image\n"
    assert _both(box, "ls /srv/data", "--mount", "type=volume,source=vol,target=/srv/data") == "more\nseed\n"
    # An empty volume is not filled where the image has nothing, and keeps what it is given.
    assert _both(box, "ls /elsewhere; echo x > /elsewhere/x", "-v", "vol2:/elsewhere") == ""
    assert _both(box, "ls /srv/data", "-v", "vol2:/srv/data") == "x\n"  # not empty: not filled
    listed = table_rows(layerfs("volume", "ls", "--root", store).stdout)
    assert [(r["DRIVER"], r["VOLUME NAME"]) for r in listed] == [("local", "vol"), ("local", "vol2")]
    (inspected,) = json.loads(layerfs("volume", "inspect", "--root", store, "vol").stdout)
    assert (Path(inspected["Mountpoint"]) / "more").read_text() == "kept\n"
    for name in ("vol", "vol2"):
        layerfs("volume", "rm", "--root", store, name)
    assert layerfs("volume", "ls", "--root", store, "-q").stdout == ""


def test_anonymous_volumes_go_with_run_rm(box):
    store = box[0]
    shown = _both(box, "ls /srv/data; echo x > /anon/x; cat /anon/x", "-v", "/srv/data", "-v", "/anon")
    assert shown == "seed\nx\n"
    assert layerfs("volume", "ls", "--root", store, "-q").stdout == ""
    layerfs("run", "--root", store, "--name", "keeps", "-v", "/anon", "box:1", "/bin/true")
    (anonymous,) = layerfs("volume", "ls", "--root", store, "-q").stdout.split()
    refused = layerfs("volume", "rm", "--root", store, anonymous, check=False)
    assert refused.returncode == 1 and refused.stderr == f"layerfs: volume {anonymous} is in use by container keeps\n"
    # Started again, it has the same anonymous volume, as under docker.
    layerfs("run", "--root", store, "--name", "again", "-v", "/anon", "box:1", "sh", "-c", "echo $$ >> /anon/runs")
    (first,) = set(layerfs("volume", "ls", "--root", store, "-q").stdout.split()) - {anonymous}
    layerfs("start", "--root", store, "-a", "again")
    assert set(layerfs("volume", "ls", "--root", store, "-q").stdout.split()) == {anonymous, first}
    assert len((store / "volumes" / first / "_data" / "runs").read_text().split()) == 2
    layerfs("rm", "--root", store, "-v", "keeps")
    layerfs("rm", "--root", store, "-v", "again")
    assert layerfs("volume", "ls", "--root", store, "-q").stdout == ""


def test_tmpfs_mounts(box):
    # (sorted: Podman mounts --tmpfs and --mount ones in no fixed order)
    script = "grep -E ' /(scratch|sized) ' /proc/mounts | cut -d' ' -f2,3 | sort; echo x > /scratch/x && cat /scratch/x"
    shown = _both(box, script, "--tmpfs", "/scratch", "--mount", "type=tmpfs,target=/sized,tmpfs-size=1048576")
    assert shown == "/scratch tmpfs\n/sized tmpfs\nx\n"
    flags = ("--mount", "type=tmpfs,target=/sized,tmpfs-size=1m", "--tmpfs", "/scratch:size=2m,exec")
    options = layerfs(
        "run", "--root", box[0], "--rm", *flags, "box:1", "grep", "-E", "tmpfs /s(cratch|ized) ", "/proc/mounts"
    ).stdout
    assert [line.split()[3] for line in options.splitlines()] == [
        "rw,nosuid,nodev,noexec,relatime,size=1024k",
        "rw,nosuid,nodev,relatime,size=2048k",
    ]


def test_read_only_gives_erofs_on_the_rootfs_and_a_writable_tmpfs(box):
    script = (
        "touch /x 2>&1; touch /tmp/x 2>&1; echo y > /dev/shm/y && echo shm; "
        "touch /scratch/y && echo scratch; grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1"
    )
    # (Podman mounts a tmpfs on /tmp, /var/tmp and /run with --read-only, docker does not: as docker here)
    flags = ("--read-only", "--tmpfs", "/scratch")
    shown = _both(box, script, *flags, podman_flags=(*flags, "--read-only-tmpfs=false"))
    assert shown == ("touch: /x: Read-only file system\ntouch: /tmp/x: Read-only file system\nshm\nscratch\nro\n")


def test_volumes_are_no_changes_of_the_container(box, tmp_path):
    store = box[0]
    host = tmp_path / "host"
    script = (
        "echo v > /srv/data/v; echo h > /new/deep/h; echo a > /anon/a; echo t > /scratch/t; echo o > /root/own; "
        "echo e > /etc/mounted/e"
    )
    layerfs(
        "run",
        "--root",
        store,
        "--name",
        "changer",
        *("-v", "data:/srv/data", "-v", f"{host}:/new/deep", "-v", "/anon", "--tmpfs", "/scratch"),
        *("--mount", "type=volume,target=/etc/mounted"),
        "box:1",
        "/bin/sh",
        "-c",
        script,
    )
    assert (host / "h").read_text() == "h\n"  # (-v made the host directory)
    expected = ["C /root", "A /root/own"]  # not /new, /anon, /scratch, /etc or what is in them
    assert layerfs("diff", "--root", store, "changer").stdout.splitlines() == expected
    layer = tmp_path / "layer.tar"
    layerfs("export", "--root", store, "-o", layer, "changer")
    with tarfile.open(layer) as tar:
        assert sorted(tar.getnames()) == ["root", "root/own"]
    layerfs("commit", "--root", store, "changer", "box:changed")
    listing = layerfs("run", "--root", store, "--rm", "box:changed", "/bin/sh", "-c", "ls / /etc /srv/data")
    assert listing.stdout.split("\n\n")[0].split()[1:] == ["bin", "dev", "etc", "proc", "root", "srv", "sys", "tmp"]
    assert "mounted" not in listing.stdout and listing.stdout.rstrip().endswith("seed")
    layerfs("rm", "--root", store, "-v", "changer")
    layerfs("rmi", "--root", store, "box:changed")
    assert layerfs("volume", "ls", "--root", store, "-q").stdout.split() == ["data"]
    layerfs("volume", "prune", "--root", store, "--all")


@pytest.mark.parametrize(
    "flag, message",
    [
        (("-v", "./here:/x"), '"./here" includes invalid characters for a local volume name'),
        (("-v", "/x:/y:loud"), "invalid mode: loud"),
        (("-v", "vol:x"), "mount path must be absolute"),
        (("-v", "/x:ro"), "an anonymous volume takes no mode"),
        (("--mount", "type=bind,source=/no/such/dir,target=/x"), "bind source path does not exist: /no/such/dir"),
        (("--mount", "type=tmpfs,target=/x,colour=red"), "unexpected key 'colour'"),
        (("--tmpfs", "/x:loud"), "invalid tmpfs option 'loud'"),
    ],
)
def test_a_bad_volume_is_refused_in_one_line_and_nothing_is_made(box, flag, message):
    store = box[0]
    result = layerfs("run", "--root", store, "--name", "refused", *flag, "box:1", "/bin/true", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (store / "containers" / "refused").exists()


def test_volumes_of_a_throwaway_container(box, tmp_path):
    """``run --lower`` without a name: binds as for any, its anonymous volumes gone with it."""
    store = box[0]
    lowers = layerfs("images", "--root", store, "--lowerdir", "box:1").stdout.strip().split(":")
    flags = [f for lower in lowers for f in ("--lower", lower)]
    script = "ls /srv/data /anon; echo x > /h/x"
    result = layerfs(
        "run",
        "--root",
        store,
        "-v",
        "/anon",
        "-v",
        f"{tmp_path}:/h",
        *flags,
        "--",
        "/bin/sh",
        "-c",
        script,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "/anon:\n\n/srv/data:\nseed\n", result.stderr
    assert (tmp_path / "x").read_text() == "x\n"
    assert layerfs("volume", "ls", "--root", store, "-q").stdout == ""


def test_a_destination_through_an_images_symlink_stays_in_the_rootfs(tmp_path):
    """An image's absolute symlink is followed inside the rootfs (as runc resolves it), never on the host."""
    host, bound, rootfs = tmp_path / "host", tmp_path / "bound", tmp_path / "rootfs"
    for d in (host, bound, rootfs / "bin", rootfs / "etc"):
        d.mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    os.symlink("busybox", rootfs / "bin/sh")
    os.symlink(str(host), rootfs / "escape")  # absolute: on the host it names the host's directory
    script = "echo inside > /escape/x/f"
    layerfs("run", "-v", f"{bound}:/escape/x", "--lower", rootfs, "--", "/bin/sh", "-c", script)
    assert (bound / "f").read_text() == "inside\n"
    assert os.listdir(host) == []  # no mount point made there, nothing mounted there
