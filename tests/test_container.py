"""``layerfs diff``, ``export`` and ``commit`` on real mounts.

diff: every kind of change, checked against Docker's two-tree comparison of the image and the container
(kernel overlayfs mounts, an independent reading), from a running mount, from the unmounted container with
its change index, and from a walk of its upper; and after a killed daemon. export: the same layer from the
mount and from its layers. commit: the layer, mounted by kernel overlayfs under the same lowers, shows the
container's tree, and is what the exported tar unpacks to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import LAYERFS, is_mounted
from pair import write
from processes import daemon_pids
from snapshot import assert_same, snapshot, snapshot_upper
from treediff import two_tree_changes


def _diff(*args: str | os.PathLike) -> list[str]:
    result = subprocess.run(LAYERFS + ["diff", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def container(layers, mounts, tmp_path):
    """A running layerfs mount over two lowers: (mount point, lowers, upper, work)."""
    bottom, top = layers.dir("bottom"), layers.dir("top")
    write(bottom / "etc/passwd", "root\n")
    write(bottom / "etc/hosts", "127.0.0.1\n")
    write(bottom / "etc/motd", "hello\n")
    write(bottom / "usr/share/doc/a/README", "a\n")
    write(bottom / "usr/share/doc/b/README", "b\n")
    write(bottom / "var/lib/old/state", "1\n")
    write(bottom / "opt/app/bin/run", "#!/bin/sh\n", mode=0o755)
    write(top / "opt/app/conf", "top\n")
    os.symlink("passwd", bottom / "etc/pw-link")
    upper, work = layers.dir("upper"), layers.dir("work")
    mnt = mounts.layerfs(tmp_path / "mnt", [top, bottom], upper, work)
    return mnt, [top, bottom], upper, work


def _every_kind_of_change(mnt: Path) -> None:
    write(mnt / "srv/new/file", "added\n")  # add, in a new directory
    with open(mnt / "etc/passwd", "a") as f:
        f.write("user\n")  # modify a lower file
    os.chmod(mnt / "etc/hosts", 0o600)  # chmod only
    os.unlink(mnt / "etc/motd")  # delete a lower file
    for name in os.listdir(mnt / "usr/share/doc/a"):
        os.unlink(mnt / "usr/share/doc/a" / name)
    os.rmdir(mnt / "usr/share/doc/a")  # delete a whole lower dir
    for name in os.listdir(mnt / "var/lib/old"):
        os.unlink(mnt / "var/lib/old" / name)
    os.rmdir(mnt / "var/lib/old")
    os.mkdir(mnt / "var/lib/old")  # replace a dir: opaque
    write(mnt / "var/lib/old/fresh", "fresh\n")
    os.rename(mnt / "opt/app/conf", mnt / "opt/app/conf.old")  # rename a file
    os.rename(mnt / "usr/share/doc/b", mnt / "usr/share/doc/b2")  # rename a lower dir
    os.link(mnt / "srv/new/file", mnt / "srv/new/hardlink")  # hard link
    os.symlink("/etc/passwd", mnt / "srv/link")  # symlink
    os.setxattr(mnt / "opt/app/bin/run", "user.note", b"x")  # xattr only
    os.mkfifo(mnt / "srv/fifo")  # fifo


def test_every_kind_of_change_matches_dockers_two_tree_comparison(container, mounts, tmp_path):
    mnt, lowers, upper, work = container
    _every_kind_of_change(mnt)
    live = _diff(mnt)
    assert _diff("--all", mnt) == live  # nothing here is an unchanged copy

    mounts.unmount(mnt)
    image = mounts.overlay(tmp_path / "image", lowers)
    view = mounts.overlay(tmp_path / "view", [upper, *lowers])
    # Docker's two-tree comparison knows nothing of xattrs, and sees a replaced directory as changed with
    # its old content deleted; layerfs reports those as podman does on overlay storage (the upper's say).
    own_way = ("/opt/app/bin", "/var/lib/old")

    def comparable(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.split(" ", 1)[1].startswith(own_way)]

    assert comparable(live) == comparable(two_tree_changes(image, view))
    assert [line for line in live if line not in comparable(live)] == [
        "C /opt/app/bin",
        "C /opt/app/bin/run",
        "D /var/lib/old",
        "A /var/lib/old/fresh",
    ]
    assert {
        "A /srv/new/file",
        "C /etc/passwd",
        "C /etc/hosts",
        "D /etc/motd",
        "D /usr/share/doc/a",
        "D /var/lib/old",
        "A /var/lib/old/fresh",
        "D /opt/app/conf",
        "A /opt/app/conf.old",
        "D /usr/share/doc/b",
        "A /usr/share/doc/b2",
        "A /srv/link",
        "C /opt/app/bin/run",
        "A /srv/fifo",
    } <= set(live)

    lowerdir = ":".join(map(str, lowers))
    with_index = _diff("--upperdir", upper, "--lowerdir", lowerdir, "--workdir", work)
    walked = _diff("--upperdir", upper, "--lowerdir", lowerdir)
    assert with_index == walked == live


def test_a_path_limits_it_and_json_is_dockers(container):
    mnt, *_ = container
    _every_kind_of_change(mnt)
    assert _diff(mnt, "/etc") == ["C /etc", "C /etc/hosts", "D /etc/motd", "C /etc/passwd"]
    as_json = json.loads(
        subprocess.run(LAYERFS + ["diff", "--json", str(mnt), "etc"], capture_output=True, text=True, check=True).stdout
    )
    assert as_json == [
        {"Path": "/etc", "Kind": 0},
        {"Path": "/etc/hosts", "Kind": 0},
        {"Path": "/etc/motd", "Kind": 2},
        {"Path": "/etc/passwd", "Kind": 0},
    ]


def test_unchanged_copies_show_only_with_all(container):
    mnt, *_ = container
    before = os.stat(mnt / "etc/hosts")
    with open(mnt / "etc/hosts", "r+") as f:  # copied up, rewritten with the same content
        f.write("127.0.0.1\n")
    os.utime(mnt / "etc/hosts", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.utime(mnt / "etc/passwd")  # a touch: new times, same content
    assert _diff(mnt) == []
    assert _diff("--all", mnt) == ["C /etc", "C /etc/hosts", "C /etc/passwd"]


def test_after_a_killed_daemon_the_index_agrees_with_a_walk(container, mounts):
    mnt, lowers, upper, work = container
    (pid,) = daemon_pids(mnt)
    writer = subprocess.Popen(
        [
            "sh",
            "-c",
            f"""
        cd {mnt} && i=0
        while true; do
            i=$((i+1)); mkdir -p d$((i % 7))/s$((i % 3)) || exit 0; echo $i > d$((i % 7))/s$((i % 3))/f$i
            echo $i >> etc/passwd; mv d$((i % 7))/s$((i % 3))/f$i d$((i % 5))/g$i 2>/dev/null
            rm -f d$((i % 5))/g$((i - 20)); chmod 0$((600 + i % 77)) etc/hosts 2>/dev/null
        done""",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait()
    subprocess.run(LAYERFS + ["umount", str(mnt)], capture_output=True, timeout=60)
    assert not is_mounted(mnt)
    lowerdir = ":".join(map(str, lowers))
    walked = _diff("--upperdir", upper, "--lowerdir", lowerdir)
    assert len(walked) > 20  # the workload did write
    assert _diff("--upperdir", upper, "--lowerdir", lowerdir, "--workdir", work) == walked
    # And mounted again, the daemon starts from an index that agrees.
    again = mounts.layerfs(mnt, lowers, upper, work)
    assert _diff(again) == walked


def test_errors_are_one_line(tmp_path):
    for args, message in (
        (["diff", str(tmp_path)], "not a running layerfs mount"),
        (["diff", "--upperdir", str(tmp_path / "nope"), "--lowerdir", str(tmp_path)], "upperdir"),
        (["diff", "--upperdir", str(tmp_path)], "--upperdir needs --lowerdir"),
        (["diff"], "diff of what?"),
        (["export", "-o", str(tmp_path / "x.tar")], "export of what?"),
    ):
        result = subprocess.run(LAYERFS + args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result


def test_export_from_the_mount_and_from_its_layers_gives_the_same_layer(container, mounts, tmp_path):
    mnt, lowers, upper, work = container
    _every_kind_of_change(mnt)

    def export(*args) -> tuple[str, list[str]]:
        out = tmp_path / f"layer-{len(list(tmp_path.glob('layer-*')))}.tar"
        result = subprocess.run(
            LAYERFS + ["export", "-o", str(out), *map(str, args)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        with tarfile.open(out) as tar:
            return result.stdout.split()[1], tar.getnames()

    live_digest, names = export(mnt)
    assert {"etc/.wh.motd", "usr/share/doc/.wh.a", "var/lib/old/.wh..wh..opq", "srv/new/hardlink"} <= set(names)
    mounts.unmount(mnt)
    lowerdir = ":".join(map(str, lowers))
    assert export("--upperdir", upper, "--lowerdir", lowerdir, "--workdir", work) == (live_digest, names)


def test_commit_makes_a_layer_that_gives_the_same_tree_as_a_lower(container, mounts, tmp_path):
    mnt, lowers, upper, work = container
    _every_kind_of_change(mnt)
    write(mnt / "srv/copy-a", "the same bytes\n")
    write(mnt / "srv/copy-b", "the same bytes\n")
    os.utime(mnt / "srv/copy-a", ns=(10**18, 10**18))
    os.utime(mnt / "srv/copy-b", ns=(10**18, 10**18))
    store = tmp_path / "store"

    def commit(*args) -> list[str]:
        result = subprocess.run(
            LAYERFS + ["commit", "--root", str(store), *map(str, args)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    layer, diff_id = commit(mnt)
    assert commit(mnt) == [layer, f"{diff_id} (in the store already)"]  # content-addressed: stored once
    exported = subprocess.run(
        LAYERFS + ["export", "-o", str(tmp_path / "l.tar"), str(mnt)], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert diff_id == f"diff_id {exported}"
    mounts.unmount(mnt)
    # The layer as a lower under the same lowers shows what the container showed.
    container_view = mounts.overlay(tmp_path / "container-view", [upper, *lowers])
    committed_view = mounts.overlay(tmp_path / "committed-view", [Path(layer), *lowers])
    assert_same(
        snapshot(container_view),
        snapshot(committed_view),
        what="container vs its committed layer",
        names=("container", "committed"),
    )
    # By default alike files share data only by reflink (invisible; ext4 has none): separate inodes.
    assert os.stat(Path(layer) / "srv/copy-a").st_ino != os.stat(Path(layer) / "srv/copy-b").st_ino


def test_commit_can_share_alike_files_by_hard_links(container, tmp_path):
    mnt, *_ = container
    for name in ("a", "b"):
        write(mnt / f"srv/{name}", "alike\n")
        os.utime(mnt / f"srv/{name}", ns=(10**18, 10**18))
    write(mnt / "srv/other", "different\n")
    result = subprocess.run(
        LAYERFS + ["commit", "--share", "hardlink", "--root", str(tmp_path / "store"), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    layer = Path(result.stdout.splitlines()[0])
    a, b, other = (os.stat(layer / "srv" / n) for n in ("a", "b", "other"))
    assert a.st_ino == b.st_ino != other.st_ino and a.st_nlink == 3  # both names and the store's entry


@pytest.mark.root  # trusted.overlay.* xattrs in the upper
def test_a_committed_layer_is_its_exported_tar_unpacked(layers, tmp_path):
    """Commit and export take a layer's entries by the same rules, so the directory a commit stores is what
    the exported tar (same diff_id) unpacks to: whiteouts, opaque directories, an opaque upper root, hard
    links, a fifo, and no socket."""
    lower, upper = layers.dir("lower"), layers.dir("upper")
    write(lower / "etc/old", "old\n")
    write(lower / "var/cache/stale", "stale\n")
    write(upper / "etc/new", "new\n")
    os.link(upper / "etc/new", upper / "etc/new-link")
    os.mknod(upper / "etc/old", 0o600 | stat.S_IFCHR, 0)  # a whiteout
    write(upper / "var/cache/fresh", "fresh\n")
    os.setxattr(upper / "var/cache", "trusted.overlay.opaque", b"y")
    os.mkfifo(upper / "var/fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(upper / "var/sock"))
    os.setxattr(upper, "trusted.overlay.opaque", b"y")
    dirs = ["--upperdir", str(upper), "--lowerdir", str(lower)]
    exported = tmp_path / "layer.tar"
    subprocess.run(LAYERFS + ["export", *dirs, "-o", str(exported)], capture_output=True, check=True)
    committed = subprocess.run(
        LAYERFS + ["commit", "--root", str(tmp_path / "a"), *dirs], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    subprocess.run(
        LAYERFS + ["import", "--root", str(tmp_path / "b"), f"rootfs:{exported}", "x"], capture_output=True, check=True
    )
    unpacked = tmp_path / "b/layers" / committed[1].split(":")[1]
    assert os.getxattr(committed[0], "trusted.overlay.opaque") == os.getxattr(unpacked, "trusted.overlay.opaque")
    assert_same(
        snapshot_upper(committed[0]),
        snapshot_upper(unpacked),
        what="committed vs exported, unpacked",
        names=("committed", "unpacked"),
    )
