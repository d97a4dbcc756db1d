"""Run one scenario on kernel overlayfs and on layerfs over identical layer copies, and compare.

Kernel overlayfs is the oracle. A *scenario* is a plain function ``scenario(mnt) -> observations`` that
does things below a mount point and returns what it saw: errno names, stat fields, contents, listings.
Observations must not depend on which mount they came from (no absolute paths, no raw inode numbers, no
wall-clock times), so the two runs can be compared with ``==``.

Layers are built once by a *builder* in the overlay whiteout form (0/0 character devices and the
``trusted.overlay.opaque`` xattr), then copied with ``cp -a``: the kernel always mounts the overlay-form
copy (it reads no other form); layerfs mounts a copy in the form the test asks for, the overlay form or
the OCI form (``.wh.NAME`` files and ``.wh..wh..opq``).

Also here, because several test modules need them: observation helpers (``outcome``, ``describe``,
``tree``, ``upper_tree``) and running a scenario as another user (``run_as``).
"""

from __future__ import annotations

import difflib
import errno
import functools
import hashlib
import os
import pickle
import pprint
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMS = ("overlay", "oci")
# fuse-overlayfs writes three markers into an opaque directory at once (the xattr, a ".wh..wh..opq" file
# and a 0/0 device ".wh..opq"); layers it wrote carry them. Only for tests whose layers have opaque dirs.
FUSE_OVERLAYFS = "fuse-overlayfs"
ALL_FORMS = FORMS + (FUSE_OVERLAYFS,)
OPAQUE_XATTR = "trusted.overlay.opaque"
OCI_WHITEOUT = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")

USER = 1000  # an ordinary user of this machine (uid and gid)


# -- building layers ------------------------------------------------------------------------------


@dataclass
class Stack:
    """One side's layers (lowers top first) and, once mounted, its mount point."""

    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path | None = None
    # The directories the lowers were built in; differs from ``lowers`` when those are read-only binds.
    sources: list[Path] = field(default_factory=list)


Builder = Callable[[Stack], None]
Scenario = Callable[[Path], Any]


def whiteout(directory: Path, name: str) -> None:
    """Delete ``name`` in the layers below, in overlay form (a 0/0 character device)."""
    os.mknod(directory / name, stat.S_IFCHR, os.makedev(0, 0))


def make_opaque(directory: Path) -> None:
    """Hide what the layers below have in ``directory``, in overlay form."""
    os.setxattr(directory, OPAQUE_XATTR, b"y")


def write(path: Path, data: str | bytes, mode: int | None = None) -> Path:
    """Create a file (and its parents) with ``data``; for builders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def append(path: Path | str, data: bytes) -> int:
    """Append ``data`` to a file (opening it for writing: a copy-up for a lower file)."""
    with open(path, "ab") as f:
        return f.write(data)


def to_oci_form(root: Path) -> int:
    """Rewrite the overlay-form markers under ``root`` in OCI form; returns how many were rewritten."""
    count = 0
    for dirpath, _, filenames in os.walk(root):
        d = Path(dirpath)
        try:
            if os.getxattr(d, OPAQUE_XATTR) == b"y":
                os.removexattr(d, OPAQUE_XATTR)
                (d / OCI_OPAQUE).touch()
                count += 1
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        for name in filenames:
            st = os.lstat(d / name)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(d / name)
                (d / (OCI_WHITEOUT + name)).touch()
                count += 1
    return count


def to_fuse_overlayfs_form(root: Path) -> int:
    """Add fuse-overlayfs's extra markers to every opaque directory under ``root``; returns how many."""
    count = 0
    for dirpath, _, _ in os.walk(root):
        d = Path(dirpath)
        if outcome(os.getxattr, d, OPAQUE_XATTR) == b"y":
            (d / OCI_OPAQUE).touch()
            os.mknod(d / ".wh..opq", stat.S_IFCHR, os.makedev(0, 0))
            count += 1
    return count


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a layer with devices, hard links, ownership, modes, ns timestamps and every xattr (trusted.*
    too, as root). tar, not cp -a: cp cannot copy trees whose paths are longer than PATH_MAX."""
    dst.mkdir()
    flags = ["--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix"]
    pack = subprocess.Popen(["tar", "-C", str(src), "-c", "-f", "-", *flags, "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(dst), "-x", "-p", "-f", "-", *flags], stdin=pack.stdout, check=True)
    pack.stdout.close()
    assert pack.wait() == 0, f"tar could not read {src}"


def _bind_read_only(mounts, src: Path, dst: Path) -> None:
    dst.mkdir()
    mounts.points.append(dst)  # the fixture unmounts it after the overlays mounted on top of it
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)


def _stack(base: Path, nlowers: int) -> Stack:
    base.mkdir(parents=True)
    lowers = [base / f"lower{i}" for i in range(nlowers)]
    for p in lowers + [base / "upper", base / "work"]:
        p.mkdir()
    return Stack(lowers, base / "upper", base / "work", sources=list(lowers))


# -- the pair -------------------------------------------------------------------------------------


class Pair:
    """A kernel overlay mount and a layerfs mount over identical copies of the same layers."""

    def __init__(self, mounts, kernel: Stack, layerfs: Stack) -> None:
        self.mounts = mounts
        self.kernel = kernel
        self.layerfs = layerfs

    @property
    def sides(self) -> tuple[Stack, Stack]:
        return self.kernel, self.layerfs

    def run(self, scenario: Scenario, *args: Any) -> tuple[Any, Any]:
        """The scenario's observations on the kernel mount and on the layerfs mount."""
        return scenario(self.kernel.mnt, *args), scenario(self.layerfs.mnt, *args)

    def compare(self, scenario: Scenario, *args: Any) -> Any:
        """Run ``scenario`` on both mounts, assert equal observations, and return them.

        Afterwards the layerfs mount must show none of its bookkeeping, whatever the scenario did.
        """
        expected, got = self.run(scenario, *args)
        assert got == expected, explain(expected, got)
        assert_no_internals(self.layerfs.mnt)
        return expected

    def unmount(self) -> None:
        for side in self.sides:
            self.mounts.unmount(side.mnt)

    def compare_uppers(self) -> dict[str, Any]:
        """Unmount both and assert the upper layers hold the same entries, whiteouts and opaque marks."""
        self.unmount()
        expected, got = upper_tree(self.kernel.upper), upper_tree(self.layerfs.upper)
        assert got == expected, "upper layers differ\n" + explain(expected, got)
        return expected


def make_pair(
    mounts,
    base: Path,
    build: Builder,
    *,
    nlowers: int = 3,
    form: str = "overlay",
    ro_lowers: bool = False,
    readonly: bool = False,
    mnt_base: Path | None = None,
    layerfs_options: str = "",
) -> Pair:
    """Build layers with ``build`` and mount them twice: kernel overlayfs and layerfs.

    ``form`` is the whiteout form of layerfs's lower copies ("overlay", "oci" or "fuse-overlayfs"); in the
    last two the builder must have made markers to rewrite, or the parametrization would test nothing.
    ``ro_lowers`` puts every lower behind a read-only bind mount (the layer directories themselves,
    ``Stack.sources``, stay writable for the test to inspect). ``readonly`` mounts the lowers alone, with
    no upper layer (overlayfs wants two lowers at least then). ``mnt_base`` holds the mount points
    (default ``base``; use ``public_base`` when other users must reach them). ``layerfs_options`` are
    more -o options for layerfs (``nopassthrough``).
    """
    assert form in ALL_FORMS
    kernel = _stack(base / "kernel", nlowers)
    build(kernel)
    layerfs = _stack(base / "layerfs", 0)
    for i, src in enumerate(kernel.lowers + [kernel.upper]):
        dst = layerfs.upper if src == kernel.upper else base / "layerfs" / f"lower{i}"
        if dst.exists():
            dst.rmdir()
        copy_tree(src, dst)
        if src != kernel.upper:
            layerfs.lowers.append(dst)
    layerfs.sources = list(layerfs.lowers)
    if form != "overlay":
        convert = to_oci_form if form == "oci" else to_fuse_overlayfs_form
        assert sum(convert(p) for p in layerfs.lowers), f"{form} form asked for, but the layers have no markers"
    for side, name in ((kernel, "kernel"), (layerfs, "layerfs")):
        if ro_lowers:
            side.lowers = [side.sources[i].with_name(f"ro{i}") for i in range(len(side.sources))]
            for src, dst in zip(side.sources, side.lowers, strict=True):
                _bind_read_only(mounts, src, dst)
        mnt = (mnt_base or base) / f"{name}-mnt"
        if name == "kernel":
            mount = mounts.overlay
        else:
            mount = functools.partial(mounts.layerfs, extra=layerfs_options)
        side.mnt = mount(mnt, side.lowers) if readonly else mount(mnt, side.lowers, side.upper, side.work)
    return Pair(mounts, kernel, layerfs)


# -- observations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Err:
    """A failed call, as its errno name."""

    name: str

    def __repr__(self) -> str:
        return self.name


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn``'s result, or ``Err("ENOENT")`` etc. when it raises OSError."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return Err("EOPNOTSUPP" if name == "ENOTSUP" else name)  # one number, two names on Linux


def errname(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """ "ok", or the errno name ``fn`` failed with."""
    result = outcome(fn, *args, **kwargs)
    return result.name if isinstance(result, Err) else "ok"


KINDS = {  # file type bits -> the name a tree description uses
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def xattrs(path: Path | str) -> dict[str, bytes]:
    """All xattrs of ``path`` (not followed)."""
    out = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        out[name] = outcome(os.getxattr, path, name, follow_symlinks=False)
    return out


def content(data: bytes) -> bytes | str:
    """File content as an observation: small ones as they are, big ones by digest (readable diffs)."""
    return data if len(data) <= 256 else "sha256:" + hashlib.sha256(data).hexdigest()


def describe(path: Path | str, *, data: bool = True) -> dict[str, Any]:
    """What a user sees of one entry: type, mode, owner, link count, size, contents, target, xattrs.

    Directory sizes are left out: they depend on the history of the real directory, not on the tree.
    """
    st = os.lstat(path)
    kind = KINDS[stat.S_IFMT(st.st_mode)]
    d: dict[str, Any] = {
        "type": kind,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
    }
    if kind == "file":
        d["size"] = st.st_size
        if data:
            d["data"] = content(Path(path).read_bytes())
    elif kind == "symlink":
        d["size"] = st.st_size
        d["target"] = os.readlink(path)
    elif kind in ("chardev", "blockdev"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    d["xattrs"] = xattrs(path)
    return d


def _entries(root: Path | str) -> Iterator[tuple[str, str, int, os.stat_result]]:
    """(relative path, name, parent directory fd, lstat) of every entry below ``root``, sorted, parents
    first. Works through directory descriptors, so paths longer than PATH_MAX are no obstacle."""

    def visit(fd: int, rel: str) -> Iterator[tuple[str, str, int, os.stat_result]]:
        for name in sorted(os.listdir(fd)):
            st = os.lstat(name, dir_fd=fd)
            child = f"{rel}/{name}" if rel else name
            yield child, name, fd, st
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    yield from visit(sub, child)
                finally:
                    os.close(sub)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield from visit(top, "")
    finally:
        os.close(top)


def walk(root: Path | str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root``, sorted, parents first, as (path relative to root, lstat)."""
    for rel, _, _, st in _entries(root):
        yield rel, st


def tree(root: Path | str, *, data: bool = True) -> dict[str, dict[str, Any]]:
    """The whole visible tree below ``root`` (itself as "."), each entry described."""
    out = {".": describe(root, data=data)}
    for rel, _ in walk(root):
        out[rel] = describe(os.path.join(root, rel), data=data)
    return dict(sorted(out.items()))


def upper_tree(upper: Path | str) -> dict[str, Any]:
    """An upper layer as a kernel overlay would read it: entries, whiteouts and opaque directories.

    Overlay's own bookkeeping xattrs (origin, impure, ...) are left out; only opaque matters here.
    """
    out: dict[str, Any] = {}
    for rel, st in walk(upper):
        p = os.path.join(upper, rel)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out[rel] = "whiteout"
            continue
        d = describe(p)
        if d["type"] == "dir":
            d["opaque"] = outcome(os.getxattr, p, OPAQUE_XATTR) == b"y"
        d["xattrs"] = {k: v for k, v in d["xattrs"].items() if not k.startswith(PRIVATE_XATTR_PREFIXES)}
        out[rel] = d
    return out


def assert_no_internals(root: Path | str) -> None:
    """No whiteout, opaque marker or private xattr of any layer shows through the mount at ``root``."""
    for rel, name, parent_fd, st in _entries(root):
        assert not name.startswith(OCI_WHITEOUT), f"internal name visible: {rel}"
        assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), f"whiteout device visible: {rel}"
        # Through the parent's descriptor: the full path may be longer than PATH_MAX.
        shown = os.listxattr(f"/proc/self/fd/{parent_fd}/{name}", follow_symlinks=False)
        assert not [n for n in shown if n.startswith(PRIVATE_XATTR_PREFIXES)], f"private xattr visible: {rel}"


def explain(expected: Any, got: Any) -> str:
    """A readable difference between the kernel's observations and layerfs's."""
    if isinstance(expected, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(set(expected) | set(got), key=str):
            e, g = expected.get(key, "<missing>"), got.get(key, "<missing>")
            if e != g:
                lines.append(f"  {key}:\n    kernel:  {e!r}\n    layerfs: {g!r}")
        return "layerfs differs from kernel overlayfs:\n" + "\n".join(lines)
    diff = difflib.unified_diff(
        pprint.pformat(expected).splitlines(), pprint.pformat(got).splitlines(), "kernel", "layerfs", lineterm=""
    )
    return "layerfs differs from kernel overlayfs:\n" + "\n".join(diff)


# -- other users ----------------------------------------------------------------------------------


def run_as(uid: int, gid: int, fn: Callable[..., Any], *args: Any, groups: tuple[int, ...] = ()) -> Any:
    """Call ``fn(*args)`` in a forked child running as ``uid``/``gid`` and return its (picklable) result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            try:
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                result: tuple[str, Any] = ("ok", fn(*args))
            except BaseException as e:  # (reported to the parent)
                result = ("raised", repr(e))
            try:
                data = pickle.dumps(result)
            except Exception as e:
                data = pickle.dumps(("raised", f"unpicklable result: {e!r}"))
            with os.fdopen(write_end, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise AssertionError(f"scenario as uid {uid} raised {value}")
    return value


def as_user(scenario: Scenario, uid: int = USER, gid: int = USER) -> Scenario:
    """The same scenario, run as ``uid``/``gid`` with no supplementary groups."""
    return lambda mnt, *args: run_as(uid, gid, scenario, mnt, *args)
