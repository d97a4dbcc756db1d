"""renameat2(RENAME_EXCHANGE) in the core union (``Union.exchange``), held against kernel overlayfs.

The union is driven directly, without FUSE. Each test builds three lower layers and an upper layer in
overlay form, and copies them twice: kernel overlayfs mounts one copy, a ``Union`` opens the other (its
lowers in the whiteout form the test asks for). The same exchanges run on both; after each one the merged
trees must be equal (type, mode, owner, link count, size, content, target, xattrs, mtime), the two entries
must have swapped places, and where the kernel kept an inode number layerfs must keep it too. At the
end the upper layers are compared marker for marker, the change index layerfs kept is checked against a
walk of its upper, a new ``Union`` over the same layers must show the same tree, and so must kernel
overlayfs mounting layerfs's upper over the same lowers.

With ``redirect_dir`` on both sides (``Sides(..., redirect_dir=True)``) a directory with lower parts is
exchanged as any other, by redirect on both. Without it (the default here), the one deliberate
difference: kernel overlayfs answers EXDEV when a directory with lower parts takes part, and layerfs
copies that directory's merged subtree up and exchanges. The
kernel side then does what a program falling back would: three moves through a temporary name, a
directory with lower parts moved the way ``mv`` does (copy, then delete). There the upper layers are
compared with the opaque marks that hide nothing left out (the copy ``mv`` made is opaque where it
replaced a whiteout, or where the kernel moved it into a merged directory; layerfs's copied-up tree only
where a lower layer has its new name).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_journal_complete
from fsops import rename_by_copy, visible_kinds
from pair import (
    FORMS,
    KINDS,
    Stack,
    content,
    copy_tree,
    describe,
    errname,
    explain,
    make_opaque,
    to_oci_form,
    whiteout,
    write,
)
from snapshot import assert_same, normalize_mtime, snapshot_upper, without_idle_opaque

from layerfs.core.changes import changes, indexed_changes
from layerfs.core.index import read_index
from layerfs.core.lookup import join
from layerfs.core.union import INDEX_DIR, Union

OLD_NS = 1_500_000_000 * 10**9  # every entry the builders make gets this atime and mtime (whole seconds)

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2


def exchange_at(a: Path, b: Path) -> None:
    """renameat2(a, b, RENAME_EXCHANGE) on a mounted tree."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def exchange_by_moves(mnt: Path, a: str, b: str) -> None:
    """What a program does where the exchange is EXDEV: three moves through a temporary name, each a
    rename(2), or ``mv``'s copy and delete where that is EXDEV too (a directory with lower parts)."""
    tmp = a + ".exchanging"  # in a's directory; no layer has that name
    for old, new in ((a, tmp), (b, a), (tmp, b)):
        try:
            os.rename(mnt / old, mnt / new)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            assert rename_by_copy(mnt, old, new) == ("ok", None)


# -- observing -----------------------------------------------------------------------------------


def kernel_tree(root: Path) -> dict[str, dict[str, Any]]:
    """A mounted tree as pair.tree describes it, each entry with its mtime ("recent" when changed now)
    and its inode number (kept out of comparisons, see ``comparable``)."""
    out = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        path = root / rel if rel else root
        st = os.lstat(path)
        out[rel or "."] = {**describe(path), "mtime": normalize_mtime(st.st_mtime_ns), "ino": st.st_ino}
        if stat.S_ISDIR(st.st_mode):
            pending.extend(f"{rel}/{name}" if rel else name for name in os.listdir(path))
    return dict(sorted(out.items()))


def union_tree(u: Union) -> dict[str, dict[str, Any]]:
    """The same, read through the union's own calls (getattr, listdir, open, readlink, xattrs)."""
    out = {}
    pending = ["/"]
    while pending:
        path = pending.pop()
        attrs = u.getattr(path)
        st = attrs.st
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        d: dict[str, Any] = {
            "type": kind,
            "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": attrs.nlink,
        }
        if kind == "file":
            d["size"] = st.st_size
            fd = u.open(path, os.O_RDONLY)
            try:
                d["data"] = content(u.read(fd, st.st_size + 1, 0))
            finally:
                u.release(fd)
        elif kind == "symlink":
            d["size"] = st.st_size
            d["target"] = u.readlink(path)
        elif kind in ("chardev", "blockdev"):
            assert st.st_rdev != 0 or kind != "chardev", f"whiteout visible: {path}"
            d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        d["xattrs"] = {name: u.getxattr(path, name) for name in sorted(u.listxattr(path))}
        assert not any(name.startswith(("trusted.overlay.", "user.overlay.")) for name in d["xattrs"]), path
        d["mtime"] = normalize_mtime(st.st_mtime_ns)
        d["ino"] = attrs.ino
        out[path[1:] or "."] = d
        if kind == "dir":
            for name in u.listdir(path):
                assert not name.startswith(".wh."), f"marker visible: {join(path, name)}"
                pending.append(join(path, name))
    return dict(sorted(out.items()))


def comparable(view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A tree without inode numbers (no two filesystems agree on them), with which non-directories share
    one instead: "links" names the other paths of the same inode."""
    by_ino: dict[int, list[str]] = {}
    for rel, d in view.items():
        if d["type"] != "dir":
            by_ino.setdefault(d["ino"], []).append(rel)
    out = {}
    for rel, d in view.items():
        d = {k: v for k, v in d.items() if k != "ino"}
        if d["type"] != "dir":
            d["links"] = sorted(p for p in by_ino[view[rel]["ino"]] if p != rel)
        out[rel] = d
    return out


def subtree(view: dict[str, dict[str, Any]], top: str) -> dict[str, dict[str, Any]]:
    """The entry ``top`` ("" key) and everything below it (keys relative to it), without inode numbers
    and link counts (a merged directory reports 1, its copy its own; a copy-up breaks a lower link)."""
    out = {}
    for rel, d in view.items():
        if rel == top or rel.startswith(top + "/"):
            out[rel[len(top) :]] = {k: v for k, v in d.items() if k not in ("ino", "nlink")}
    return out


# -- the two sides -------------------------------------------------------------------------------


def _freeze_times(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


class Sides:
    """Kernel overlayfs mounted over one copy of the layers, a Union over another."""

    def __init__(
        self, mounts, base: Path, build: Callable[[Stack], None], form: str = "overlay", redirect_dir: bool = False
    ) -> None:
        self.mounts, self.base = mounts, base
        self.redirect_dir = redirect_dir
        self.k_options = "redirect_dir=on" if redirect_dir else ""
        src = Stack([base / "src" / f"lower{i}" for i in range(3)], base / "src" / "upper", base / "src" / "work")
        for p in src.lowers + [src.upper]:
            p.mkdir(parents=True)
        build(src)
        for p in src.lowers + [src.upper]:
            _freeze_times(p)
        self.kernel, self.layerfs = (self._copy(src, base / name) for name in ("kernel", "layerfs"))
        if form == "oci":
            assert sum(to_oci_form(p) for p in self.layerfs.lowers), "OCI form asked for, but no markers"
            for p in self.layerfs.lowers:
                _freeze_times(p)  # as they were before the markers changed
        # Where a lower layer has a directory: the only places an opaque mark hides something.
        only_lowers = mounts.overlay(base / "lowers-mnt", self.kernel.lowers)
        self.lower_dirs = {p for p, kind in visible_kinds(only_lowers).items() if kind == "d"}
        mounts.unmount(only_lowers)
        self.kmnt = mounts.overlay(
            base / "k-mnt", self.kernel.lowers, self.kernel.upper, self.kernel.work, self.k_options
        )
        self.union: Union | None = self._open_union()
        self.by_moves = 0  # exchanges the kernel refused (EXDEV) and did by moves
        self.check()

    @staticmethod
    def _copy(src: Stack, base: Path) -> Stack:
        base.mkdir()
        side = Stack([base / p.name for p in src.lowers], base / "upper", base / "work")
        for s, d in zip(src.lowers + [src.upper], side.lowers + [side.upper], strict=True):
            copy_tree(s, d)
        side.work.mkdir()
        return side

    def _open_union(self) -> Union:
        return Union(
            [str(p) for p in self.layerfs.lowers],
            str(self.layerfs.upper),
            str(self.layerfs.work),
            redirect_dir=self.redirect_dir,
        )

    def check(self) -> dict[str, dict[str, Any]]:
        """Both merged trees equal; returns the kernel's."""
        expected = kernel_tree(self.kmnt)
        got = union_tree(self.union)
        assert comparable(got) == comparable(expected), explain(comparable(expected), comparable(got))
        return expected

    def exchange(self, a: str, b: str) -> str:
        """Exchange ``a`` and ``b`` (relative paths) on both sides; returns the outcome, "ok" or an errno
        name, which must be the same on both (the kernel's EXDEV excepted, see the module's docstring)."""
        before = kernel_tree(self.kmnt)
        mine_before = union_tree(self.union)
        kernel = errname(exchange_at, self.kmnt / a, self.kmnt / b)
        mine = errname(self.union.exchange, "/" + a, "/" + b)
        by_moves = kernel == "EXDEV"
        if by_moves:
            assert kernel_tree(self.kmnt) == before, "kernel overlayfs changed something and said EXDEV"
            self.by_moves += 1
            exchange_by_moves(self.kmnt, a, b)
            kernel = "ok"
        assert mine == kernel, f"exchange({a}, {b}): kernel {kernel}, layerfs {mine}"
        after = self.check()
        if kernel == "ok" and a != b:
            assert subtree(after, b) == subtree(before, a) and subtree(after, a) == subtree(before, b), (
                f"exchange({a}, {b}): not swapped"
            )
            if not by_moves:  # copies made by mv are new files; the kernel's own exchange keeps numbers
                mine_after = union_tree(self.union)
                kept = (after[b]["ino"] == before[a]["ino"], after[a]["ino"] == before[b]["ino"])
                mine_kept = (
                    mine_after[b]["ino"] == mine_before[a]["ino"],
                    mine_after[a]["ino"] == mine_before[b]["ino"],
                )
                assert mine_kept == kept, f"exchange({a}, {b}): inode numbers kept: kernel {kept}, layerfs {mine_kept}"
        elif kernel != "ok":
            assert after == before, f"exchange({a}, {b}) failed with {kernel} but changed the tree"
        return kernel

    def close(self) -> None:
        if self.union is not None:
            self.union.close()
            self.union = None

    def compare_uppers(self) -> None:
        """The upper layers hold the same entries, whiteouts and opaque marks (only those that hide
        something once the kernel did an exchange by moves)."""
        kernel_upper, mine_upper = snapshot_upper(self.kernel.upper), snapshot_upper(self.layerfs.upper)
        if self.by_moves:
            kernel_upper, mine_upper = without_idle_opaque(
                kernel_upper, mine_upper, self.lower_dirs, (self.kernel.upper, self.layerfs.upper)
            )
        assert_same(kernel_upper, mine_upper, what="upper layers", names=("kernel", "layerfs"))

    def finish(self) -> None:
        """Upper layers compared; the change index checked; layerfs's upper read again by a new Union and by
        kernel overlayfs, both of which must show the kernel's final tree."""
        final = comparable(self.check())
        self.close()
        self.mounts.unmount(self.kmnt)
        self.compare_uppers()

        lowers = [str(p) for p in self.layerfs.lowers]
        with read_index(str(self.layerfs.upper), str(self.layerfs.work / INDEX_DIR), lowers=lowers) as index:
            assert_journal_complete(index)
            assert indexed_changes(index, lowers) == changes(str(self.layerfs.upper), lowers)

        again = self._open_union()
        try:
            assert comparable(union_tree(again)) == final
        finally:
            again.close()
        work = self.base / "work-for-kernel"
        work.mkdir()
        kernel_again = self.mounts.overlay(
            self.base / "kernel-again", self.kernel.lowers, self.layerfs.upper, work, self.k_options
        )
        assert comparable(kernel_tree(kernel_again)) == final, "kernel overlayfs reads layerfs's upper otherwise"
        self.mounts.unmount(kernel_again)


@pytest.fixture
def sides(mounts, tmp_path):
    """``sides(build, form=...)`` makes a Sides; every Union is closed and every mount unmounted after."""
    made: list[Sides] = []

    def make(build: Callable[[Stack], None], form: str = "overlay", redirect_dir: bool = False) -> Sides:
        s = Sides(mounts, tmp_path / f"sides{len(made)}", build, form, redirect_dir)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- the layers ----------------------------------------------------------------------------------


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    up = s.upper
    # Lower files: one with metadata to carry, a symlink, two names of one lower inode.
    write(bottom / "f1", "f1", 0o640)
    os.chown(bottom / "f1", 1234, 5678)
    os.setxattr(bottom / "f1", "user.tag", b"one")
    write(bottom / "f2", "f2")
    write(top / "f3", "f3 on top")
    os.symlink("f1", bottom / "sym")
    write(bottom / "hl1", "lower link")
    os.link(bottom / "hl1", bottom / "hl2")
    write(bottom / "gone", "deleted in mid")
    whiteout(mid, "gone")
    # ld: merged over bottom, mid and the upper, with names deleted in mid and in the upper.
    write(bottom / "ld/x", "x")
    write(bottom / "ld/sub/deep", "deep")
    write(bottom / "ld/dropped", "deleted in mid")
    write(mid / "ld/y", "y")
    whiteout(mid / "ld", "dropped")
    os.chmod(mid / "ld", 0o750)
    os.setxattr(mid / "ld", "user.dir", b"ld")
    write(up / "ld/up", "in the upper")
    whiteout(up / "ld", "x")
    os.chmod(up / "ld", 0o750)
    os.setxattr(up / "ld", "user.dir", b"ld")
    # lo: in the bottom layer only. opq: made opaque in the top layer, over the bottom's.
    write(bottom / "lo/z", "z")
    os.chmod(bottom / "lo", 0o705)
    write(bottom / "opq/old", "hidden by the opaque top")
    write(top / "opq/new", "new")
    make_opaque(top / "opq")
    (bottom / "edir").mkdir()
    # Two merged parents, each with a file and a directory with lower parts.
    write(bottom / "p1/f", "p1f")
    write(bottom / "p1/d/a", "p1da")
    write(bottom / "p2/g", "p2g")
    write(bottom / "p2/e/b", "p2eb")
    write(top / "p2/e/c", "p2ec")
    write(bottom / "deep/a/b/f", "deep file")
    # The upper: files and directories of its own, an opaque directory over a lower one, a file over a
    # lower directory, a hard-linked file, a deleted lower file.
    write(up / "uf", "upper file")
    write(up / "ul1", "upper link")
    os.link(up / "ul1", up / "ul2")
    write(up / "ud/q", "q")
    write(up / "ud/inner/t", "t")
    write(up / "ud2/r", "r")
    write(bottom / "uo/hidden", "hidden by the upper's opaque uo")
    write(up / "uo/shown", "shown")
    make_opaque(up / "uo")
    write(bottom / "replaced/old", "under an upper file")
    write(up / "replaced", "an upper file over a lower directory")
    write(bottom / "gone2", "deleted in the upper")
    whiteout(up, "gone2")


# -- the cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_exchange_files(sides, form):
    s = sides(build, form)
    assert s.exchange("f1", "f2") == "ok"  # lower and lower, one directory
    assert s.exchange("p1/f", "p2/g") == "ok"  # lower and lower, in two lower directories copied up
    assert s.exchange("f1", "uf") == "ok"  # lower (copied up before) and upper
    assert s.exchange("f3", "uf") == "ok"  # top lower and upper
    assert s.exchange("sym", "ld/up") == "ok"  # a symlink into a merged directory
    assert s.exchange("deep/a/b/f", "f2") == "ok"  # a chain of lower directories copied up
    assert s.exchange("replaced", "p1/f") == "ok"  # an upper file over a lower dir: the dir stays hidden
    assert s.exchange("hl1", "hl2") == "ok"  # two names of one lower inode: two files, both copied up
    assert s.by_moves == 0
    s.finish()


def test_exchange_hard_linked_upper_files(sides):
    s = sides(build)
    assert s.exchange("ul1", "ul2") == "ok"  # one inode: nothing happens
    assert s.exchange("ul1", "f1") == "ok"  # the link group now is f1 and ul2
    view = s.check()
    assert view["f1"]["nlink"] == 2 and view["ul2"]["ino"] == view["f1"]["ino"]
    assert s.exchange("ul2", "ld/y") == "ok"  # across directories: ld/y and f1 are the links
    view = s.check()
    assert view["ld/y"]["data"] == b"upper link" and view["ld/y"]["ino"] == view["f1"]["ino"]
    assert s.exchange("f1", "ld/y") == "ok"
    assert s.by_moves == 0
    s.finish()


def test_exchange_file_and_upper_dir(sides):
    s = sides(build)
    assert s.exchange("ud", "uf") == "ok"  # a directory of the upper alone lands in a merged dir: opaque
    assert s.exchange("ud2", "p1/f") == "ok"  # into a lower directory, copied up
    assert s.exchange("uo", "f2") == "ok"  # an opaque upper directory; the lower uo stays hidden by f2
    assert s.exchange("f2", "replaced") == "ok"  # uo's dir over the lower replaced/: stays opaque
    assert s.by_moves == 0
    s.finish()


def test_exchange_upper_dirs(sides):
    s = sides(build)
    assert s.exchange("ud/inner", "ud2/r") == "ok"  # into a directory of the upper alone: not opaque
    s.compare_uppers()
    assert s.exchange("ud2/r", "f1") == "ok"  # from there into a merged one: opaque
    assert s.exchange("ud", "ud2") == "ok"  # both land in the merged root: both opaque, as the kernel has it
    assert s.exchange("ud", "p2/g") == "ok"
    assert s.exchange("p2/g", "uo") == "ok"  # an opaque one stays so
    assert s.exchange("replaced", "uo") == "ok"  # a directory where a lower one is hidden by a file
    assert s.by_moves == 0
    s.finish()


def _view_of_union(s: Sides) -> dict:
    return comparable(union_tree(s.union))


@pytest.mark.parametrize("form", FORMS)
def test_exchange_dirs_with_lower_parts(sides, form):
    s = sides(build, form)
    assert s.exchange("ld", "f2") == "ok"  # merged dir and file, one directory
    assert s.exchange("lo", "p2/g") == "ok"  # lower-only dir and a file of another lower directory
    assert s.exchange("p1/d", "p2/e") == "ok"  # both with lower parts, two directories
    assert s.exchange("opq", "ud") == "ok"  # an opaque lower dir and an upper one
    assert s.exchange("edir", "uo") == "ok"  # an empty lower dir and an opaque upper one
    assert s.exchange("f2", "p2/g") == "ok"  # the copied-up trees move again
    view = _view_of_union(s)
    assert "ld/dropped" not in view and "f2/dropped" not in view and "f2/x" not in view  # still deleted
    assert "opq/old" not in view and "ud/old" not in view  # still hidden
    assert s.by_moves == 5  # the last two are copies already, of the upper alone
    s.finish()


@pytest.mark.parametrize("form", FORMS)
def test_exchange_dirs_with_lower_parts_by_redirect(sides, form):
    """The same exchanges with redirect_dir on both sides: no EXDEV, no copies, the same uppers."""
    s = sides(build, form, redirect_dir=True)
    for a, b in (("ld", "f2"), ("lo", "p2/g"), ("p1/d", "p2/e"), ("opq", "ud"), ("edir", "uo"), ("f2", "p2/g")):
        assert s.exchange(a, b) == "ok"
    assert s.by_moves == 0
    s.finish()


@pytest.mark.parametrize("form", FORMS)
def test_exchange_lower_dirs_side_by_side(sides, form):
    s = sides(build, form)
    assert s.exchange("ld", "lo") == "ok"  # merged and lower-only
    assert s.exchange("opq", "edir") == "ok"  # opaque in a lower, and empty
    assert s.exchange("lo", "edir") == "ok"  # the copies: of the upper alone now, no EXDEV
    assert s.by_moves == 2
    s.finish()


@pytest.mark.parametrize("form", FORMS)
def test_exchange_two_merged_dirs_in_one_directory(sides, form):
    def build_more(st: Stack) -> None:
        build(st)
        top, mid, bottom = st.lowers
        write(bottom / "m/one/a", "1a")
        write(mid / "m/one/b", "1b")
        write(bottom / "m/one/gone", "deleted")
        (top / "m/one").mkdir(parents=True)
        whiteout(top / "m/one", "gone")
        write(bottom / "m/two/c", "2c")
        write(top / "m/two/sub/d", "2d")
        write(bottom / "m/two/sub/e", "2e")
        write(st.upper / "m/two/sub/f", "2f")

    s = sides(build_more, form)
    assert s.exchange("m/two/sub", "p1/d") == "ok"  # merged over three layers, and lower-only
    assert s.exchange("m/one", "m/two") == "ok"  # both merged, one directory
    assert s.exchange("m/two/a", "m/one/sub") == "ok"  # inside the copied-up trees: plain upper entries
    assert s.exchange("m/one", "ld") == "ok"  # a copied-up tree again, and a merged dir elsewhere
    assert s.by_moves == 3
    s.finish()


def test_exchange_errors(sides):
    s = sides(build)
    cases = {
        ("missing", "f1"): "ENOENT",
        ("f1", "missing"): "ENOENT",
        ("gone", "f1"): "ENOENT",  # deleted in a lower layer
        ("f1", "gone2"): "ENOENT",  # deleted in the upper
        ("ld/x", "f1"): "ENOENT",  # deleted in the upper inside a merged directory
        ("nodir/a", "f1"): "ENOENT",
        ("f1/a", "f2"): "ENOTDIR",
        ("ld", "ld/sub"): "EINVAL",  # an ancestor of the other, both ways
        ("ld/sub/deep", "ld"): "EINVAL",
        ("ud", "ud/q"): "EINVAL",
        ("ld", "ld/missing"): "ENOENT",  # missing comes first
        ("f1", "f1"): "ok",  # one name: nothing happens, nothing is copied up
        ("ld", "ld"): "ok",
        ("missing", "missing"): "ENOENT",
        ("ul1", "ul2"): "ok",
    }
    for (a, b), expected in cases.items():
        assert s.exchange(a, b) == expected, (a, b)
    with pytest.raises(OSError) as e:
        s.union.exchange("/", "/f1")
    assert e.value.errno == errno.EBUSY
    s.finish()  # the upper layers, untouched, still alike


def test_exchange_on_a_read_only_union(mounts, tmp_path):
    """Without an upper layer: EROFS, after a missing or non-directory parent, before a missing name."""
    lowers = [tmp_path / "top", tmp_path / "bottom"]
    for p in lowers:
        p.mkdir()
    write(lowers[1] / "f1", "1")
    write(lowers[0] / "f2", "2")
    kmnt = mounts.overlay(tmp_path / "k-mnt", lowers)
    u = Union([str(p) for p in lowers])
    try:
        for a, b in (("f1", "f2"), ("missing", "f1"), ("f1", "f1"), ("nodir/x", "f1"), ("f1/x", "f2")):
            kernel = errname(exchange_at, kmnt / a, kmnt / b)
            assert errname(u.exchange, "/" + a, "/" + b) == kernel, (a, b)
            assert kernel in ("EROFS", "ENOENT", "ENOTDIR")
    finally:
        u.close()


def test_exchange_leaves_open_files_usable(sides):
    """Descriptors opened before an exchange keep reading (a lower file) and writing (an upper one)."""
    s = sides(build)
    reader = s.union.open("/f1", os.O_RDONLY)
    writer = s.union.open("/uf", os.O_RDWR)
    try:
        assert s.exchange("f1", "uf") == "ok"
        s.union.write(writer, b"U", 0)
        assert s.union.read(reader, 10, 0) == b"f1"
        assert s.union.read(writer, 20, 0) == b"Upper file"
    finally:
        s.union.release(reader)
        s.union.release(writer)
    with open(s.kmnt / "f1", "r+b") as f:  # the same write on the kernel side
        f.write(b"U")
    s.finish()
