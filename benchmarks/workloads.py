"""The workloads: what is timed, on a mount's root directory.

Each body is a plain function of a ``Ctx`` that does the work and returns how many items it handled
(entries, files, bytes...), recorded next to the time so that a run shows when implementations did not
see the same tree. Bodies do the system calls directly (os.*) or run the real program (tar, chroot), so
the measuring overhead is small and the same for every implementation.

How a workload is repeated is its ``mode``:
Every workload has one untimed pass first: on every implementation for ``warm``, on the first one
otherwise (so that no timed pass is the first of its kind in the run; see runner.py).

- ``warm``: one untimed pass first, then the timed passes, on the run's long-lived mount. Dentry and
  inode caches are then reliably warm; file data is not always (this machine's VM evicts idle page cache
  within a fraction of a second, so "warm" data reads often come from the host's cache).
- ``cold``: before each timed pass a fresh mount (its own empty upper layer, a new daemon) and
  ``echo 3 > /proc/sys/vm/drop_caches``. Native gets the cache drop.
- ``fresh``: a fresh mount before each pass, caches kept (a new container over an image in cache).
- ``plain``: timed passes on the long-lived mount, no warm-up (write workloads that clean up after
  themselves).

Write workloads work in the rootfs's ``/tmp`` under a name unique to the pass, and remove what they made
(untimed) unless removing is the workload. podman-build (podman.py) works in a Podman storage of its own.
chown-r changes lower entries themselves, on fresh mounts; on the plain directory, whose files are the
layers' own inodes (hard links), it puts back what it changed.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from . import podman
from .data import Data
from .util import below, remove_tree

MiB = 1 << 20
OPEN_FILES = 8  # open-close cycles through this many lower files
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
CHOWN_DIR = "usr"  # chown-r's tree: most of the rootfs's files (Debian's /usr holds /bin, /lib, /sbin)
CAPABILITY = "security.capability"
# Not unionfs-fuse: a directory it copies up gets a new inode number, and chown's tree walk (fts), finding
# another directory than the one it listed, stops with ENOENT ("fts_read failed").
CHOWN_IMPLS = ("native", "overlay", "overlay-metacopy", "fuse-overlayfs", "layerfs", "layerfs-metacopy")


@dataclass(frozen=True)
class Scale:
    """Sizes that differ between a full run and --quick."""

    name: str
    reps: int
    randreads: int
    creates: int
    meta_dirs: int
    build_sources: int
    seqwrite_mib: int
    smallwrite_mib: int
    opens: int
    timeout: float  # seconds one timed pass may take before its daemon is stopped


FULL = Scale(
    "full",
    reps=5,
    randreads=20_000,
    creates=5_000,
    meta_dirs=400,
    build_sources=600,
    seqwrite_mib=256,
    smallwrite_mib=100,
    opens=20_000,
    timeout=300,
)
QUICK = Scale(
    "quick",
    reps=1,
    randreads=5_000,
    creates=2_000,
    meta_dirs=150,
    build_sources=200,
    seqwrite_mib=128,
    smallwrite_mib=32,
    opens=5_000,
    timeout=120,
)


@dataclass
class Ctx:
    root: str  # the mount point (or native directory)
    data: Data
    scale: Scale
    rep: int  # 0-based repetition; -1 for a warm-up pass
    tag: str  # unique per pass: scratch names
    impl: str  # the implementation's name (podman-build picks Podman's overlay driver by it)
    kept: list[tuple] = field(default_factory=list)  # what prepare noted for cleanup to put back

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def scratch(self, what: str) -> str:
        return os.path.join(self.root, "tmp", f"bench-{what}-{self.tag}")


@dataclass(frozen=True)
class Workload:
    name: str
    group: str  # --only accepts a group name for all its variants
    doc: str
    body: Callable[[Ctx], int]
    mode: str = "plain"  # warm | cold | fresh | plain (see the module docstring)
    unit: str = "entries"
    layered: bool = False  # also run on layerfs-flat: the 3-layers-vs-1 comparison
    # The only implementations it applies to (None: all but the variants, which run only where named).
    impls: tuple[str, ...] | None = None
    # A directory the workload changes: after each pass (untimed) what the pass left in the upper layer
    # is measured, to be reported against that directory's size in the merged view.
    measure_upper: str | None = None
    prepare: Callable[[Ctx], None] | None = None  # untimed, before each pass
    cleanup: Callable[[Ctx], None] | None = None  # untimed, after each pass


# -- reading


def _walk(root: str, visit: Callable[[os.DirEntry], None], skip: frozenset = frozenset()) -> None:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                visit(e)
                if e.is_dir(follow_symlinks=False) and e.path not in skip:
                    stack.append(e.path)


def stat_all(ctx: Ctx) -> int:
    """lstat every entry of the tree, as find/du do (readdir, then a stat per name)."""
    count = 0

    def visit(e: os.DirEntry) -> None:
        nonlocal count
        os.lstat(e.path)
        count += 1

    _walk(ctx.root, visit)
    return count


def read_all(ctx: Ctx) -> int:
    """Open, read to the end and close every regular file (the big files aside)."""
    buf = bytearray(MiB)
    count = 0

    def visit(e: os.DirEntry) -> None:
        nonlocal count
        if e.is_file(follow_symlinks=False):
            with open(e.path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            count += 1

    _walk(ctx.root, visit, skip=frozenset({ctx.path("bench"), ctx.path("proc"), ctx.path("sys")}))
    return count


def seq_read(ctx: Ctx) -> int:
    """Read the 512 MiB file from start to end in 1 MiB reads; returns bytes."""
    buf = bytearray(MiB)
    total = 0
    with open(ctx.path(ctx.data.manifest["big"]["big-512M"]), "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def random_read(ctx: Ctx) -> int:
    """4 KiB preads at random aligned offsets of the 512 MiB file (the same offsets every pass)."""
    path = ctx.path(ctx.data.manifest["big"]["big-512M"])
    rng = random.Random(11)
    blocks = os.path.getsize(path) // 4096
    offsets = [rng.randrange(blocks) * 4096 for _ in range(ctx.scale.randreads)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)
    return len(offsets)


def open_close(ctx: Ctx) -> int:
    """Open and close a few lower files over and over: the per-open cost, lookups cached."""
    paths = [ctx.path(rel) for rel in ctx.data.manifest["build_sources"][:OPEN_FILES]]
    for i in range(ctx.scale.opens):
        os.close(os.open(paths[i % OPEN_FILES], os.O_RDONLY))
    return ctx.scale.opens


# -- writing


def _mkdir_scratch(what: str) -> Callable[[Ctx], None]:
    return lambda ctx: os.mkdir(ctx.scratch(what))


def _remove_scratch(what: str) -> Callable[[Ctx], None]:
    return lambda ctx: remove_tree(ctx.scratch(what))


def create_delete(ctx: Ctx) -> int:
    """Create small files (100 B to 4 KiB) in a new directory, delete them all, remove the directory."""
    d = ctx.scratch("cd")
    os.mkdir(d)
    payloads = [os.urandom(n) for n in (100, 700, 1500, 4096)]
    names = [os.path.join(d, f"f{i:05d}") for i in range(ctx.scale.creates)]
    for i, name in enumerate(names):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payloads[i % 4])
        os.close(fd)
    for name in names:
        os.unlink(name)
    os.rmdir(d)
    return len(names)


def copy_up(ctx: Ctx) -> int:
    """The first write to the 100 MiB lower file: open for writing, write one byte, close."""
    fd = os.open(ctx.path(ctx.data.manifest["big"]["big-100M"]), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x", 4096)
    finally:
        os.close(fd)
    return 1


def dir_rename(ctx: Ctx) -> int:
    """mv of usr/share/doc (a lower directory of thousands of files) to a new name: one rename by redirect
    where the union makes them (layerfs; kernel overlayfs, mounted with redirect_dir=on here), else mv's
    copy and delete after EXDEV (fuse-overlayfs, unionfs-fuse)."""
    subprocess.run(["mv", ctx.path("usr/share/doc"), ctx.path("usr/share/doc-moved")], check=True)
    return 1


def _rename_back(ctx: Ctx) -> None:
    """The plain directory has no fresh mount to start the next pass from: the directory goes back."""
    if ctx.impl == "native":
        os.rename(ctx.path("usr/share/doc-moved"), ctx.path("usr/share/doc"))


def chown_r(ctx: Ctx) -> int:
    """chown -R of /usr, every entry a lower one: a copy-up of each, of its data too unless the union copies
    metadata alone (metacopy=on)."""
    subprocess.run(["chown", "-R", "1000:1000", ctx.path(CHOWN_DIR)], check=True, timeout=ctx.scale.timeout)
    return 1


def _note_owners(ctx: Ctx) -> None:
    """What chown changes on the plain directory, noted first: owners; the setuid and setgid bits and file
    capabilities, which a chown clears."""
    if ctx.impl == "native":
        top = ctx.path(CHOWN_DIR)
        for path in [top, *below(top)]:
            st = os.lstat(path)
            ctx.kept.append((path, st.st_uid, st.st_gid, st.st_mode, _capability(path)))


def _capability(path: str) -> bytes | None:
    """A file's capabilities (security.capability), or None."""
    try:
        return os.getxattr(path, CAPABILITY, follow_symlinks=False)
    except OSError:  # none (ENODATA), or a symlink's (unsupported)
        return None


def _restore_owners(ctx: Ctx) -> None:
    """The plain directory's files are the layers' own inodes: the next implementations would see 1000:1000."""
    for path, uid, gid, mode, capability in ctx.kept:
        os.chown(path, uid, gid, follow_symlinks=False)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(mode))
        if capability is not None:
            os.setxattr(path, CAPABILITY, capability, follow_symlinks=False)


def _write_new(ctx: Ctx, block: bytes, mib: int) -> int:
    """Write a new file of ``mib`` MiB in writes of ``block`` and close it (no fsync, like plain dd); bytes."""
    fd = os.open(ctx.scratch("sw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib * MiB // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
    return mib * MiB


def seq_write(ctx: Ctx) -> int:
    """1 MiB writes: few requests, the data path's throughput."""
    return _write_new(ctx, os.urandom(MiB), ctx.scale.seqwrite_mib)


def small_write(ctx: Ctx) -> int:
    """dd if=/dev/zero bs=4k: one request per write unless the kernel gathers them (writeback cache)."""
    return _write_new(ctx, bytes(4096), ctx.scale.smallwrite_mib)


def _remove_written(ctx: Ctx) -> None:
    os.unlink(ctx.scratch("sw"))
    os.sync()  # so the next pass does not pay for this one's writeback


def untar(ctx: Ctx) -> int:
    """GNU tar extracting the Python library directories (a few thousand files) into a new directory."""
    subprocess.run(
        ["tar", "-xf", str(ctx.data.untar), "-C", ctx.scratch("untar")], check=True, timeout=ctx.scale.timeout
    )
    return ctx.data.manifest["untar_entries"]


def meta_mix(ctx: Ctx) -> int:
    """Metadata churn on new and lower entries: mkdir, create, rename within and across directories,
    unlink, rmdir; renames and deletes of lower files (copy-ups and whiteouts); emptying lower
    directories, removing them and making them again (opaque directories over deleted ones)."""
    ops = 0
    top = ctx.scratch("meta")
    os.mkdir(top)
    for i in range(ctx.scale.meta_dirs):
        d = os.path.join(top, f"d{i}")
        os.mkdir(d)
        fd = os.open(os.path.join(d, "a"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"meta")
        os.close(fd)
        os.rename(os.path.join(d, "a"), os.path.join(d, "b"))
        os.mkdir(os.path.join(d, "sub"))
        os.rename(os.path.join(d, "b"), os.path.join(d, "sub", "c"))
        os.unlink(os.path.join(d, "sub", "c"))
        os.rmdir(os.path.join(d, "sub"))
        ops += 8
    for i in range(ctx.scale.meta_dirs):
        os.rmdir(os.path.join(top, f"d{i}"))
    os.rmdir(top)
    slices = len(ctx.data.manifest["meta_files"])
    rep = ctx.rep if ctx.rep >= 0 else slices - 1  # an untimed first pass takes the last slice
    if rep >= slices - 1 and ctx.rep >= 0:
        raise RuntimeError(f"meta-mix has lower targets for {slices - 1} timed passes only")
    for rel in ctx.data.manifest["meta_files"][rep]:
        path = ctx.path(rel)
        os.rename(path, path + ".moved")
        os.unlink(path + ".moved")
        ops += 2
    for rel in ctx.data.manifest["meta_dirs"][rep]:
        path = ctx.path(rel)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
        os.mkdir(path)
        os.rmdir(path)
        ops += 3
    return ops + 1 + ctx.scale.meta_dirs


def build_mix(ctx: Ctx) -> int:
    """A compiler-like loop over lower source files: stat the source, look for headers that mostly do not
    exist, read the source, write an object through a temporary name and rename it; then a link step
    that reads every object and writes one output."""
    out = ctx.scratch("build")
    objs = os.path.join(out, "obj")
    os.makedirs(objs)
    sources = ctx.data.manifest["build_sources"][: ctx.scale.build_sources]
    missing = [ctx.path(f"usr/include/bench-{i}.h") for i in range(4)]
    for i, rel in enumerate(sources):
        src = ctx.path(rel)
        os.stat(src)
        for header in missing:
            try:
                os.stat(header)
            except FileNotFoundError:
                pass
        with open(src, "rb") as f:
            text = f.read()
        tmp = os.path.join(objs, f"{i}.o.tmp")
        with open(tmp, "wb") as f:
            f.write(text[: len(text) // 2] + b"\0" * 512)
        os.rename(tmp, os.path.join(objs, f"{i}.o"))
        if i % 50 == 0:
            os.listdir(objs)
    with open(os.path.join(out, "a.out"), "wb") as linked:
        for name in sorted(os.listdir(objs)):
            with open(os.path.join(objs, name), "rb") as f:
                linked.write(f.read())
    return len(sources)


# -- a container starting


def container_start(ctx: Ctx) -> int:
    """What a container's first seconds do to its rootfs: with the Debian rootfs, chroot into the mount
    and run a dynamically linked program and interpreters loading their libraries (ls -l, python3
    importing stdlib modules, perl loading modules, git); with the generated tree, the same kind of
    name lookups done directly (a dynamic loader's and an importer's search paths, mostly misses)."""
    start = ctx.data.manifest["start"]
    if start["kind"] == "chroot":
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for command in start["commands"]:
            r = subprocess.run(
                [CHROOT, ctx.root] + command,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=ctx.scale.timeout,
            )
            if r.returncode:
                raise RuntimeError(f"{command[0]} in the chroot: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        return len(start["commands"])
    return _lookups(ctx, start)


def _lookups(ctx: Ctx, start: dict) -> int:
    probes = 0
    for name in start["libs"]:
        for d in start["libdirs"]:
            probes += 1
            try:
                with open(ctx.path(f"{d}/{name}"), "rb") as f:
                    f.read(4096)
                break
            except FileNotFoundError:
                pass
    suffixes = [".cpython-311-x86_64-linux-gnu.so", ".abi3.so", ".so", ".py", ".pyc", "/__init__.py"]
    for module in start["modules"]:
        found = False
        for d in start["pydirs"]:
            for suffix in suffixes:
                probes += 1
                try:
                    with open(ctx.path(f"{d}/{module}{suffix}"), "rb") as f:
                        f.read()
                    found = True
                    break
                except (FileNotFoundError, NotADirectoryError):
                    pass
            if found:
                break
    return probes


WORKLOADS = [
    Workload(
        "stat-cold", "stat", "lstat every entry after a fresh mount and a cache drop", stat_all, "cold", layered=True
    ),
    Workload("stat-warm", "stat", "lstat every entry, caches warm", stat_all, "warm", layered=True),
    Workload(
        "read-cold",
        "read",
        "read every file after a fresh mount and a cache drop",
        read_all,
        "cold",
        "files",
        layered=True,
    ),
    Workload("read-warm", "read", "read every file again", read_all, "warm", "files", layered=True),
    Workload("seqread-cold", "seqread", "read 512 MiB sequentially after a cache drop", seq_read, "cold", "bytes"),
    Workload("seqread-warm", "seqread", "read 512 MiB sequentially again", seq_read, "warm", "bytes"),
    Workload("randread", "randread", "random 4 KiB reads in the 512 MiB file", random_read, "warm", "reads"),
    Workload(
        "open-close",
        "open-close",
        "open and close 8 lower files in turn, 20,000 times (5,000 with "
        "--quick); one open+close takes the time / that count",
        open_close,
        "warm",
        "opens",
    ),
    Workload(
        "start",
        "start",
        "container start: chroot exec of programs and interpreters after a fresh mount",
        container_start,
        "fresh",
        "commands",
    ),
    Workload(
        "copyup", "copyup", "first write to a 100 MiB lower file (fresh mount each time)", copy_up, "fresh", "files"
    ),
    Workload(
        "dir-rename",
        "dir-rename",
        "mv of a lower directory of thousands of files (fresh mount each time)",
        dir_rename,
        "fresh",
        "renames",
        cleanup=_rename_back,
    ),
    Workload(
        "chown-r",
        "chown-r",
        "chown -R 1000:1000 of /usr (fresh mount each time); the bytes it leaves in the upper layer measured after it",
        chown_r,
        "fresh",
        "trees",
        measure_upper=CHOWN_DIR,
        impls=CHOWN_IMPLS,
        prepare=_note_owners,
        cleanup=_restore_owners,
    ),
    Workload("create-delete", "create-delete", "create small files, then delete them", create_delete, "plain", "files"),
    Workload(
        "seqwrite",
        "seqwrite",
        "write a new file sequentially in 1 MiB writes",
        seq_write,
        "plain",
        "bytes",
        cleanup=_remove_written,
    ),
    Workload(
        "smallwrite",
        "smallwrite",
        "write a new 100 MiB file in 4 KiB writes (32 MiB with --quick)",
        small_write,
        "plain",
        "bytes",
        cleanup=_remove_written,
    ),
    Workload(
        "untar",
        "untar",
        "tar -x of a few thousand files",
        untar,
        "plain",
        "entries",
        prepare=_mkdir_scratch("untar"),
        cleanup=_remove_scratch("untar"),
    ),
    Workload(
        "meta-mix", "meta-mix", "mkdir/create/rename/unlink/rmdir mix, lower entries included", meta_mix, "plain", "ops"
    ),
    Workload(
        "build-mix",
        "build-mix",
        "compile-like loop: stats, failed lookups, reads, writes, renames",
        build_mix,
        "plain",
        "sources",
        cleanup=_remove_scratch("build"),
    ),
    Workload(
        "podman-build",
        "podman-build",
        "podman build of a 3-step Dockerfile over busybox, the union as the storage's overlay driver",
        podman.build,
        "plain",
        "steps",
        impls=podman.DRIVERS,
        prepare=podman.prepare,
        cleanup=podman.cleanup,
    ),
]
BY_NAME = {w.name: w for w in WORKLOADS}


def select(spec: str | None) -> list[Workload]:
    """Workloads named by --only: names or group names, comma-separated; all when None."""
    if not spec:
        return list(WORKLOADS)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = wanted - set(BY_NAME) - {w.group for w in WORKLOADS}
    if unknown:
        raise ValueError(
            f"unknown workload(s): {', '.join(sorted(unknown))}; known: {', '.join(w.name for w in WORKLOADS)}"
        )
    return [w for w in WORKLOADS if w.name in wanted or w.group in wanted]
