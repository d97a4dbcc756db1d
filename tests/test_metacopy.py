"""Metadata-only copy-up (``metacopy=on``), held against kernel overlayfs mounted with
``metacopy=on,redirect_dir=on``, and what is built on an upper that has such copies.

The same changes run through both over two copies of the same lowers: chown -R of a tree, chmod, times
and an xattr of lower files, renames in a directory and out of it (the copy finds its data through a
redirect), a link, then a write, a truncate, an O_TRUNC open and a writable open that writes nothing (the
data comes up then, a file capability kept, and the mtime of that open, as on the kernel). Then:

- the trees are the same (contents, owners, modes, times, xattrs, link counts, and the blocks a
  metadata-only copy shows, its data's); the uppers hold the same entries and the same marks (which files
  are metadata only, their redirects, their origins' lower files), and the files whose metadata alone
  changed take no data blocks;
- each implementation reads the upper the other wrote to the same tree;
- ``diff`` (a walk and the index) is the two trees' difference; the exported OCI layer carries the full
  content of every metadata-only copy (umoci applies it over the lowers to the merged tree), and so does
  a committed layer;
- a daemon killed with SIGKILL while data is being copied in leaves every file whole: its old content or
  its new one, never the zeros of an unfinished copy.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_journal_complete
from pair import walk, write
from processes import daemon_pids
from snapshot import assert_same, snapshot
from test_export import assert_umoci_gives
from treediff import two_tree_changes

from layerfs import syscalls
from layerfs.core.changes import changes, indexed_changes
from layerfs.core.index import read_index
from layerfs.store import Store

KERNEL_OPTIONS = "metacopy=on,redirect_dir=on"
OLD_NS = 1_500_000_000_123_456_789  # lower files' times: far from "now", so a change of them shows
# cap_net_bind_service, permitted and effective (struct vfs_cap_data, revision 2)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
METACOPY = "trusted.overlay.metacopy"


def build_lowers(bottom: Path, top: Path) -> None:
    rng = random.Random(5)
    for d in range(4):
        for f in range(25):
            write(bottom / f"usr/lib/d{d}/f{f}", rng.randbytes(rng.choice((1, 700, 5000, 70_000))))
    write(bottom / "usr/lib/big", rng.randbytes(3 << 20))
    write(bottom / "usr/lib/empty", b"")
    os.link(bottom / "usr/lib/d0/f0", bottom / "usr/lib/d0/f0-link")
    write(bottom / "usr/bin/ping", rng.randbytes(9000), 0o755)
    os.setxattr(bottom / "usr/bin/ping", "security.capability", CAPABILITY)
    write(top / "usr/lib/d1/f1", b"changed in the top layer\n" * 400)  # data in the top lower layer
    write(bottom / "etc/conf", b"key = value\n" * 100)
    for root in (bottom, top):
        for rel, st in walk(root):
            if not stat.S_ISDIR(st.st_mode):
                os.utime(root / rel, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


def metadata_changes(mnt: Path) -> None:
    for rel, _ in list(walk(mnt / "usr/lib")):
        os.chown(mnt / "usr/lib" / rel, 1000, 1000, follow_symlinks=False)
    os.chmod(mnt / "etc/conf", 0o600)
    os.utime(mnt / "usr/bin/ping", ns=(OLD_NS + 7, OLD_NS + 7))
    os.setxattr(mnt / "usr/lib/d2/f3", "user.note", b"kept")
    os.rename(mnt / "usr/lib/d0/f1", mnt / "usr/lib/d0/f1-renamed")  # in its directory: a relative redirect
    os.rename(mnt / "usr/lib/d0/f2", mnt / "etc/f2-moved")  # elsewhere: an absolute one
    os.rename(mnt / "usr/lib/d3/f4", mnt / "usr/lib/d3-f4")  # a lower file never copied up, moved
    os.link(mnt / "usr/lib/d1/f1", mnt / "etc/f1-link")  # a second name anywhere: an absolute redirect


def data_changes(mnt: Path) -> None:
    with open(mnt / "usr/lib/d2/f3", "ab") as f:
        f.write(b"appended")
    os.truncate(mnt / "etc/f2-moved", 100)
    with open(mnt / "usr/lib/d0/f1-renamed", "wb") as f:  # O_TRUNC: no data needs copying
        f.write(b"replaced")
    os.close(os.open(mnt / "usr/bin/ping", os.O_WRONLY))  # data copied in, the capability kept


def blocks(mnt: Path, rels: list[str]) -> dict[str, int]:
    return {rel: os.lstat(mnt / rel).st_blocks for rel in rels}


def upper_marks(upper: Path, lowers_base: Path) -> dict[str, tuple]:
    """Each upper entry by meaning: its type, whether it is a metadata-only copy, its redirect, and the
    lower file its origin names (as a path below ``lowers_base``, each side has its own copy)."""
    marks = {}
    for rel, st in walk(upper):
        path = upper / rel
        names = os.listxattr(path, follow_symlinks=False)
        redirect = (
            os.getxattr(path, "trusted.overlay.redirect", follow_symlinks=False)
            if "trusted.overlay.redirect" in names
            else None
        )
        marks[rel] = (stat.S_IFMT(st.st_mode), METACOPY in names, redirect, _origin(path, names, lowers_base))
    return marks


def _origin(path: Path, names: list[str], lowers_base: Path) -> str | None:
    if "trusted.overlay.origin" not in names:
        return None
    record = os.getxattr(path, "trusted.overlay.origin", follow_symlinks=False)
    mount_fd = os.open(lowers_base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = syscalls.open_by_handle(mount_fd, record[4], record[21:], os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        return f"<{errno.errorcode[e.errno]}>"
    finally:
        os.close(mount_fd)
    try:
        return os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), lowers_base)
    finally:
        os.close(fd)


def test_metadata_only_copies_match_kernel_overlayfs_and_everything_built_on_them(mounts, tmp_path):
    sides = {}
    for name in ("kernel", "layerfs"):
        base = tmp_path / name
        bottom, top = base / "bottom", base / "top"
        build_lowers(bottom, top)
        (base / "upper").mkdir(), (base / "work").mkdir()
        sides[name] = (base, base / "upper", base / "work", [top, bottom])
    k_base, k_upper, k_work, k_lowers = sides["kernel"]
    l_base, l_upper, l_work, l_lowers = sides["layerfs"]

    kernel = mounts.overlay(tmp_path / "k-mnt", k_lowers, k_upper, k_work, KERNEL_OPTIONS)
    mine = mounts.layerfs(tmp_path / "l-mnt", l_lowers, l_upper, l_work, "metacopy=on")
    metacopies = ["usr/lib/big", "usr/lib/d1/f1", "usr/lib/d3-f4", "etc/conf", "etc/f2-moved"]
    for mnt in (kernel, mine):
        metadata_changes(mnt)
    assert_same(snapshot(kernel), snapshot(mine), what="trees after metadata changes", names=("kernel", "layerfs"))
    assert blocks(mine, metacopies) == blocks(kernel, metacopies)  # a metadata-only copy shows its data's
    for mnt in (kernel, mine):
        data_changes(mnt)
    merged = snapshot(kernel)
    assert_same(merged, snapshot(mine), what="trees after data changes", names=("kernel", "layerfs"))
    assert merged.entries["usr/bin/ping"].xattrs == (("security.capability", CAPABILITY),)
    assert merged.entries["usr/lib/d1/f1"].uid == 1000 and merged.entries["usr/lib/d0/f0-link"].uid == 1000
    mounts.unmount(kernel)
    mounts.unmount(mine)

    marks = upper_marks(l_upper, l_base)
    assert marks == upper_marks(k_upper, k_base)
    assert marks["usr/lib/big"][1:3] == (True, None) and marks["etc/f2-moved"][1] is False
    assert marks["usr/lib/d0/f1-renamed"][1:3] == (False, b"f1")  # (O_TRUNC: data of its own, the redirect kept)
    assert marks["usr/lib/d3-f4"][1:] == (True, b"/usr/lib/d3/f4", "bottom/usr/lib/d3/f4")
    assert marks["etc/f1-link"][1:3] == (True, b"/usr/lib/d1/f1")
    # Metadata alone: the data of the files whose metadata alone changed stayed below.
    lower_bytes = sum(st.st_size for rel, st in walk(l_lowers[1] / "usr/lib") if stat.S_ISREG(st.st_mode))
    upper_blocks = sum(st.st_blocks for _, st in walk(l_upper / "usr/lib") if stat.S_ISREG(st.st_mode))
    assert upper_blocks * 512 < lower_bytes // 10, (upper_blocks * 512, lower_bytes)

    # Each reads the other's upper.
    for reader, upper, lowers in (("kernel", l_upper, k_lowers), ("layerfs", k_upper, l_lowers)):
        work = tmp_path / f"{reader}-reads-work"
        work.mkdir()
        mnt = (
            mounts.overlay(tmp_path / f"{reader}-reads", lowers, upper, work, KERNEL_OPTIONS)
            if reader == "kernel"
            else mounts.layerfs(tmp_path / f"{reader}-reads", lowers, upper, work)
        )
        assert_same(merged, snapshot(mnt), what=f"{reader} over the other's upper", names=("kernel", reader))
        mounts.unmount(mnt)

    # diff: the two trees' difference, from a walk and from the index.
    lowers = [str(p) for p in l_lowers]
    image = mounts.overlay(tmp_path / "image", l_lowers)
    container = mounts.overlay(tmp_path / "container", [l_upper] + l_lowers, extra="metacopy=on,redirect_dir=follow")
    walked = changes(str(l_upper), lowers)
    assert [str(c) for c in walked] == two_tree_changes(image, container)
    # Every metadata-only copy with data to read is reported with where it is, wherever the copy went.
    assert {c.path for c in walked if c.data} == {
        "/" + rel for rel, mark in marks.items() if mark[1] and os.lstat(l_upper / rel).st_size
    }
    assert next(c.data for c in walked if c.path == "/etc/f1-link") == (str(l_lowers[0]), "/usr/lib/d1/f1")
    assert next(c.data for c in walked if c.path == "/usr/lib/d3-f4") == (str(l_lowers[1]), "/usr/lib/d3/f4")
    with read_index(str(l_upper), str(l_work / "layerfs-index"), lowers=lowers) as index:
        assert_journal_complete(index)
        assert indexed_changes(index, lowers) == walked
    # Metadata put back as it was: no change, though the file is still a metadata-only copy.
    os.chown(l_upper / "usr/lib/big", 0, 0)
    os.utime(l_upper / "usr/lib/big", ns=(OLD_NS, OLD_NS))
    unchanged = changes(str(l_upper), lowers, unchanged_copies=False)
    assert "/usr/lib/big" not in {c.path for c in unchanged} and "/usr/lib/d2/f3" in {c.path for c in unchanged}
    os.chown(l_upper / "usr/lib/big", 1000, 1000)

    # The OCI layer, applied by umoci over the lowers, gives the merged tree.
    assert_umoci_gives(container, tmp_path, l_lowers, l_upper, walked)

    # A committed layer over the lowers, mounted read-only: the merged tree again, every file whole.
    committed = Store(str(tmp_path / "store")).commit(str(l_upper), walked)
    assert not any(
        METACOPY in os.listxattr(Path(committed.path) / rel, follow_symlinks=False)
        for rel, st in walk(Path(committed.path))
        if stat.S_ISREG(st.st_mode)
    )
    again = mounts.overlay(tmp_path / "committed", [Path(committed.path)] + l_lowers)
    assert_same(
        snapshot(container),
        snapshot(again),
        what="the committed layer over the lowers",
        names=("container", "committed"),
    )


WRITER = """
import os, sys
mnt = sys.argv[1]
for name in sorted(os.listdir(mnt)):
    os.chown(os.path.join(mnt, name), 1000, 1000)
    with open(os.path.join(mnt, name), "ab") as f:
        f.write(b"!")
"""


def _caught_filling(upper: Path) -> bool:
    """Whether the upper holds a metadata-only copy whose data was being copied in."""
    return any(
        METACOPY in os.listxattr(upper / rel) and st.st_blocks * 512 > 64 << 10
        for rel, st in walk(upper)
        if stat.S_ISREG(st.st_mode)
    )


def test_a_killed_daemon_leaves_every_file_whole(layers, mounts, tmp_path):
    """A process gives lower files of 16 MiB a new owner (a metadata-only copy) and appends to each (its
    data comes up first); the daemon is killed with SIGKILL at a random moment, over a fresh upper each
    round, until three kills have come while a file's data was being copied in. After each remount every
    file holds its lower content, with the byte appended or without it, and the index agrees with a walk."""
    lower = layers.dir("lower")
    rng = random.Random(3)
    contents = {f"f{i}": rng.randbytes(16 << 20) for i in range(6)}
    for name, data in contents.items():
        write(lower / name, data)
    mnt = tmp_path / "mnt"
    caught = 0
    for round_ in range(20):
        upper, work = layers.dir(f"upper{round_}"), layers.dir(f"work{round_}")
        mounts.layerfs(mnt, [lower], upper, work, "metacopy=on")
        worker = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt)], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.03, 0.25))
        (daemon,) = daemon_pids(mnt)
        os.kill(daemon, signal.SIGKILL)
        worker.wait(timeout=30)
        mounts.unmount(mnt)
        caught += _caught_filling(upper)
        mounts.layerfs(mnt, [lower], upper, work, "metacopy=on")
        for name, data in contents.items():
            now = (mnt / name).read_bytes()
            assert now in (data, data + b"!"), f"round {round_}: {name} holds {len(now)} bytes, not its content"
        mounts.unmount(mnt)
        with read_index(str(upper), str(work / "layerfs-index"), lowers=[str(lower)]) as index:
            assert indexed_changes(index, [str(lower)]) == changes(str(upper), [str(lower)])
        if caught == 3:
            break
    assert caught == 3, f"only {caught} of {round_ + 1} kills came while data was being copied in"
