"""Files on real mounts, compared with kernel overlayfs: getattr, readdir, open/create flags, read, write,
truncate, fsync, mknod, statfs, access and unlink, over three lower layers in both whiteout forms."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import pytest
from pair import ALL_FORMS, FORMS, Err, Stack, describe, errname, make_opaque, make_pair, outcome, tree, whiteout, write


def build(s: Stack) -> None:
    """Three lowers (top first): shadowed names, whiteouts, an opaque dir, merged dirs, odd modes."""
    top, mid, bottom = s.lowers
    write(bottom / "a", "a2")
    write(bottom / "b", "b2")
    write(bottom / "shadow", "bottom")
    write(bottom / "gone", "deleted in mid")
    write(bottom / "d/x", "x2")
    write(bottom / "d/y", "deleted in mid")
    write(bottom / "opq/old", "hidden by opaque mid")
    write(bottom / "m/one", "1")
    write(bottom / "secret", "root only", mode=0o600)
    write(bottom / "noperm", "no bits", mode=0o000)
    (bottom / "emptydir").mkdir()
    write(mid / "shadow", "middle")
    whiteout(mid, "gone")
    write(mid / "d/z", "z1")
    whiteout(mid / "d", "y")
    write(mid / "opq/new", "new")
    make_opaque(mid / "opq")
    write(mid / "m/two", "2")
    write(top / "top", "top")
    write(top / "m/three", "3")
    write(top / "run", "#!/bin/sh\n", mode=0o755)
    os.symlink("made-through-link", top / "dangling")
    os.symlink("d", mid / "sym-dir")


@pytest.mark.parametrize("form", ALL_FORMS)
def test_getattr_and_readdir_of_the_merged_tree(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        listing = {}
        for rel in (".", "d", "m", "opq", "emptydir"):
            with os.scandir(mnt / rel) as it:
                # d_type and d_ino of readdir must agree with lstat (find and du rely on it).
                listing[rel] = sorted(
                    (e.name, e.is_dir(follow_symlinks=False), e.inode() == e.stat(follow_symlinks=False).st_ino)
                    for e in it
                )
        return {
            "tree": tree(mnt),
            "listing": listing,
            "errors": [errname(os.lstat, f"{mnt}/{p}") for p in ("gone", "d/y", "opq/old", "a/", "a/x", "nope")],
        }

    seen = pair.compare(scenario)
    # The facts that make the comparison meaningful: each layer rule was exercised.
    assert seen["tree"]["shadow"]["data"] == b"middle"
    assert {"top", "a", "m/one", "m/two", "m/three", "d/x", "d/z", "opq/new"} <= set(seen["tree"])
    assert seen["errors"] == ["ENOENT", "ENOENT", "ENOENT", "ENOTDIR", "ENOTDIR", "ENOENT"]


@pytest.mark.parametrize("form", ALL_FORMS)
def test_readdir_after_changes_shows_no_internal_names(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.unlink(mnt / "a")
        os.unlink(mnt / "d/x")
        os.rmdir(mnt / "emptydir")
        os.mkdir(mnt / "emptydir")  # over a deleted lower dir: opaque in upper
        write(mnt / "emptydir/fresh", "f")
        os.unlink(mnt / "opq/new")
        write(mnt / "gone", "back")  # over a lower whiteout
        return {rel: sorted(os.listdir(mnt / rel)) for rel in (".", "d", "emptydir", "opq", "m")}

    seen = pair.compare(scenario)
    assert "a" not in seen["."] and "gone" in seen["."]
    assert seen["d"] == ["z"] and seen["opq"] == [] and seen["emptydir"] == ["fresh"]
    pair.compare_uppers()


@pytest.mark.parametrize("form", FORMS)
def test_open_and_create_flags(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def opened(path: Path, flags: int, mode: int = 0o666, data: bytes = b"") -> str:
        fd = os.open(path, flags, mode)
        try:
            if data:
                os.write(fd, data)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, data)  # with O_APPEND this still lands at the end
        finally:
            os.close(fd)
        return "ok"

    def scenario(mnt: Path):
        W, C, X = os.O_WRONLY, os.O_CREAT, os.O_EXCL
        steps = {
            "append lower": outcome(opened, mnt / "a", W | os.O_APPEND, data=b"+"),
            "trunc lower": outcome(opened, mnt / "b", W | os.O_TRUNC),
            "rdonly trunc": outcome(opened, mnt / "shadow", os.O_RDONLY | os.O_TRUNC),
            "excl on lower file": outcome(opened, mnt / "top", W | C | X),
            "excl on lower dir": outcome(opened, mnt / "d", W | C | X),
            "excl on whited-out": outcome(opened, mnt / "gone", W | C | X, 0o640, b"new"),
            "excl below opaque": outcome(opened, mnt / "opq/old", W | C | X, 0o600, b"o"),
            "creat on existing": outcome(opened, mnt / "m/one", W | C, 0o600),
            "creat append new": outcome(opened, mnt / "new", W | C | os.O_APPEND, 0o644, b"ab"),
            "creat trunc lower": outcome(opened, mnt / "m/two", W | C | os.O_TRUNC),
            "dir for writing": outcome(opened, mnt / "d", os.O_RDWR),
            "file as dir": outcome(opened, mnt / "a", os.O_RDONLY | os.O_DIRECTORY),
            "missing": outcome(opened, mnt / "missing", os.O_RDONLY),
            "below a file": outcome(opened, mnt / "a/x", os.O_RDONLY),
            "creat in missing dir": outcome(opened, mnt / "nodir/f", W | C),
            "creat in whited-out dir": outcome(opened, mnt / "d/y/f", W | C),
            "excl on dangling symlink": outcome(opened, mnt / "dangling", W | C | X),
            "nofollow on symlink": outcome(opened, mnt / "sym-dir", os.O_RDONLY | os.O_NOFOLLOW),
            "directory through symlink": outcome(opened, mnt / "sym-dir", os.O_RDONLY | os.O_DIRECTORY),
            "creat through dangling symlink": outcome(opened, mnt / "dangling", W | C, 0o600, b"t"),
        }
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    files = seen["tree"]
    assert files["a"]["data"] == b"a2++" and files["b"]["data"] == b"" and files["shadow"]["data"] == b""
    assert files["gone"]["data"] == b"new" and files["m/one"]["data"] == b"1" and files["new"]["data"] == b"abab"
    assert seen["steps"]["excl on lower file"] == Err("EEXIST")
    assert seen["steps"]["dir for writing"] == Err("EISDIR") and seen["steps"]["nofollow on symlink"] == Err("ELOOP")
    assert files["made-through-link"]["data"] == b"t" and files["dangling"]["type"] == "symlink"
    pair.compare_uppers()


def test_read_write_at_offsets_and_reads_do_not_copy_up(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)
    big = os.urandom(3 << 20)

    def scenario(mnt: Path):
        with open(mnt / "top", "rb") as f:
            read_only = [f.read(2), f.read(), os.pread(f.fileno(), 10, 1), os.pread(f.fileno(), 5, 100)]
        fd = os.open(mnt / "shadow", os.O_RDWR)
        try:
            os.pwrite(fd, b"XY", 2)
            os.pwrite(fd, b"end", 10)  # past the end: a hole reads as zeros
            rewritten = os.pread(fd, 100, 0)
        finally:
            os.close(fd)
        (mnt / "big").write_bytes(big)
        return {
            "read only": read_only,
            "rewritten": rewritten,
            "shadow": describe(mnt / "shadow"),
            "big": (mnt / "big").read_bytes() == big,
            "top": describe(mnt / "top"),
        }

    seen = pair.compare(scenario)
    assert seen["rewritten"] == b"miXYle\0\0\0\0end" and seen["big"]
    for side in pair.sides:
        assert not (side.upper / "top").exists(), "a read-only open copied the file up"
    pair.compare_uppers()


def test_mmap_and_sparse_files(mounts, tmp_path):
    """Shared writable mappings of a lower file (copied up on open), and holes far past the end."""
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        with open(mnt / "shadow", "r+b") as f:
            with mmap.mmap(f.fileno(), 0) as m:
                mapped = m[:]
                m[0:3] = b"MID"
                m.flush()
        with open(mnt / "top", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            read_only_map = m[:]
        far = 1 << 32  # 4 GiB: offsets past 32 bits
        fd = os.open(mnt / "a", os.O_RDWR)
        try:
            os.pwrite(fd, b"far", far)
            st = os.fstat(fd)
            sparse = {
                "size": st.st_size,
                "mostly holes": st.st_blocks * 512 < 1 << 20,
                "hole": os.pread(fd, 4, 4096),
                "end": os.pread(fd, 10, far - 2),
            }
        finally:
            os.close(fd)
        return {
            "mapped": mapped,
            "after mmap write": (mnt / "shadow").read_bytes(),
            "read-only map": read_only_map,
            "sparse": sparse,
        }

    seen = pair.compare(scenario)
    assert seen["after mmap write"] == b"MIDdle" and seen["read-only map"] == b"top"
    assert seen["sparse"] == {"size": (1 << 32) + 3, "mostly holes": True, "hole": b"\0" * 4, "end": b"\0\0far"}


def test_truncate_and_ftruncate(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        steps = {
            "shrink lower": outcome(os.truncate, mnt / "a", 1),
            "grow lower": outcome(os.truncate, mnt / "b", 5),
            "zero lower": outcome(os.truncate, mnt / "m/one", 0),
            "dir": outcome(os.truncate, mnt / "d", 0),
            "missing": outcome(os.truncate, mnt / "gone", 0),
        }
        fd = os.open(mnt / "d/z", os.O_RDWR)
        try:
            steps["ftruncate lower"] = outcome(os.ftruncate, fd, 1)
            steps["fstat size"] = os.fstat(fd).st_size
        finally:
            os.close(fd)
        fd = os.open(mnt / "shadow", os.O_RDONLY)
        try:
            steps["ftruncate read-only fd"] = outcome(os.ftruncate, fd, 0)
        finally:
            os.close(fd)
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    files = seen["tree"]
    assert files["a"]["data"] == b"a" and files["b"]["data"] == b"b2\0\0\0" and files["m/one"]["size"] == 0
    assert files["d/z"]["data"] == b"z" and files["shadow"]["data"] == b"middle"
    pair.compare_uppers()


def test_fsync_and_fdatasync(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        steps = {}
        fd = os.open(mnt / "top", os.O_RDONLY)
        try:
            steps["fsync read-only lower"] = outcome(os.fsync, fd)
        finally:
            os.close(fd)
        fd = os.open(mnt / "a", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"!")
            steps["fsync written"] = outcome(os.fsync, fd)
            steps["fdatasync written"] = outcome(os.fdatasync, fd)
        finally:
            os.close(fd)
        fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            steps["fsync dir"] = outcome(os.fsync, fd)
        finally:
            os.close(fd)
        steps["a"] = (mnt / "a").read_bytes()
        return steps

    seen = pair.compare(scenario)
    assert seen["a"] == b"a2!"
    for side in pair.sides:
        assert not (side.upper / "top").exists(), "fsync of a read-only file copied it up"


def test_mknod_fifo_devices_and_whiteout_refused(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        steps = {
            "fifo": outcome(os.mknod, mnt / "fifo", stat.S_IFIFO | 0o640),
            "fifo in lower dir": outcome(os.mknod, mnt / "d/fifo", stat.S_IFIFO | 0o600),
            "fifo over lower": outcome(os.mknod, mnt / "a", stat.S_IFIFO | 0o600),
            "fifo over whited-out": outcome(os.mknod, mnt / "gone", stat.S_IFIFO | 0o600),
            "null": outcome(os.mknod, mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
            "block": outcome(os.mknod, mnt / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0)),
            "socket": outcome(os.mknod, mnt / "sock", stat.S_IFSOCK | 0o600),
            "regular": outcome(os.mknod, mnt / "reg", stat.S_IFREG | 0o600),
            # A 0/0 device is a whiteout on disk; overlayfs refuses to make one through the mount.
            "whiteout device": outcome(os.mknod, mnt / "wh", stat.S_IFCHR | 0o600, 0),
        }
        fd = os.open(mnt / "fifo", os.O_RDWR | os.O_NONBLOCK)  # O_RDWR on a fifo never blocks on Linux
        try:
            os.write(fd, b"through the pipe")
            steps["fifo data"] = os.read(fd, 100)
        finally:
            os.close(fd)
        # A device node works through the mount (not mounted nodev).
        with open(mnt / "null", "r+b", buffering=0) as f:
            steps["null io"] = (f.write(b"gone"), f.read())
        return {"steps": steps, "tree": tree(mnt, data=False)}

    seen = pair.compare(scenario)
    assert seen["steps"]["fifo data"] == b"through the pipe" and seen["steps"]["null io"] == (4, b"")
    assert seen["tree"]["null"]["rdev"] == (1, 3) and seen["tree"]["fifo"]["type"] == "fifo"
    assert seen["steps"]["whiteout device"] == Err("EPERM") and seen["steps"]["fifo over lower"] == Err("EEXIST")
    pair.compare_uppers()


def test_statfs(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        v = os.statvfs(mnt)
        # Free counts move with everything else on the machine; sizes and limits do not.
        return {
            "bsize": v.f_bsize,
            "blocks": v.f_blocks,
            "files": v.f_files,
            "namemax": v.f_namemax,
            "readonly": bool(v.f_flag & os.ST_RDONLY),
        }

    seen = pair.compare(scenario)
    # Both report the upper layer's filesystem.
    assert seen["blocks"] == os.statvfs(pair.kernel.upper).f_blocks and seen["namemax"] == 255


def test_access_as_root(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        modes = {"R": os.R_OK, "W": os.W_OK, "X": os.X_OK, "F": os.F_OK}
        return {
            rel: "".join(k for k, m in modes.items() if os.access(mnt / rel, m))
            for rel in ("a", "run", "secret", "noperm", "d", "m", "gone", "opq/old")
        }

    seen = pair.compare(scenario)
    # Root may read and write anything, but execute only what has an x bit somewhere.
    assert seen["noperm"] == "RWF" and seen["run"] == "RWXF" and seen["d"] == "RWXF" and seen["gone"] == ""


@pytest.mark.parametrize("form", FORMS)
def test_unlink(mounts, tmp_path, form):
    pair = make_pair(mounts, tmp_path, build, form=form)

    def scenario(mnt: Path):
        os.symlink("a", mnt / "link")
        steps = {
            "lower file": outcome(os.unlink, mnt / "a"),
            "symlink to it": outcome(os.unlink, mnt / "link"),
            "in middle-layer dir": outcome(os.unlink, mnt / "d/z"),
            "shadowing file": outcome(os.unlink, mnt / "shadow"),
            "dir": outcome(os.unlink, mnt / "d"),
            "missing": outcome(os.unlink, mnt / "missing"),
            "whited-out": outcome(os.unlink, mnt / "gone"),
            "below opaque": outcome(os.unlink, mnt / "opq/old"),
            "below a file": outcome(os.unlink, mnt / "b/x"),
        }
        write(mnt / "fresh", "upper only")
        steps["upper-only file"] = outcome(os.unlink, mnt / "fresh")
        steps["twice"] = outcome(os.unlink, mnt / "a")
        write(mnt / "a", "recreated")
        steps["recreated"] = (mnt / "a").read_bytes()
        steps["shadow after"] = outcome(os.lstat, mnt / "shadow") == Err("ENOENT")  # the bottom one stays hidden
        return {"steps": steps, "tree": tree(mnt)}

    seen = pair.compare(scenario)
    assert seen["steps"]["lower file"] is None and seen["steps"]["dir"] in (Err("EISDIR"), Err("EPERM"))
    assert seen["steps"]["recreated"] == b"recreated" and seen["steps"]["shadow after"]
    upper = pair.compare_uppers()
    assert upper["shadow"] == "whiteout" and "fresh" not in upper


@pytest.mark.parametrize("form", FORMS)
def test_read_only_mount(mounts, tmp_path, form):
    """Lowers alone, no upper layer: everything reads as merged, every change is EROFS."""
    pair = make_pair(mounts, tmp_path, build, form=form, readonly=True)

    def scenario(mnt: Path):
        writes = {
            "open for writing": lambda: os.close(os.open(mnt / "a", os.O_WRONLY)),
            "create": lambda: os.close(os.open(mnt / "new", os.O_WRONLY | os.O_CREAT)),
            "truncate": lambda: os.truncate(mnt / "a", 0),
            "mkdir": lambda: os.mkdir(mnt / "newdir"),
            "rmdir": lambda: os.rmdir(mnt / "emptydir"),
            "unlink": lambda: os.unlink(mnt / "a"),
            "rename": lambda: os.rename(mnt / "a", mnt / "b"),
            "link": lambda: os.link(mnt / "a", mnt / "a2"),
            "symlink": lambda: os.symlink("a", mnt / "s"),
            "mknod": lambda: os.mknod(mnt / "fifo", stat.S_IFIFO | 0o600),
            "chmod": lambda: os.chmod(mnt / "a", 0o600),
            "chown": lambda: os.chown(mnt / "a", 1, 1),
            "utime": lambda: os.utime(mnt / "a", ns=(1, 1)),
            "setxattr": lambda: os.setxattr(mnt / "a", "user.x", b"1"),
        }
        return {
            "writes": {k: errname(w) for k, w in writes.items()},
            "tree": tree(mnt),
            "may write": os.access(mnt / "a", os.W_OK),
            "statfs read-only": bool(os.statvfs(mnt).f_flag & os.ST_RDONLY),
        }

    seen = pair.compare(scenario)
    assert set(seen["writes"].values()) == {"EROFS"} and seen["statfs read-only"] and not seen["may write"]
    assert seen["tree"]["shadow"]["data"] == b"middle" and "gone" not in seen["tree"]
