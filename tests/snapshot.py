"""Snapshots of directory trees for comparing two filesystems, and readable diffs of them.

``snapshot(root)`` records what a user of a mounted tree can see: per path its type, permission bits,
owner, size, content hash, symlink target, device number, xattrs (minus overlay's private
``trusted.overlay.*``), link count for non-directories, and mtime. ``snapshot_upper(upper)`` reads an
overlay *upper layer* instead: whiteouts (0/0 character devices) become kind ``whiteout`` and directories
record whether they are opaque, so two uppers can be compared marker for marker.

Times: mtimes are compared as "set by someone on purpose" (the generated trees and the tests only set
times before ``treespec.RECENT_NS``, kept exact) versus "changed now" (any later value, reduced to
``"recent"``): two mounts changed at different wall-clock moments agree on that, and a stale or
wrongly kept mtime still shows. atime and ctime are not compared.

Inode numbers are not comparable between filesystems, but which names share one is: ``link_groups``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from treespec import RECENT_NS

OVERLAY_PRIVATE = "trusted.overlay."

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


class Entry(NamedTuple):
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None  # None for directories
    sha: str | None  # regular files
    target: str | None  # symlinks
    rdev: tuple[int, int] | None  # devices
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int | None  # None for directories
    mtime: object  # exact ns when set on purpose, "recent" when changed now; None for whiteouts
    opaque: bool | None = None  # upper-layer snapshots only

    def __str__(self) -> str:
        parts = [self.kind, f"{self.mode:04o}" if self.mode is not None else "mode?", f"{self.uid}:{self.gid}"]
        for name in ("size", "sha", "target", "rdev", "nlink", "mtime", "opaque"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value if name != 'sha' else value[:10]}")
        if self.xattrs:
            parts.append("xattrs=" + ",".join(f"{n}={v[:16]!r}" for n, v in self.xattrs))
        return " ".join(parts)


WHITEOUT = Entry("whiteout", 0, 0, 0, None, None, None, None, (), None, None)


def short_path(path: str, keep: int = 24) -> str:
    """``path`` for messages: components longer than ``keep`` characters cut, with their length."""
    return "/".join(c if len(c) <= keep else f"{c[:keep]}…[{len(c)}]" for c in path.split("/"))


def normalize_mtime(ns: int) -> object:
    return ns if ns < RECENT_NS else "recent"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        if name.startswith(OVERLAY_PRIVATE):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            out.append((name, f"<{errno.errorcode.get(e.errno, e.errno)}>".encode()))
    return tuple(sorted(out))


def _sha(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def entry_of(path: str, st: os.stat_result | None = None, *, upper: bool = False) -> Entry:
    """The Entry for the real path ``path`` (never followed)."""
    if st is None:
        st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    if upper and fmt == stat.S_IFCHR and st.st_rdev == 0:
        return WHITEOUT
    kind = _KINDS[fmt]
    is_dir = fmt == stat.S_IFDIR
    opaque = None
    if upper and is_dir:
        try:
            opaque = os.getxattr(path, OVERLAY_PRIVATE + "opaque", follow_symlinks=False) == b"y"
        except OSError:
            opaque = False
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if is_dir else st.st_size,
        sha=_sha(path) if fmt == stat.S_IFREG else None,
        target=os.readlink(path) if fmt == stat.S_IFLNK else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None,
        xattrs=_xattrs(path) if fmt in (stat.S_IFREG, stat.S_IFDIR) else (),
        nlink=None if is_dir else st.st_nlink,
        mtime=normalize_mtime(st.st_mtime_ns),
        opaque=opaque,
    )


@dataclass
class Snapshot:
    """path ('.' for the root, else relative with '/') -> Entry, plus inode numbers for link groups."""

    entries: dict[str, Entry]
    inodes: dict[str, int]

    def link_groups(self) -> set[frozenset[str]]:
        """Sets of non-directory paths sharing an inode number, where there is more than one.
        Whiteouts are left out: kernel overlayfs makes them hard links of one shared inode."""
        by_ino: dict[int, set[str]] = {}
        for path, ino in self.inodes.items():
            if self.entries[path].kind not in ("dir", "whiteout"):
                by_ino.setdefault(ino, set()).add(path)
        return {frozenset(g) for g in by_ino.values() if len(g) > 1}


def _walk(root: str) -> Iterable[tuple[str, str, os.stat_result]]:
    """(relative path, real path, lstat) for root and everything below, parents first, never following."""
    yield ".", root, os.lstat(root)
    pending = [""]
    while pending:
        rel = pending.pop()
        real_dir = os.path.join(root, rel) if rel else root
        with os.scandir(real_dir) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            child = f"{rel}/{item.name}" if rel else item.name
            st = item.stat(follow_symlinks=False)
            yield child, item.path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append(child)


def snapshot(root: str | os.PathLike) -> Snapshot:
    """What a user sees below ``root`` (a mount point or any directory)."""
    entries, inodes = {}, {}
    for rel, real, st in _walk(os.fspath(root)):
        entries[rel] = entry_of(real, st)
        inodes[rel] = st.st_ino
    return Snapshot(entries, inodes)


def snapshot_upper(upper: str | os.PathLike) -> Snapshot:
    """An overlay upper layer as stored: whiteouts and opaque markers recorded as such. Anything else an
    implementation leaves there (``.wh.`` files, private ``user.*`` xattrs) shows as an ordinary entry."""
    entries, inodes = {}, {}
    for rel, real, st in _walk(os.fspath(upper)):
        entries[rel] = entry_of(real, st, upper=True)
        inodes[rel] = st.st_ino
    return Snapshot(entries, inodes)


def without_idle_opaque(a: Snapshot, b: Snapshot, lower_dirs: set[str], uppers: tuple) -> tuple[Snapshot, Snapshot]:
    """Two upper layers' snapshots ``a`` and ``b`` (of the upper directories ``uppers``) with the opaque
    flag blanked on the directories where, in either, it hides nothing.

    An opaque mark matters only where a lower layer has a directory that the upper's parents reach: at
    its path, or where the redirects of its parents send the lookup (no opaque ancestor in the upper).
    Kernel overlayfs with redirects marks every directory made or moved into a merged parent opaque,
    layerfs only where there is something to hide; both read the same. ``lower_dirs`` holds the directory
    paths of the merged lower layers.
    """
    idle = _idle_opaque(a, lower_dirs, uppers[0]) | _idle_opaque(b, lower_dirs, uppers[1])
    return tuple(
        Snapshot(
            {path: entry._replace(opaque=None) if path in idle else entry for path, entry in snap.entries.items()},
            snap.inodes,
        )
        for snap in (a, b)
    )


def _idle_opaque(snap: Snapshot, lower_dirs: set[str], upper: str | os.PathLike) -> set[str]:
    idle = set()
    below: dict[str, str] = {}  # upper directory -> the path the lowers are looked up at for it
    for path in sorted(snap.entries, key=lambda p: p.count("/")):
        if snap.entries[path].kind != "dir" or path == ".":
            continue
        parent, _, name = path.rpartition("/")
        try:
            target = os.fsdecode(
                os.getxattr(os.path.join(upper, path), OVERLAY_PRIVATE + "redirect", follow_symlinks=False)
            )
        except OSError:
            target = name
        below[path] = target.lstrip("/") if target.startswith("/") else (below[parent] + "/" if parent else "") + target
        parts = path.split("/")
        if any(snap.entries["/".join(parts[:i])].opaque for i in range(1, len(parts))) or below[path] not in lower_dirs:
            idle.add(path)
    return idle


def _project(entry: Entry, ignore: frozenset[str]) -> Entry:
    return entry._replace(**{f: None for f in ignore}) if ignore else entry


def diff(
    a: Snapshot | dict[str, Entry],
    b: Snapshot | dict[str, Entry],
    *,
    ignore: Iterable[str] = (),
    names: tuple[str, str] = ("a", "b"),
    limit: int = 40,
) -> list[str]:
    """Differences between two snapshots as readable lines; empty when equal.

    ``ignore`` names Entry fields left out (e.g. ``("mtime",)``, or ``("mtime", "opaque")``).
    For Snapshots, link groups are compared as well.
    """
    ignore = frozenset(ignore)
    ea = a.entries if isinstance(a, Snapshot) else a
    eb = b.entries if isinstance(b, Snapshot) else b
    na, nb = names
    lines = []
    for path in sorted(ea.keys() | eb.keys()):
        x, y = ea.get(path), eb.get(path)
        if x is None:
            lines.append(f"only in {nb}: {short_path(path)}: {y}")
        elif y is None:
            lines.append(f"only in {na}: {short_path(path)}: {x}")
        else:
            x, y = _project(x, ignore), _project(y, ignore)
            if x != y:
                changed = [f for f in Entry._fields if getattr(x, f) != getattr(y, f)]
                detail = "; ".join(f"{f}: {_short(f, getattr(x, f))} vs {_short(f, getattr(y, f))}" for f in changed)
                lines.append(f"differs: {short_path(path)}: {detail}")
    if isinstance(a, Snapshot) and isinstance(b, Snapshot) and "nlink" not in ignore:
        ga, gb = a.link_groups(), b.link_groups()
        for g in sorted(ga - gb, key=sorted):
            lines.append(f"hard-link group only in {na}: {[short_path(p) for p in sorted(g)]}")
        for g in sorted(gb - ga, key=sorted):
            lines.append(f"hard-link group only in {nb}: {[short_path(p) for p in sorted(g)]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _short(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:04o}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def assert_same(a, b, *, what: str, ignore: Iterable[str] = (), names: tuple[str, str] = ("a", "b")) -> None:
    """Fail with a readable diff when the snapshots differ."""
    lines = diff(a, b, ignore=ignore, names=names)
    assert not lines, f"{what} differ ({names[0]} vs {names[1]}):\n  " + "\n  ".join(lines)
