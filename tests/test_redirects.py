"""Directory renames by redirect (``redirect_dir``, layerfs's default), held against kernel overlayfs, and
what is built on an upper that has them.

The same moves run through layerfs and through kernel overlayfs mounted with ``redirect_dir=on``, over
two copies of the same lowers: a populated lower directory renamed in its parent (a relative redirect),
then into another directory (an absolute one), a directory inside it renamed too, files inside changed,
deleted and added, an exchange. Then:

- the trees are the same, and layerfs's upper holds the moved directories themselves, not their
  thousands of files: the rename costs the same whatever the directory holds;
- each implementation reads the upper the other wrote to the same tree;
- ``diff`` (a walk of the upper, and the change index) is the difference between the lowers' tree and
  the merged one: the old name deleted, the new one added with all it shows, as docker diff shows it;
- the exported OCI layer carries the moved directories whole (a layer has no redirects): umoci applies
  it over the lowers to the merged tree; a committed layer mounted over the lowers gives it too;
- layerfs with ``redirect_dir=off`` copies the tree instead, and the kernel (which follows redirects
  whatever it makes) reads both forms alike.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_journal_complete
from pair import walk, whiteout, write
from processes import daemon_pids
from snapshot import assert_same, snapshot
from test_export import assert_umoci_gives
from treediff import two_tree_changes

from layerfs import syscalls
from layerfs.core.changes import changes, indexed_changes
from layerfs.core.index import read_index
from layerfs.store import Store

FILES = 2_000  # in the directory that moves: 100 directories of 20 files


def build_lowers(bottom: Path, top: Path) -> None:
    for d in range(FILES // 20):
        for f in range(20):
            write(bottom / f"usr/share/doc/pkg{d}/file{f}", f"{d}/{f}\n")
    write(bottom / "usr/share/doc/pkg0/gone", "deleted in the top layer\n")
    (top / "usr/share/doc/pkg0").mkdir(parents=True)
    whiteout(top / "usr/share/doc/pkg0", "gone")
    write(top / "usr/share/doc/pkg1/added", "from the top layer\n")
    write(bottom / "opt/keep", "k\n")
    write(bottom / "srv/a/x", "a\n")
    write(bottom / "srv/b/y", "b\n")


def moves(mnt: Path) -> None:
    os.rename(mnt / "usr/share/doc", mnt / "usr/share/docs")  # in its parent: a relative redirect
    os.rename(mnt / "usr/share/docs", mnt / "opt/doc")  # elsewhere: an absolute one
    os.rename(mnt / "opt/doc/pkg2", mnt / "opt/doc/pkg2-renamed")  # a directory inside one moved
    write(mnt / "opt/doc/pkg3/file0", "changed\n")  # copied up below redirects
    os.unlink(mnt / "opt/doc/pkg4/file1")
    write(mnt / "opt/doc/pkg5/new", "new\n")
    os.rename(mnt / "opt/doc/pkg6", mnt / "srv/pkg6")  # a child moved out of the moved directory
    syscalls.exchange(str(mnt / "srv/a"), str(mnt / "srv/b"))  # two lower directories swap names


def upper_entries(upper: Path) -> list[str]:
    return [rel for rel, _ in walk(upper)]


def test_renames_by_redirect_match_kernel_overlayfs_and_everything_built_on_them(layers, mounts, tmp_path):
    sides = {}
    for name in ("kernel", "layerfs"):
        base = tmp_path / name
        bottom, top = base / "bottom", base / "top"
        build_lowers(bottom, top)
        sides[name] = (base / "upper", base / "work", [top, bottom])
        (base / "upper").mkdir(), (base / "work").mkdir()
    k_upper, k_work, k_lowers = sides["kernel"]
    l_upper, l_work, l_lowers = sides["layerfs"]

    kernel = mounts.overlay(tmp_path / "k-mnt", k_lowers, k_upper, k_work, "redirect_dir=on")
    mine = mounts.layerfs(tmp_path / "l-mnt", l_lowers, l_upper, l_work)
    for mnt in (kernel, mine):
        moves(mnt)
    merged = snapshot(kernel)
    assert_same(merged, snapshot(mine), what="trees after the moves", names=("kernel", "layerfs"))
    assert "opt/doc/pkg99/file19" in merged.entries and "usr/share/doc" not in merged.entries
    assert "opt/doc/pkg0/gone" not in merged.entries and "opt/doc/pkg1/added" in merged.entries
    mounts.unmount(kernel)
    mounts.unmount(mine)

    # Constant work whatever the directory holds: the moved directories, not their files, are copied.
    entries = upper_entries(l_upper)
    assert len(entries) < 30, entries
    assert sorted(entries) == sorted(upper_entries(k_upper))

    # Each reads the other's upper.
    for reader, upper, lowers in (("kernel", l_upper, k_lowers), ("layerfs", k_upper, l_lowers)):
        work = tmp_path / f"{reader}-reads-work"
        work.mkdir()
        mount = mounts.overlay if reader == "kernel" else mounts.layerfs
        mnt = mount(tmp_path / f"{reader}-reads", lowers, upper, work)
        assert_same(merged, snapshot(mnt), what=f"{reader} over the other's upper", names=("kernel", reader))
        mounts.unmount(mnt)

    # diff: the difference of the two trees, from a walk and from the index layerfs kept.
    lowers = [str(p) for p in l_lowers]
    image = mounts.overlay(tmp_path / "image", l_lowers)
    container = mounts.overlay(tmp_path / "container", [l_upper] + l_lowers)  # read-only, follows redirects
    expected = two_tree_changes(image, container)
    walked = changes(str(l_upper), lowers)
    # The exchanged directories take names the lowers have: as for an opaque directory, docker's way is D
    # for the directory, then A for all it holds; the two trees say C, then D and A for their content.
    docker_style, two_tree_style = {"D /srv/a", "D /srv/b"}, {"C /srv/a", "C /srv/b", "D /srv/a/x", "D /srv/b/y"}
    walked_text = [str(c) for c in walked]
    assert docker_style <= set(walked_text) and two_tree_style <= set(expected)
    assert [c for c in walked_text if c not in docker_style] == [c for c in expected if c not in two_tree_style]
    assert {"D /usr/share/doc", "A /opt/doc", "A /opt/doc/pkg99/file19", "A /srv/pkg6/file3"} <= set(expected)
    with read_index(str(l_upper), str(l_work / "layerfs-index"), lowers=lowers) as index:
        assert_journal_complete(index)
        assert indexed_changes(index, lowers) == walked

    # The OCI layer, applied by umoci over the lowers, gives the merged tree.
    assert_umoci_gives(container, tmp_path, l_lowers, l_upper, walked)

    # A committed layer over the lowers, mounted read-only: the merged tree again.
    committed = Store(str(tmp_path / "store")).commit(str(l_upper), walked)
    again = mounts.overlay(tmp_path / "committed", [Path(committed.path)] + l_lowers)
    assert_same(
        snapshot(container),
        snapshot(again),
        what="the committed layer over the lowers",
        names=("container", "committed"),
    )


def test_without_redirects_the_tree_is_copied_and_reads_the_same(layers, mounts, tmp_path):
    bottom, top = layers.dir("bottom"), layers.dir("top")
    build_lowers(bottom, top)
    upper, work = layers.dir("upper"), layers.dir("work")
    mnt = mounts.layerfs(tmp_path / "mnt", [top, bottom], upper, work, "redirect_dir=off")
    moves(mnt)
    seen = snapshot(mnt)
    mounts.unmount(mnt)
    assert len(upper_entries(upper)) > FILES  # the moved files, copied
    kernel_work = layers.dir("kernel-work")
    kernel = mounts.overlay(tmp_path / "kernel", [top, bottom], upper, kernel_work)  # no redirect_dir
    assert_same(seen, snapshot(kernel), what="kernel overlayfs over a copied tree", names=("layerfs", "kernel"))


RENAMER = """
import os, random, sys
mnt, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
n = 0
while True:
    names = os.listdir(mnt)
    n += 1
    os.rename(os.path.join(mnt, rng.choice(names)), os.path.join(mnt, f"moved-{seed}-{n}"))
"""


def test_a_killed_daemon_leaves_every_renamed_directory_whole(layers, mounts, tmp_path):
    """A process renames populated lower directories as fast as it can; the daemon is killed with
    SIGKILL at a random moment, ten times. After each remount every directory is there exactly once,
    under one of its names, with all it holds; the change index agrees with a walk of the upper."""
    lower, upper, work = layers.dir("lower"), layers.dir("upper"), layers.dir("work")
    for d in range(4):
        for f in range(50):
            write(lower / f"dir{d}/sub/f{f}", f"{d}/{f}\n")
    contents = {f"sub/f{f}" for f in range(50)} | {"sub"}
    rng = random.Random(7)
    mnt = tmp_path / "mnt"
    renames_cut = 0
    for kill in range(10):
        mounts.layerfs(mnt, [lower], upper, work)
        found = {}
        for name in os.listdir(mnt):
            inside = {rel for rel, _ in walk(mnt / name)}
            assert inside == contents, f"after kill {kill}: {name} holds {sorted(inside ^ contents)[:5]}..."
            found[(mnt / name / "sub/f0").read_text()] = name
        assert sorted(found) == [f"{d}/0\n" for d in range(4)], f"after kill {kill}: {sorted(os.listdir(mnt))}"
        worker = subprocess.Popen([sys.executable, "-c", RENAMER, str(mnt), str(kill)], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.3))
        (daemon,) = daemon_pids(mnt)
        os.kill(daemon, signal.SIGKILL)
        worker.wait(timeout=30)
        renames_cut += worker.returncode != 0
        mounts.unmount(mnt)
        with read_index(str(upper), str(work / "layerfs-index"), lowers=[str(lower)]) as index:
            assert indexed_changes(index, [str(lower)]) == changes(str(upper), [str(lower)])
    assert renames_cut == 10  # every worker was stopped by the kill, in the middle of its renames
