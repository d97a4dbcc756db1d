"""File-system operations as data: apply one to any mounted tree and get a comparable outcome; and a
seeded generator of random operations over a visible tree.

An ``Op`` names a system call and its arguments, with paths relative to the mount root. ``apply(root,
op)`` performs it and returns an ``Outcome``: ``("ok", value)`` (value: what was read, listed, written) or
``("err", "ENOENT")``. Applied to kernel overlayfs and to layerfs, the two outcomes must be equal.

Safety: the trees contain absolute and relative symlinks, and following one from the host would touch
the host. Every operation uses the no-follow form of its call; the two calls that only exist in a
following form (truncate(2), chmod(2)) and listdir are not performed on a symlink (outcome ``skip``); and
a path whose parent resolves outside the mount is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace

from pair import run_as
from snapshot import short_path
from treespec import DIR_MODES, FILE_MODES, OWNERS, RECENT_NS, TreeSpec, odd_name

Outcome = tuple  # ("ok", value) | ("err", errno name) | ("skip", why)

_OPEN_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a fifo never blocks us


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple
    uid: int | None = None  # run as this user (gid the same, no supplementary groups); None: root

    def __str__(self) -> str:
        shown = [
            f"<{len(a)} bytes>"
            if isinstance(a, bytes) and len(a) > 16
            else repr(short_path(a))
            if isinstance(a, str)
            else repr(a)
            for a in self.args
        ]
        return f"{self.name}({', '.join(shown)})" + (f" as uid {self.uid}" if self.uid is not None else "")

    @property
    def paths(self) -> list[str]:
        """The merged paths this operation names (to compare their state afterwards)."""
        if self.name == "symlink":
            return [self.args[1]]
        if self.name in ("rename", "link", "rename_open"):
            return list(self.args[:2])
        return [self.args[0]]


class Skipped(Exception):
    """The operation was not performed (it would have followed a symlink); both sides agree on it."""


def _err(e: OSError) -> Outcome:
    return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def _digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def _is_symlink(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_all(fd: int, data: bytes, offset: int | None = None) -> int:
    return os.pwrite(fd, data, offset) if offset is not None else os.write(fd, data)


def _open_and(path: str, flags: int, mode: int, action: Callable[[int], object]) -> object:
    fd = os.open(path, flags | _OPEN_NOFOLLOW, mode)
    try:
        return action(fd)
    finally:
        os.close(fd)


def _read(path: str, offset: int, size: int) -> str:
    return _open_and(path, os.O_RDONLY, 0, lambda fd: _digest(os.pread(fd, size, offset)))


def _do(root: str, op: Op) -> object:
    """Perform ``op`` below ``root``; returns the value of a successful call, raises OSError."""
    a = op.args
    p = os.path.join(root, a[0]) if a and isinstance(a[0], str) else root
    name = op.name
    if name == "create":  # (path, extra flags, mode, data)
        extra = {"": 0, "excl": os.O_EXCL, "trunc": os.O_TRUNC}[a[1]]
        return _open_and(p, os.O_CREAT | os.O_WRONLY | extra, a[2], lambda fd: _write_all(fd, a[3]))
    if name == "open_excl":
        return _open_and(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, a[1], lambda fd: None)
    if name == "write":  # (path, offset, data)
        return _open_and(p, os.O_WRONLY, 0, lambda fd: _write_all(fd, a[2], a[1]))
    if name == "append":
        return _open_and(p, os.O_WRONLY | os.O_APPEND, 0, lambda fd: _write_all(fd, a[1]))
    if name == "read":  # (path, offset, size)
        return _read(p, a[1], a[2])
    if name == "read_after_write":  # one descriptor: write, then read back through it

        def rw(fd: int) -> str:
            os.pwrite(fd, a[2], a[1])
            return _digest(os.pread(fd, 1 << 20, 0))

        return _open_and(p, os.O_RDWR, 0, rw)
    if name == "unlink_open":  # (path, data): unlink while open, then use the descriptor

        def orphan(fd: int) -> tuple:
            os.unlink(p)
            nlink = os.fstat(fd).st_nlink
            os.pwrite(fd, a[1], 0)
            return nlink, _digest(os.pread(fd, 1 << 20, 0)), os.fstat(fd).st_size

        return _open_and(p, os.O_RDWR, 0, orphan)
    if name == "orphan_setattr":  # (path, mode, ns): unlink while open, then fchmod and futimens

        def orphan_attrs(fd: int) -> tuple:
            os.unlink(p)
            os.fchmod(fd, a[1])
            os.utime(fd, ns=a[2])
            st = os.fstat(fd)
            return stat.filemode(st.st_mode), st.st_mtime_ns

        return _open_and(p, os.O_RDWR, 0, orphan_attrs)
    if name == "rename_open":  # (old, new, data): rename while open, write through the descriptor

        def moved(fd: int) -> None:
            os.rename(p, os.path.join(root, a[1]))
            os.pwrite(fd, a[2], 0)

        _open_and(p, os.O_RDWR, 0, moved)
        return _read(os.path.join(root, a[1]), 0, 1 << 20)
    if name == "ftruncate":
        return _open_and(p, os.O_WRONLY, 0, lambda fd: os.ftruncate(fd, a[1]))
    if name == "truncate":
        if _is_symlink(p):
            raise Skipped("symlink")
        return os.truncate(p, a[1])
    if name == "mkdir":
        return os.mkdir(p, a[1])
    if name == "rmdir":
        return os.rmdir(p)
    if name == "unlink":
        return os.unlink(p)
    if name == "rename":
        return os.rename(p, os.path.join(root, a[1]))
    if name == "link":
        return os.link(p, os.path.join(root, a[1]), follow_symlinks=False)
    if name == "symlink":  # (target, path)
        return os.symlink(a[0], os.path.join(root, a[1]))
    if name == "chmod":
        if _is_symlink(p):
            raise Skipped("symlink")
        return os.chmod(p, a[1])
    if name == "chown":
        return os.chown(p, a[1], a[2], follow_symlinks=False)
    if name == "utime":  # (path, ns or None for now)
        if a[1] is None:
            return os.utime(p, follow_symlinks=False)
        return os.utime(p, ns=a[1], follow_symlinks=False)
    if name == "setxattr":  # (path, name, value, flags)
        return os.setxattr(p, a[1], a[2], a[3], follow_symlinks=False)
    if name == "removexattr":
        return os.removexattr(p, a[1], follow_symlinks=False)
    if name == "getxattr":
        return os.getxattr(p, a[1], follow_symlinks=False)
    if name == "listxattr":
        return sorted(n for n in os.listxattr(p, follow_symlinks=False) if not n.startswith("trusted.overlay."))
    if name == "mknod":  # (path, file type bits, rdev, mode)
        return os.mknod(p, a[1] | a[3], a[2])
    if name == "listdir":
        if _is_symlink(p):
            raise Skipped("symlink")
        return sorted(os.listdir(p))
    if name == "stat":
        st = os.lstat(p)
        mtime = st.st_mtime_ns if st.st_mtime_ns < RECENT_NS else "recent"
        return (
            stat.filemode(st.st_mode),
            st.st_uid,
            st.st_gid,
            None if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_nlink),
            mtime,
        )
    raise ValueError(f"unknown operation {name}")


def inside(root: str, path: str) -> bool:
    """Whether the parent directory of ``path`` (relative to ``root``) resolves inside ``root``."""
    parent = os.path.dirname(os.path.join(root, path))
    real = os.path.realpath(parent)
    return real == os.path.realpath(root) or real.startswith(os.path.realpath(root) + "/")


def apply(root: str | os.PathLike, op: Op) -> Outcome:
    """Perform ``op`` below the mount ``root`` and return its comparable outcome. An op with a ``uid``
    runs in a child process as that user (the mount point must be reachable by it)."""
    root = os.fspath(root)
    if op.uid is not None:
        return run_as(op.uid, op.uid, apply, root, replace(op, uid=None))
    for path in op.paths:
        if not inside(root, path):
            return ("skip", "outside")
    try:
        return ("ok", _do(root, op))
    except OSError as e:
        return _err(e)
    except Skipped as e:
        return ("skip", str(e))


def rename_by_copy(root: str | os.PathLike, old: str, new: str) -> Outcome:
    """Rename ``old`` to ``new`` the way ``mv`` does when rename(2) says EXDEV: copy the tree preserving
    everything (``cp -a``: modes, owners, times, xattrs, hard links inside it), then remove the source.
    An existing ``new`` gets rename(2)'s treatment: a file or an empty directory is replaced, a non-empty
    one is ENOTEMPTY (the kernel checks that only after deciding on EXDEV)."""
    root = os.fspath(root)
    src, dst = os.path.join(root, old), os.path.join(root, new)
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        if os.path.lexists(dst):
            os.unlink(dst)
        subprocess.run(["cp", "-a", "--no-target-directory", src, dst], check=True, capture_output=True)
        os.unlink(src)
        return ("ok", None)
    if os.path.lexists(dst):
        if os.listdir(dst):
            return ("err", "ENOTEMPTY")
        os.rmdir(dst)
    dir_modes = {os.path.relpath(d, src): stat.S_IMODE(os.lstat(d).st_mode) for d, _, _ in os.walk(src)}
    subprocess.run(["cp", "-a", "--no-target-directory", src, dst], check=True, capture_output=True)
    # mkdir in a setgid parent inherits the bit and cp leaves it; a rename(2) keeps modes as they were.
    for rel, mode in dir_modes.items():
        os.chmod(os.path.normpath(os.path.join(dst, rel)), mode)
    shutil.rmtree(src)
    return ("ok", None)


def visible_kinds(root: str | os.PathLike) -> dict[str, str]:
    """relative path -> 'd' (directory), 'f' (regular file), 'l' (symlink) or 'o' (other) below root."""
    root = os.fspath(root)
    out: dict[str, str] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                child = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    out[child] = "d"
                    pending.append(child)
                elif e.is_symlink():
                    out[child] = "l"
                elif e.is_file(follow_symlinks=False):
                    out[child] = "f"
                else:
                    out[child] = "o"
    return out


# Not trusted.overlay.* / user.overlay.*: layerfs refuses to set those on purpose (EOPNOTSUPP), where
# kernel overlayfs 6.7+ stores them escaped. That decided difference is left to the xattr scenario tests.
_XATTR_NAMES = ("user.a", "user.comment", "user.new", "user.big", "trusted.test")

# operation name -> weight in the random mix
WEIGHTS = {
    "create": 9,
    "open_excl": 3,
    "write": 8,
    "append": 5,
    "read": 7,
    "read_after_write": 2,
    "truncate": 4,
    "ftruncate": 2,
    "mkdir": 6,
    "rmdir": 5,
    "unlink": 8,
    "rename_file": 8,
    "rename_dir": 5,
    "symlink": 4,
    "link": 4,
    "chmod": 4,
    "chown": 4,
    "utime": 4,
    "setxattr": 5,
    "removexattr": 3,
    "getxattr": 1,
    "listxattr": 2,
    "mkfifo": 2,
    "mknod": 1,
    "listdir": 3,
    "stat": 3,
    "unlink_open": 2,
    "rename_open": 2,
    "orphan_setattr": 1,
}


class RandomOps:
    """Random operations over the tree a mount currently shows, seeded.

    ``next(view)`` takes the visible tree (``visible_kinds`` of the reference mount) and returns an Op.
    Paths are mostly ones that exist, else names that existed in some layer or earlier in the run
    (so whiteouts and opaque directories get exercised), else fresh names.
    """

    def __init__(
        self, seed: int, spec: TreeSpec | None = None, *, user: int | None = None, user_share: float = 0.0
    ) -> None:
        """``user_share`` of the operations run as ``user`` instead of root."""
        self.rng = random.Random(seed * 7919 + 1)
        self.user, self.user_share = user, user_share
        self.known: set[str] = set(spec.paths()) if spec else set()
        self.counter = 0
        self.names = list(WEIGHTS)
        self.weights = [WEIGHTS[n] for n in self.names]

    # -- choosing paths ---------------------------------------------------------------------------

    def _pick(self, view: dict[str, str], kinds: str) -> str | None:
        pool = [p for p, k in view.items() if k in kinds]
        return self.rng.choice(pool) if pool else None

    def _new(self, view: dict[str, str]) -> str:
        """A path that does not exist, in a directory that does."""
        dirs = [p for p, k in view.items() if k == "d"] + [""]
        if self.rng.random() < 0.5:
            ghosts = [p for p in self.known if p not in view and (p.rpartition("/")[0] in view or "/" not in p)]
            if ghosts:
                return self.rng.choice(sorted(ghosts))
        self.counter += 1
        parent = self.rng.choice(dirs)
        return (parent + "/" if parent else "") + odd_name(self.rng, f"x{self.counter}")

    def _any(self, view: dict[str, str], kinds: str = "dflo") -> str:
        if self.rng.random() < 0.88:
            found = self._pick(view, kinds)
            if found is not None:
                return found
        return self._new(view)

    def _data(self) -> bytes:
        r = self.rng.random()
        size = (
            self.rng.randint(0, 64)
            if r < 0.5
            else self.rng.randint(65, 8192)
            if r < 0.9
            else self.rng.randint(8193, 96 * 1024)
        )
        return self.rng.randbytes(size)

    def _offset(self) -> int:
        return self.rng.choice((0, 0, 1, 100, 4095, 4096, 5000, 70000, self.rng.randint(0, 250_000)))

    def _time(self) -> tuple[int, int] | None:
        if self.rng.random() < 0.2:
            return None  # "now"
        t = 1_200_000_000 * 10**9 + self.rng.randrange(10**17)
        return (t, t + self.rng.randrange(10**9))

    # -- operations -------------------------------------------------------------------------------

    def next(self, view: dict[str, str]) -> Op:
        rng = self.rng
        kind = rng.choices(self.names, self.weights)[0]
        op = self._make(kind, view)
        for p in op.paths:
            self.known.add(p)
        if self.user is not None and rng.random() < self.user_share:
            op = replace(op, uid=self.user)
        return op

    def _make(self, kind: str, view: dict[str, str]) -> Op:
        rng = self.rng
        if kind == "create":
            return Op(
                "create",
                (
                    self._any(view, "fo") if rng.random() < 0.4 else self._new(view),
                    rng.choice(("", "", "excl", "trunc")),
                    rng.choice(FILE_MODES),
                    self._data(),
                ),
            )
        if kind == "open_excl":
            return Op("open_excl", (self._any(view), rng.choice(FILE_MODES)))
        if kind == "write":
            return Op("write", (self._any(view, "f"), self._offset(), self._data()))
        if kind == "append":
            return Op("append", (self._any(view, "f"), self._data()))
        if kind == "read":
            return Op(
                "read",
                (self._any(view, "fd"), self._offset() if rng.random() < 0.3 else 0, rng.choice((1 << 20, 100, 4096))),
            )
        if kind == "read_after_write":
            return Op("read_after_write", (self._any(view, "f"), self._offset(), self._data()))
        if kind in ("truncate", "ftruncate"):
            return Op(kind, (self._any(view, "f"), rng.choice((0, 0, 1, 4096, 10000, 300_000))))
        if kind == "mkdir":
            return Op("mkdir", (self._new(view) if rng.random() < 0.85 else self._any(view), rng.choice(DIR_MODES)))
        if kind == "rmdir":
            return Op("rmdir", (self._any(view, "d"),))
        if kind == "unlink":
            return Op("unlink", (self._any(view, "flo"),))
        if kind == "rename_file":
            old = self._any(view, "flo")
            r = rng.random()
            new = self._any(view, "flo") if r < 0.4 else self._any(view, "d") if r < 0.45 else self._new(view)
            return Op("rename", (old, new))
        if kind == "rename_dir":
            old = self._any(view, "d")
            r = rng.random()
            if r < 0.1:
                new = old + "/inside"
            elif r < 0.35:
                new = self._any(view, "d")  # empty: replaced; else ENOTEMPTY
            elif r < 0.4:
                new = self._any(view, "f")
            else:
                new = self._new(view)
            return Op("rename", (old, new))
        if kind == "symlink":
            target = (
                rng.choice(("dangling", "../x", "/d0/nowhere"))
                if rng.random() < 0.3
                else (self._pick(view, "fdl") or "t")
            )
            return Op("symlink", (target, self._new(view) if rng.random() < 0.9 else self._any(view)))
        if kind == "link":
            return Op(
                "link",
                (
                    self._any(view, "flo" if rng.random() < 0.9 else "d"),
                    self._new(view) if rng.random() < 0.85 else self._any(view),
                ),
            )
        if kind == "chmod":
            path = self._any(view, "fdo")
            return Op("chmod", (path, rng.choice(DIR_MODES if view.get(path) == "d" else FILE_MODES)))
        if kind == "chown":
            uid, gid = rng.choice(OWNERS)
            r = rng.random()
            return Op("chown", (self._any(view), -1 if r < 0.15 else uid, -1 if 0.15 <= r < 0.3 else gid))
        if kind == "utime":
            return Op("utime", (self._any(view), self._time()))
        if kind == "setxattr":
            flags = rng.choice((0, 0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
            return Op(
                "setxattr", (self._any(view, "fd"), rng.choice(_XATTR_NAMES), rng.randbytes(rng.randint(0, 40)), flags)
            )
        if kind in ("removexattr", "getxattr"):
            return Op(kind, (self._any(view, "fd"), rng.choice(_XATTR_NAMES)))
        if kind == "listxattr":
            return Op("listxattr", (self._any(view, "fd"),))
        if kind == "mkfifo":
            return Op(
                "mknod",
                (
                    self._new(view) if rng.random() < 0.9 else self._any(view),
                    stat.S_IFIFO,
                    0,
                    rng.choice((0o644, 0o600)),
                ),
            )
        if kind == "mknod":
            rdev = rng.choice((os.makedev(1, 3), os.makedev(0, 0)))  # 0/0 is a whiteout: refused
            return Op("mknod", (self._new(view), stat.S_IFCHR, rdev, 0o600))
        if kind == "listdir":
            return Op("listdir", (self._any(view, "d"),))
        if kind == "unlink_open":
            return Op("unlink_open", (self._any(view, "f"), self._data()))
        if kind == "orphan_setattr":
            return Op("orphan_setattr", (self._any(view, "f"), rng.choice(FILE_MODES), self._time() or (0, 0)))
        if kind == "rename_open":
            new = self._any(view, "f") if rng.random() < 0.3 else self._new(view)
            return Op("rename_open", (self._any(view, "f"), new, self._data()))
        if kind == "stat":
            return Op("stat", (self._any(view),))
        raise ValueError(kind)


def drive(root: str | os.PathLike, ops: RandomOps, n: int) -> dict[str, int]:
    """Apply ``n`` random operations to the one mount ``root`` (no oracle), renaming directories the way
    ``mv`` does where the mount answers EXDEV. Returns how often each operation succeeded or failed."""
    counts: dict[str, int] = {}
    for _ in range(n):
        op = ops.next(visible_kinds(root))
        result = apply(root, op)
        if op.name == "rename" and result == ("err", "EXDEV") and op.uid is None:
            result = rename_by_copy(root, *op.args)
        key = f"{op.name} {result[0] if result[0] != 'err' else result[1]}"
        counts[key] = counts.get(key, 0) + 1
    return counts
