"""Owner mapping and squashing (fuse-overlayfs's uidmapping, gidmapping, squash_to_*, static_nlink), with
fuse-overlayfs itself as the oracle: the same layers and the same operations on both, compared by the
owners the mount shows and the owners the upper layer stores."""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import LAYERFS, is_mounted
from pair import run_as

# Stored owners of the lower layer's entries: inside and outside the mappings below, and their edges.
LOWER_OWNERS = {
    "root-file": (0, 0),
    "one": (1, 1),
    "edge": (65536, 65536),
    "outside": (70000, 70001),
    "dir": (0, 0),
    "dir/deep": (1, 1),
    "link": (1, 1),
}
MAPPED = "uidmapping=:0:1000:1:1:110000:65536,gidmapping=:0:2000:1:1:120000:65536"
CASES = {
    "mapping": MAPPED,
    "mapping-without-leading-colon": "uidmapping=0:100000:65536,gidmapping=0:200000:1:1:200001:100",
    "squash-to-root": "squash_to_root",
    "squash-to-ids-over-root": "squash_to_root,squash_to_uid=7,squash_to_gid=8",
    "mapping-and-squashed-uid": MAPPED + ",squash_to_uid=5",
    "static-nlink": MAPPED + ",static_nlink",
}
# A caller whose ids the mappings above show (host 110005/120005 is stored as 6/6 under MAPPED).
USER_UID, USER_GID = 110005, 120005


def build_lower(root: Path) -> None:
    (root / "dir" / "deep").mkdir(parents=True)
    (root / "dir").chmod(0o777)
    for name in ("root-file", "one", "edge", "outside"):
        (root / name).write_text(name)
    (root / "link").symlink_to("one")
    for name, (uid, gid) in LOWER_OWNERS.items():
        os.chown(root / name, uid, gid, follow_symlinks=False)


def owners(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``root``: uid, gid, and link count for directories. (Without static_nlink, a
    merged directory shows 1 on layerfs, as on kernel overlayfs, and its subdirectories + 2 on
    fuse-overlayfs: the comparison below leaves that out.)"""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_uid, st.st_gid, st.st_nlink if stat.S_ISDIR(st.st_mode) else 0)
    return found


def user_creates(mnt: Path) -> None:
    (mnt / "dir" / "by-user").write_text("x")
    (mnt / "dir" / "user-dir").mkdir()
    (mnt / "dir" / "user-link").symlink_to("by-user")


def exercise(mnt: Path) -> dict:
    """The same operations on either mount; what it shows before and after them."""
    before = owners(mnt)
    (mnt / "by-root").write_text("x")
    run_as(USER_UID, USER_GID, user_creates, mnt)
    os.chown(mnt / "one", USER_UID, USER_GID)  # a shown id: stored mapped back
    os.chown(mnt / "outside", 50, -1)  # an id no mapping shows: stored as the overflow id
    os.chown(mnt / "dir" / "deep", -1, 1000)
    os.chown(mnt / "link", 1000, 2000, follow_symlinks=False)
    return {"before": before, "after": owners(mnt)}


def stored(upper: Path) -> dict[str, tuple[int, int, int]]:
    """The upper layer's owners of what the operations made or changed (fuse-overlayfs's markers aside)."""
    return {
        path: ids
        for path, ids in owners(upper).items()
        if not Path(path).name.startswith(".wh.") and path not in ("dir",)
    }


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_owners_shown_and_stored_as_fuse_overlayfs_does(tmp_path, mounts, public_base, options):
    results = {}
    for name in ("fuse-overlayfs", "layerfs"):
        base = tmp_path / name
        lower, upper, work = base / "lower", base / "upper", base / "work"
        for d in (upper, work):
            d.mkdir(parents=True)
        build_lower(lower)
        mount = mounts.fuse_overlayfs if name == "fuse-overlayfs" else mounts.layerfs
        mnt = mount(public_base / name, [lower], upper, work, options)
        seen = exercise(mnt)
        mounts.unmount(mnt)
        results[name] = {**seen, "stored": stored(upper)}
    if "static_nlink" not in options:
        for shown in (r[when] for r in results.values() for when in ("before", "after")):
            shown.update((path, ids[:2]) for path, ids in shown.items())
    assert results["layerfs"] == results["fuse-overlayfs"]
    # Not trivially: every case shows other owners than the lower stores.
    assert {path: ids[:2] for path, ids in results["layerfs"]["before"].items()} != LOWER_OWNERS


def test_without_options_owners_are_shown_as_stored(tmp_path, mounts):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (upper, work):
        d.mkdir()
    build_lower(lower)
    mnt = mounts.layerfs(tmp_path / "mnt", [lower], upper, work)
    assert {path: ids[:2] for path, ids in owners(mnt).items()} == LOWER_OWNERS


@pytest.mark.parametrize(
    "bad, message",
    [
        ("uidmapping=0:100000", "uidmapping=0:100000: not a list of ID:MAPPED-ID:COUNT ranges"),
        ("gidmapping=0:x:1", "gidmapping=0:x:1: not a list of ID:MAPPED-ID:COUNT ranges"),
        ("uidmapping=0:100:10:5:200:10", "uidmapping=0:100:10:5:200:10: a range is empty or two overlap"),
        ("uidmapping=0:100:10:20:105:10", "uidmapping=0:100:10:20:105:10: a range is empty or two overlap"),
        ("uidmapping=0:100:0", "uidmapping=0:100:0: a range is empty or two overlap"),
        ("uidmapping=0:4294967295:2", "uidmapping=0:4294967295:2: ids beyond 2^32"),
        ("squash_to_uid=-1", "squash_to_uid=-1: not an id"),
    ],
)
def test_a_bad_mapping_is_refused_in_one_line_and_nothing_is_mounted(tmp_path, bad, message):
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    result = subprocess.run(
        LAYERFS + ["-o", f"lowerdir={lower},{bad}", str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr == f"layerfs: {message}\n"
    assert not is_mounted(mnt)


def test_an_exported_layer_holds_the_stored_owners(tmp_path, mounts, public_base):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (upper, work):
        d.mkdir()
    build_lower(lower)
    mnt = mounts.layerfs(public_base / "mnt", [lower], upper, work, MAPPED)
    run_as(USER_UID, USER_GID, user_creates, mnt)
    assert (mnt / "dir" / "by-user").stat().st_uid == USER_UID
    subprocess.run(
        LAYERFS + ["export", "-o", str(tmp_path / "layer.tar"), str(mnt)], check=True, capture_output=True, timeout=60
    )
    with tarfile.open(tmp_path / "layer.tar") as tar:
        member = tar.getmember("dir/by-user")
    assert (member.uid, member.gid) == (6, 6)  # the ids the image's layers (and user namespaces) speak
