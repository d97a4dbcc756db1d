"""Differential tests: layerfs against kernel overlayfs, the reference.

The same lower layers are rendered twice (the kernel always gets the overlay whiteout form, layerfs gets
the overlay or the OCI form), each copy is mounted with an empty upper, and the same operations are
applied to both mounts. After every step the outcomes (errno, or what was read/listed/written) and the
state of the touched paths and their parents must be equal; at the end the whole visible trees, then,
after unmounting, the upper layers (same whiteouts and opaque markers), and finally the tree layerfs shows
when mounted again.

The one deliberate difference: renaming a directory that has lower parts. Kernel overlayfs (without
redirect_dir) answers EXDEV; layerfs copies the subtree up and renames it. On the kernel side the test
then does what ``mv`` does (copy the tree preserving everything, remove the source) and carries on, so
both sides must again agree from there on. Where no copy can stand in for the rename (hard links into
the tree; the rename asked by an ordinary user, whose mv could not keep owners) the step is left out on
both sides. In the upper layers, an opaque mark on a directory with nothing below it to hide is not
compared: overlayfs puts one on every directory moved into a merged one (see twin.py).

Times: mtimes compare as "kept" (exact, set by the trees or by utime) or "recent" (changed now); see
snapshot.py. The random run's size: ``LAYERFS_DIFF_SEED`` (one seed or a comma list) and
``LAYERFS_DIFF_OPS`` (operations per run) override the default CI mix.
"""

from __future__ import annotations

import os
import stat

import pytest
from fsops import Op, RandomOps, visible_kinds
from pair import USER
from snapshot import assert_same, snapshot
from treespec import (
    Dir,
    File,
    HardLink,
    Meta,
    Special,
    Symlink,
    TreeSpec,
    Whiteout,
    describe,
    generate,
    merge,
    render_all,
)
from twin import Twin

T0 = 1_200_000_000 * 10**9  # a fixed, old mtime for the hand-written scenario tree


# -- the generated trees themselves ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_generated_tree_is_what_the_model_says_and_renders_reproducibly(seed, mounts, tmp_path):
    """Two renders of one spec mounted with kernel overlayfs show the same tree, and that tree is the
    generator's model of it: the differential runs below rest on both."""
    spec = generate(seed)
    views = []
    for side in ("a", "b"):
        lowers = render_all(spec, tmp_path / side, "overlay")
        views.append(snapshot(mounts.overlay(tmp_path / side / "mnt", lowers)))
    assert_same(views[0], views[1], what="two kernel mounts of the same spec")
    assert set(views[0].entries) - {"."} == set(merge(reversed(spec.layers)))
    kinds = {views[0].entries[p].kind for p in views[0].entries}
    assert {"file", "dir", "symlink", "fifo", "chr"} <= kinds
    assert views[0].link_groups(), "the tree should have hard links"


@pytest.mark.parametrize("form", ["overlay", "oci"])
def test_layerfs_shows_generated_tree_like_kernel(form, mounts, tmp_path):
    twin = Twin.from_spec(mounts, tmp_path, generate(11), form)
    twin.finish()


# -- scripted scenarios ----------------------------------------------------------------------------


def _m(mode: int, uid: int = 0, gid: int = 0, xattrs: tuple = ()) -> Meta:
    return Meta(mode, uid, gid, T0, xattrs)


D, F = _m(0o755), _m(0o644)


def scenario_spec() -> TreeSpec:
    """A small hand-written stack with each situation the scenarios need, named for what it is."""
    bottom = {
        "etc": Dir(D),
        "etc/passwd": File(b"root:x:0:0\n" * 50, F),
        "etc/group": File(b"root:x:0:\n", F),
        "etc/hosts": File(b"127.0.0.1 localhost\n", F),
        "bin": Dir(D),
        "bin/sh": File(b"\x7fELF" + bytes(5000), _m(0o755)),
        "bin/su": File(b"su", _m(0o4755)),
        "bin/wall": File(b"wall", _m(0o2755, 0, 5)),
        "data": Dir(_m(0o775, 1000, 1000)),
        "data/a.txt": File(b"alpha\n", _m(0o644, 1000, 1000)),
        "data/b.txt": File(b"bravo\n" * 1000, F),
        "data/sub": Dir(D),
        "data/sub/c.txt": File(b"charlie", F),
        "gone": Dir(D),
        "gone/x": File(b"x", F),
        "gonefile": File(b"old", F),
        "full": Dir(D),
        "full/f1": File(b"1", F),
        "empty": Dir(D),
        "mixed": Dir(D),
        "mixed/m1": File(b"m1", F),
        "opaq": Dir(D),
        "opaq/old": File(b"hidden by opaque", F),
        "hl1": File(b"shared inode\n", F),
        "hl2": HardLink("hl1"),
        "hl4": File(b"another shared inode\n", F),
        "hl5": HardLink("hl4"),
        "rel-link": Symlink("etc/passwd", F),
        "abs-link": Symlink("/data/a.txt", F),
        "dangling": Symlink("no/such/file", F),
        "fifo": Special(stat.S_IFIFO, 0, _m(0o644)),
        "attrs": File(b"x", _m(0o644, xattrs=(("user.a", b"1"), ("user.b", b"2")))),
        "secret": File(b"s3cret", _m(0o600, 1000, 1000)),
        "dir-with-deleted": Dir(D),
        "dir-with-deleted/only": File(b"o", F),
    }
    middle = {
        "gone": Whiteout(),
        "gonefile": Whiteout(),
        "data": Dir(_m(0o775, 1000, 1000)),
        "data/a.txt": File(b"alpha v2\n", _m(0o644, 1000, 1000)),
        "opaq": Dir(D, opaque=True),
        "opaq/new": File(b"new", F),
        "mixed": Dir(D),
        "mixed/m2": File(b"m2", F),
        "dir-with-deleted": Dir(D),
        "dir-with-deleted/only": Whiteout(),
    }
    top = {
        "data": Dir(_m(0o775, 1000, 1000)),
        "data/new.txt": File(b"new in top\n", F),
        "etc": Dir(D),
        "etc/hostname": File(b"box\n", F),
    }
    return TreeSpec(0, [top, middle, bottom])


def O(name: str, *args) -> Op:  # noqa: E743 - short on purpose: the scenarios read as scripts
    return Op(name, args)


SCENARIOS: dict[str, list[Op]] = {
    "write_to_lower_file": [
        O("write", "etc/passwd", 5, b"XYZ"),
        O("read", "etc/passwd", 0, 1 << 20),
        O("write", "bin/sh", 10_000, b"past the end"),
        O("read", "bin/sh", 0, 1 << 20),
        O("read_after_write", "data/a.txt", 2, b"--"),
    ],
    "append": [
        O("append", "etc/hosts", b"10.0.0.1 other\n"),
        O("append", "hl1", b"through one link\n"),
        O("read", "hl2", 0, 4096),
        O("append", "data/new.txt", b"more\n"),
        O("read", "data/new.txt", 0, 4096),
    ],
    "truncate": [
        O("truncate", "etc/passwd", 0),
        O("truncate", "data/b.txt", 100_000),
        O("ftruncate", "data/a.txt", 3),
        O("truncate", "bin/su", 1),
        O("truncate", "empty", 0),
        O("read", "data/b.txt", 0, 1 << 20),
        O("create", "etc/group", "trunc", 0o644, b""),
    ],
    "excl_create": [
        O("open_excl", "etc/hosts", 0o644),
        O("open_excl", "gonefile", 0o600),
        O("unlink", "data/a.txt"),
        O("open_excl", "data/a.txt", 0o640),
        O("open_excl", "data/a.txt", 0o640),
        O("create", "gone", "excl", 0o644, b"file where a dir was deleted"),
        O("open_excl", "rel-link", 0o644),
        O("open_excl", "dangling", 0o644),
    ],
    "unlink_then_recreate": [
        O("unlink", "data/a.txt"),
        O("stat", "data/a.txt"),
        O("listdir", "data"),
        O("create", "data/a.txt", "", 0o600, b"recreated"),
        O("read", "data/a.txt", 0, 100),
        O("unlink", "data/a.txt"),
        O("unlink", "data/new.txt"),
        O("unlink", "data/new.txt"),
        O("unlink", "hl1"),
        O("stat", "hl2"),
        O("unlink", "data"),
        O("listdir", "data"),
        # An open file unlinked: fstat, write and read through the descriptor; with a name left, and without.
        O("unlink_open", "etc/hosts", b"after unlink"),
        O("link", "data/b.txt", "b-link"),
        O("unlink_open", "data/b.txt", b"seen through b-link"),
        O("read", "b-link", 0, 100),
        O("orphan_setattr", "etc/group", 0o600, (T0, T0 + 1)),
        O("orphan_setattr", "bin/su", 0o4700, (T0, T0)),
    ],
    "rmdir": [
        O("rmdir", "full"),
        O("rmdir", "empty"),
        O("rmdir", "gone"),
        O("rmdir", "etc/passwd"),
        O("unlink", "mixed/m1"),
        O("rmdir", "mixed"),
        O("unlink", "mixed/m2"),
        O("rmdir", "mixed"),
        O("rmdir", "dir-with-deleted"),
        O("rmdir", "opaq"),
        O("listdir", "."),
    ],
    "mkdir_over_deleted_dir": [
        O("unlink", "data/sub/c.txt"),
        O("rmdir", "data/sub"),
        O("mkdir", "data/sub", 0o700),
        O("listdir", "data/sub"),
        O("mkdir", "gone", 0o755),
        O("listdir", "gone"),
        O("unlink", "full/f1"),
        O("rmdir", "full"),
        O("mkdir", "full", 0o750),
        O("create", "full/f1", "", 0o644, b"new f1"),
        O("mkdir", "empty", 0o755),
        O("mkdir", "etc/hosts", 0o755),
    ],
    "rename_file_over_lower_file": [
        O("rename", "data/b.txt", "etc/passwd"),
        O("read", "etc/passwd", 0, 1 << 20),
        O("rename", "etc/group", "data/a.txt"),
        O("rename", "data/new.txt", "bin/sh"),
        O("rename", "hl1", "hl2"),
        O("rename", "fifo", "etc/hosts"),
        O("rename", "rel-link", "bin/su"),
        O("rename", "etc/hostname", "empty"),
        O("listdir", "etc"),
        O("listdir", "data"),
    ],
    "rename_over_whited_out_name": [
        O("unlink", "data/a.txt"),
        O("rename", "etc/hosts", "data/a.txt"),
        O("rename", "etc/group", "gonefile"),
        O("rename", "bin/sh", "gone"),
        O("rename", "data/a.txt", "data/a.txt"),
        O("rename", "dir-with-deleted", "x-renamed"),
        O("listdir", "."),
        O("create", "fresh", "", 0o644, b"upper only"),
        O("rename", "fresh", "opaq/old"),
        O("listdir", "opaq"),
    ],
    "hard_link_of_lower_file": [
        O("link", "etc/passwd", "etc/passwd-link"),
        O("stat", "etc/passwd"),
        O("write", "etc/passwd-link", 0, b"ROOT"),
        O("read", "etc/passwd", 0, 16),
        O("link", "hl1", "hl3"),
        O("stat", "hl2"),
        O("stat", "hl1"),
        O("link", "etc", "etc-link"),
        O("link", "rel-link", "link-to-symlink"),
        O("link", "gonefile", "resurrected"),
        O("link", "data/a.txt", "etc/hosts"),
        # A change through one name shows through the other at once (one inode on overlayfs).
        O("stat", "etc/passwd"),
        O("chmod", "etc/passwd-link", 0o600),
        O("chown", "etc/passwd-link", 1000, 1000),
        O("append", "etc/passwd-link", b"more"),
        O("stat", "etc/passwd"),
        O("unlink", "etc/passwd-link"),
        O("stat", "etc/passwd"),
        # Opening one name of a lower hard link for writing copies it up and breaks the link at once.
        O("stat", "hl4"),
        O("write", "hl4", 0, b""),
        O("stat", "hl4"),
        O("stat", "hl5"),
    ],
    "chmod_chown_utime_of_lower_entries": [
        O("chmod", "bin/su", 0o755),
        O("chmod", "secret", 0o644),
        O("chown", "secret", 0, 0),
        O("chown", "bin/su", 1000, -1),
        O("chown", "bin/wall", -1, 1000),
        O("chown", "rel-link", 33, 33),
        O("utime", "data/a.txt", (T0 + 5, T0 + 7)),
        O("utime", "etc", (T0, T0 + 9)),
        O("utime", "abs-link", None),
        O("chmod", "data", 0o2770),
        O("chown", "data", 0, 0),
        O("chmod", "fifo", 0o600),
        O("utime", "gone", None),
    ],
    "xattrs": [
        O("setxattr", "attrs", "user.c", b"3", 0),
        O("removexattr", "attrs", "user.a"),
        O("removexattr", "attrs", "user.missing"),
        O("setxattr", "attrs", "user.b", b"22", os.XATTR_CREATE),
        O("setxattr", "attrs", "user.zz", b"", os.XATTR_REPLACE),
        O("listxattr", "attrs"),
        O("getxattr", "attrs", "user.b"),
        O("setxattr", "etc", "user.dir", b"d", 0),
        O("setxattr", "fifo", "user.no", b"x", 0),
        O("setxattr", "rel-link", "user.no", b"x", 0),
        O("setxattr", "secret", "trusted.test", b"t", 0),
        O("removexattr", "secret", "user.none"),
        O("listxattr", "secret"),
    ],
    "symlink_and_fifo": [
        O("symlink", "etc/passwd", "new-link"),
        O("symlink", "x", "rel-link"),
        O("symlink", "/abs/target", "gone"),
        O("unlink", "dangling"),
        O("symlink", "other", "dangling"),
        O("mknod", "pipe", stat.S_IFIFO, 0, 0o640),
        O("mknod", "fifo", stat.S_IFIFO, 0, 0o640),
        O("unlink", "fifo"),
        O("mknod", "fifo", stat.S_IFIFO, 0, 0o600),
        O("mknod", "null", stat.S_IFCHR, os.makedev(1, 3), 0o666),
        O("mknod", "fake-whiteout", stat.S_IFCHR, os.makedev(0, 0), 0o600),
        O("listdir", "."),
    ],
    "directory_renames": [
        O("mkdir", "newdir", 0o755),
        O("create", "newdir/f", "", 0o644, b"f"),
        O("rename", "newdir", "moved"),
        # A directory holding a whiteout, its mtime set: a rename keeps the mtime (so does mv).
        O("unlink", "data/b.txt"),
        O("utime", "data", (T0, T0 + 3)),
        O("rename", "data", "data2"),
        O("listdir", "data2"),
        O("rename", "etc", "empty"),
        O("rename", "bin", "full"),
        O("rename", "opaq", "opaq/inside"),
        O("rename", "mixed", "gone"),
        O("listdir", "gone"),
        O("rename", "moved", "data"),
        O("listdir", "."),
    ],
}


@pytest.mark.parametrize("form", ["overlay", "oci"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(name, form, mounts, tmp_path):
    twin = Twin.from_spec(mounts, tmp_path, scenario_spec(), form)
    for op in SCENARIOS[name]:
        twin.step(op)
    twin.finish()


# -- the seeded random run -------------------------------------------------------------------------


_COPY_UP_MODES = {"redirect": (True, False), "no-redirect": (False, False), "metacopy": (True, True)}


def _runs() -> list[tuple[int, str, int, str]]:
    """(seed, whiteout form, operations, copy-up mode): the CI mix, or what LAYERFS_DIFF_SEED/_OPS ask for.
    Of the eight runs, two rename directories without redirects (the kernel's EXDEV, layerfs's tree copy)
    and two copy metadata alone where it changes (metacopy=on on both sides)."""
    ops = int(os.environ.get("LAYERFS_DIFF_OPS", "500"))
    seeds = os.environ.get("LAYERFS_DIFF_SEED")
    if seeds:
        return [
            (int(s), form, ops, mode)
            for s in seeds.split(",")
            for form in ("overlay", "oci")
            for mode in _COPY_UP_MODES
        ]
    modes = ("redirect",) * 4 + ("no-redirect",) * 2 + ("metacopy",) * 2
    return [
        (seed, ("overlay", "oci")[i % 2], ops, mode)
        for i, (seed, mode) in enumerate(zip((101, 202, 303, 404, 505, 606, 707, 808), modes, strict=True))
    ]


USER_SHARE = 0.2

# Whole-tree comparisons between the final one; LAYERFS_DIFF_CHECK_EVERY=1 finds the first divergent step.
CHECK_TREES_EVERY = int(os.environ.get("LAYERFS_DIFF_CHECK_EVERY", "100"))


@pytest.mark.parametrize("seed,form,n_ops,mode", _runs(), ids=lambda v: str(v))
def test_random_operations_match_kernel_overlayfs(seed, form, n_ops, mode, mounts, tmp_path, public_base):
    """Random operations, a share of them as an ordinary user (uid 1000, who owns part of the tree), so
    that permission checks are compared as well."""
    spec = generate(seed)
    print(
        f"differential random run: {describe(spec)}; layerfs lowers in {form} form; {n_ops} operations"
        f" (rerun: LAYERFS_DIFF_SEED={seed} LAYERFS_DIFF_OPS={n_ops})"
    )
    redirect_dir, metacopy = _COPY_UP_MODES[mode]
    twin = Twin.from_spec(
        mounts, tmp_path, spec, form, mount_base=public_base, redirect_dir=redirect_dir, metacopy=metacopy
    )
    ops = RandomOps(seed, spec, user=USER, user_share=USER_SHARE)
    outcomes: dict[str, int] = {}
    for i in range(1, n_ops + 1):
        op = ops.next(visible_kinds(twin.kernel))
        result = twin.step(op)
        key = f"{op.name}{' (user)' if op.uid is not None else ''} {result[0] if result[0] != 'err' else result[1]}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if i % CHECK_TREES_EVERY == 0:
            twin.check_trees()
    twin.finish()
    print(
        f"done: {twin.renames_by_copy} directory renames done by copy on the kernel side (EXDEV there),"
        f" {twin.skipped} left out;"
        f" outcomes: {dict(sorted(outcomes.items()))}"
    )
    # The run must have exercised the interesting paths, or it proves little.
    assert sum(v for k, v in outcomes.items() if k.endswith(" ok")) > n_ops // 3
    assert any(k.startswith("rename ok") for k in outcomes)
