"""layerfs.fuse on its own: the protocol layer, mounted for real through tests/passthroughfs.py.

Every test starts ``python -m tests.passthroughfs SOURCE MOUNTPOINT`` on directories of its own, waits for
its "ready" line (the INIT flags granted) and reads the "stats op=count ..." line it prints when the mount
ends: how many requests of each kind the kernel sent. Counts are only read from that final line, once
every worker has stopped, so they are exact; where a test needs "how many requests did these steps
cost", it runs the same steps twice on two fresh mounts, once with the extra steps and once without, and
compares the totals. The ``ptfs`` fixture unmounts (umount, then lazy umount) and reaps whatever it
started, even when the test fails.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import random
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import errno_of, force_unmount, is_mounted

pytestmark = pytest.mark.root  # every test mounts passthroughfs
ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGHFS = [sys.executable, "-m", "tests.passthroughfs"]
WAIT = 60  # seconds: bounds a hang, never asserted on

MiB = 1 << 20


class Mount:
    """One passthroughfs process and its mount point."""

    def __init__(self, source: Path, path: Path, args: list[str], log: Path) -> None:
        self.source = source
        self.path = path
        self.log = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                PASSTHROUGHFS + [str(source), str(path), *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.granted: set[str] = set()
        self.stats: collections.Counter | None = None

    def errors(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        readable, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        line = self.proc.stdout.readline() if readable else ""
        assert line.startswith("ready"), f"passthroughfs did not get ready: {line!r}\n{self.errors()}"
        self.granted = set(line.split()[1:])
        assert is_mounted(self.path)

    def wait_exit(self) -> collections.Counter:
        """Wait for the process to end; it must exit 0 and print its stats line."""
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"passthroughfs still running {WAIT}s after its mount ended\n{self.errors()}")
        rest = self.proc.stdout.read()
        assert code == 0, f"passthroughfs exited {code}\n{self.errors()}"
        lines = [line for line in rest.splitlines() if line.startswith("stats")]
        assert lines, f"no stats line in {rest!r}"
        self.stats = collections.Counter({k: int(v) for k, v in (item.split("=") for item in lines[-1].split()[1:])})
        return self.stats

    def stop(self) -> collections.Counter:
        """umount(8) it; the process must end by itself, with exit code 0. Returns its request counts."""
        subprocess.run(["umount", str(self.path)], check=True, capture_output=True, timeout=WAIT)
        stats = self.wait_exit()
        assert not is_mounted(self.path)
        return stats

    def cleanup(self) -> None:
        force_unmount(self.path)
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its pid
                self.proc.wait()
        self.proc.stdout.close()


class Harness:
    """Starts passthroughfs mounts (and the tmpfs mounts a test needs) and undoes them all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.source = tmp_path / "src"
        self.source.mkdir()
        self._undo: list = []  # Mounts and mount points, unmounted in reverse order

    def start(self, *args: str, source: Path | None = None) -> Mount:
        n = len(self._undo)
        mountpoint = self.tmp / f"mnt{n}"
        mountpoint.mkdir()
        mount = Mount(source or self.source, mountpoint, list(args), self.tmp / f"mnt{n}.log")
        self._undo.append(mount)
        mount.wait_ready()
        return mount

    def tmpfs(self, path: Path, options: str = "size=256m") -> Path:
        path.mkdir(exist_ok=True)
        self._undo.append(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
        return path

    def fuse_connections(self) -> Path:
        """The fusectl directory: /sys/fs/fuse/connections if mounted, else a private mount of it."""
        system = Path("/sys/fs/fuse/connections")
        if os.path.ismount(system):
            return system
        path = self.tmp / "fusectl"
        path.mkdir()
        self._undo.append(path)
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(path)], check=True, capture_output=True)
        return path

    def cleanup(self) -> None:
        for item in reversed(self._undo):
            if isinstance(item, Mount):
                item.cleanup()
            else:
                force_unmount(item)
        self._undo.clear()


@pytest.fixture
def ptfs(tmp_path):
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


def passthrough_args(passthrough: bool) -> list[str]:
    return [] if passthrough else ["--nopassthrough"]


both_modes = pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "nopassthrough"])


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


# -- mounting and the end of a session -------------------------------------------------------------------


def test_umount_ends_the_process_cleanly(ptfs):
    (ptfs.source / "f").write_bytes(b"source")
    m = ptfs.start()
    assert (m.path / "f").read_bytes() == b"source"
    (m.path / "g").write_bytes(b"written")
    stats = m.stop()
    assert stats["lookup"] >= 1 and stats["create"] == 1
    assert (ptfs.source / "g").read_bytes() == b"written"
    assert sorted(os.listdir(m.path)) == []  # the bare mount point again


def test_aborted_connection_ends_the_process_cleanly(ptfs):
    connections = ptfs.fuse_connections()
    m = ptfs.start("--threads", "4")
    os.listdir(m.path)
    abort = connections / str(os.minor(os.stat(m.path).st_dev)) / "abort"
    abort.write_text("1")
    m.wait_exit()  # exit code 0 and a stats line
    assert errno_of(lambda: os.statvfs(m.path)) == errno.ENOTCONN  # the mount is still there, dead
    subprocess.run(["umount", str(m.path)], check=True, capture_output=True, timeout=WAIT)
    assert not is_mounted(m.path)


# -- INIT ------------------------------------------------------------------------------------------------


def test_init_grants_what_layerfs_asks_for(ptfs):
    m = ptfs.start()
    assert {"passthrough", "max_pages", "parallel_dirops", "readdirplus"} <= m.granted
    n = ptfs.start("--nopassthrough")
    assert "passthrough" not in n.granted
    assert {"max_pages", "parallel_dirops", "readdirplus"} <= n.granted


def test_one_mib_write_is_one_request(ptfs):
    m = ptfs.start("--nopassthrough", "--threads", "1")
    one, four = random.Random(1).randbytes(MiB), random.Random(4).randbytes(4 * MiB)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.pwrite(fd, one, 0) == MiB  # one WRITE
        assert os.pwrite(fd, four, MiB) == 4 * MiB  # four WRITEs
    finally:
        os.close(fd)
    stats = m.stop()
    assert stats["write"] == 5
    assert sha((ptfs.source / "f").read_bytes()) == sha(one + four)


# -- passthrough -----------------------------------------------------------------------------------------


@both_modes
def test_large_file_io(ptfs, passthrough):
    size = 64 * MiB
    original = random.Random(1).randbytes(size)
    (ptfs.source / "in").write_bytes(original)
    m = ptfs.start(*passthrough_args(passthrough))
    assert ("passthrough" in m.granted) == passthrough

    assert sha((m.path / "in").read_bytes()) == sha(original)
    written = random.Random(2).randbytes(size)
    (m.path / "out").write_bytes(written)
    assert sha((ptfs.source / "out").read_bytes()) == sha(written)

    expected = bytearray(original)
    with open(m.path / "in", "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        assert sha(mapped) == sha(original)
        for offset in (0, 3 * 4096 + 5, size // 2 - 3, size - 7):
            mapped[offset : offset + 7] = expected[offset : offset + 7] = b"mmapped"
        mapped.flush()
        assert sha((ptfs.source / "in").read_bytes()) == sha(expected)
    assert sha((m.path / "in").read_bytes()) == sha(expected)

    stats = m.stop()
    if passthrough:
        assert stats["read"] == 0 and stats["write"] == 0, stats
    else:
        assert stats["read"] >= size // MiB and stats["write"] >= size // MiB, stats


# -- one inode per file ----------------------------------------------------------------------------------


@both_modes
def test_hard_links_are_one_inode(ptfs, passthrough):
    (ptfs.source / "a").write_bytes(bytes(16384))
    os.link(ptfs.source / "a", ptfs.source / "b")
    m = ptfs.start(*passthrough_args(passthrough))
    a, b, c = m.path / "a", m.path / "b", m.path / "c"
    os.link(a, c)  # a LINK request
    assert len({os.stat(p).st_ino for p in (a, b, c)}) == 1
    assert os.stat(a).st_ino == os.stat(ptfs.source / "a").st_ino
    assert os.stat(b).st_nlink == 3

    fa, fb = os.open(a, os.O_RDWR), os.open(b, os.O_RDONLY)
    try:
        # The same st_ino could be shown for two kernel inodes; flock(2) is kept on the kernel's inode
        # (passthroughfs does not take locks), so a conflict between the names shows they share one.
        fcntl.flock(fa, fcntl.LOCK_EX)
        assert errno_of(lambda: fcntl.flock(fb, fcntl.LOCK_SH | fcntl.LOCK_NB)) == errno.EWOULDBLOCK
        fcntl.flock(fa, fcntl.LOCK_UN)
        os.pwrite(fa, b"written", 100)
        assert os.pread(fb, 7, 100) == b"written"
    finally:
        os.close(fa)
        os.close(fb)

    fb, fc = os.open(b, os.O_RDWR), os.open(c, os.O_RDONLY)
    try:
        with mmap.mmap(fb, 0) as mapped:
            mapped[8192:8199] = b"mmapped"  # no msync: the pages are the file's, whatever its name
            assert os.pread(fc, 7, 8192) == b"mmapped"
    finally:
        os.close(fb)
        os.close(fc)

    m.stop()
    data = (ptfs.source / "a").read_bytes()
    assert data[100:107] == b"written" and data[8192:8199] == b"mmapped" and len(data) == 16384


@both_modes
def test_concurrent_opens_see_one_content(ptfs, passthrough):
    content = bytearray(random.Random(3).randbytes(4 * 4096))
    (ptfs.source / "f").write_bytes(content)
    m = ptfs.start(*passthrough_args(passthrough), "--threads", "4")
    modes = [os.O_RDONLY, os.O_RDWR, os.O_RDONLY, os.O_RDWR]
    barrier = threading.Barrier(len(modes), timeout=WAIT)

    def opener(i: int, turn: int) -> bytes:
        try:
            barrier.wait()
            fd = os.open(m.path / "f", modes[i])  # the four opens race
            try:
                barrier.wait()  # all four open at once
                if modes[i] == os.O_RDWR:
                    os.pwrite(fd, b"turn %d thread %d" % (turn, i), i * 4096)
                barrier.wait()
                return os.pread(fd, len(content) + 1, 0)
            finally:
                os.close(fd)
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(len(modes)) as pool:
        for turn in range(10):
            seen = [f.result() for f in [pool.submit(opener, i, turn) for i in range(len(modes))]]
            for i, mode in enumerate(modes):
                if mode == os.O_RDWR:
                    text = b"turn %d thread %d" % (turn, i)
                    content[i * 4096 : i * 4096 + len(text)] = text
            assert all(s == content for s in seen)
    m.stop()
    assert (ptfs.source / "f").read_bytes() == content


# -- cached listings and negative entries ----------------------------------------------------------------


def test_listings_are_cached(ptfs):
    names = sorted(f"f{i}" for i in range(50))

    def session(extra_listings: int) -> collections.Counter:
        source = ptfs.tmp / f"src{extra_listings}"
        (source / "d").mkdir(parents=True)
        for name in names:
            (source / "d" / name).write_bytes(b"")
        m = ptfs.start("--threads", "1", source=source)
        for _ in range(1 + extra_listings):
            assert sorted(os.listdir(m.path / "d")) == names
        (m.path / "d" / "new").write_bytes(b"")  # a CREATE through the mount drops the cached listing
        assert sorted(os.listdir(m.path / "d")) == sorted(names + ["new"])
        return m.stop()

    once, many = session(0), session(100)
    assert once["readdirplus"] >= 1  # granted and used
    listing_requests = ("readdir", "readdirplus")
    assert sum(many[k] for k in listing_requests) - sum(once[k] for k in listing_requests) <= 2, (once, many)
    assert many["opendir"] - once["opendir"] == 100  # the listings did happen, answered from the cache


def test_missing_name_is_a_cached_negative_entry(ptfs):
    def session(stats: int) -> collections.Counter:
        source = ptfs.tmp / f"src{stats}"
        source.mkdir()
        m = ptfs.start("--threads", "1", source=source)
        for _ in range(stats):
            assert errno_of(lambda: os.stat(m.path / "missing")) == errno.ENOENT
        (m.path / "missing").write_bytes(b"now")  # created over the negative entry
        assert os.stat(m.path / "missing").st_size == 3
        return m.stop()

    once, twice = session(1), session(2)
    assert once["lookup"] >= 1
    assert twice["lookup"] == once["lookup"], (once, twice)


# -- errors ----------------------------------------------------------------------------------------------


def test_errors_are_the_sources(ptfs):
    src = ptfs.source
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"")
    (src / "f").write_bytes(b"file")
    (src / "gone").write_bytes(b"")
    other = ptfs.tmpfs(src / "other", "size=1m")  # another filesystem inside the source
    m = ptfs.start()
    mnt = m.path

    def same(expected: int, action) -> None:
        """``action(root)`` fails with ``expected`` on the source itself and through the mount."""
        assert errno_of(lambda: action(src)) == expected
        assert errno_of(lambda: action(mnt)) == expected

    same(errno.ENOENT, lambda r: os.stat(r / "missing"))
    same(errno.ENOENT, lambda r: os.unlink(r / "missing"))
    same(errno.EEXIST, lambda r: os.mkdir(r / "d"))
    same(errno.ENOTEMPTY, lambda r: os.rmdir(r / "d"))
    same(errno.EXDEV, lambda r: os.rename(r / "f", r / "other" / "f"))
    same(errno.EXDEV, lambda r: os.link(r / "f", r / "other" / "f"))
    same(errno.EINVAL, lambda r: os.setxattr(r / "f", "user.", b"v"))  # a prefix without a name

    # Behind the kernel's back, so that the request reaches passthroughfs and the source answers it:
    assert os.stat(mnt / "gone")  # cached as present
    os.unlink(src / "gone")
    assert errno_of(lambda: os.unlink(mnt / "gone")) == errno.ENOENT  # UNLINK -> ENOENT
    assert errno_of(lambda: os.stat(mnt / "late")) == errno.ENOENT  # cached as missing
    os.mkdir(src / "late")
    assert errno_of(lambda: os.mkdir(mnt / "late")) == errno.EEXIST  # MKDIR -> EEXIST
    assert errno_of(lambda: os.open(mnt / "late", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST

    m.stop()
    assert sorted(os.listdir(src)) == ["d", "f", "late", "other"] and os.listdir(other) == []
    assert (src / "f").read_bytes() == b"file"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.restype = ctypes.c_ssize_t


def raw_getxattr(path: Path, name: str, size: int) -> int:
    """getxattr(2) into a buffer of ``size`` bytes: the length it returns, or minus the errno."""
    buffer = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(os.fsencode(path), name.encode(), buffer if size else None, size)
    return n if n >= 0 else -ctypes.get_errno()


def raw_listxattr(path: Path, size: int) -> int:
    buffer = ctypes.create_string_buffer(max(size, 1))
    n = _libc.listxattr(os.fsencode(path), buffer if size else None, size)
    return n if n >= 0 else -ctypes.get_errno()


def test_xattrs(ptfs):
    (ptfs.source / "f").write_bytes(b"")
    m = ptfs.start()
    f, source = m.path / "f", ptfs.source / "f"
    os.setxattr(f, "user.color", b"blue-green")
    assert os.getxattr(source, "user.color") == b"blue-green"
    assert os.getxattr(f, "user.color") == b"blue-green"
    assert "user.color" in os.listxattr(f)
    assert errno_of(lambda: os.setxattr(f, "user.color", b"x", os.XATTR_CREATE)) == errno.EEXIST
    assert errno_of(lambda: os.setxattr(f, "user.shape", b"x", os.XATTR_REPLACE)) == errno.ENODATA

    assert raw_getxattr(f, "user.color", 0) == 10  # the size alone
    assert raw_getxattr(f, "user.color", 10) == 10
    assert raw_getxattr(f, "user.color", 4) == -errno.ERANGE
    names = raw_listxattr(f, 0)
    assert names == raw_listxattr(source, 0) and names >= len("user.color") + 1
    assert raw_listxattr(f, names) == names
    assert raw_listxattr(f, 1) == -errno.ERANGE

    os.removexattr(f, "user.color")
    assert errno_of(lambda: os.getxattr(f, "user.color")) == errno.ENODATA
    assert errno_of(lambda: os.removexattr(f, "user.color")) == errno.ENODATA
    assert "user.color" not in os.listxattr(f)
    m.stop()
    assert "user.color" not in os.listxattr(source)


def test_statfs_is_the_sources(ptfs):
    source = ptfs.tmpfs(ptfs.tmp / "tmpfs", "size=16m,nr_inodes=4096")  # nobody else writes here
    for i in range(10):
        (source / f"f{i}").write_bytes(bytes(4096 * i))
    m = ptfs.start(source=source)
    fields = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")

    def numbers(path: Path) -> dict[str, int]:
        st = os.statvfs(path)
        return {name: getattr(st, name) for name in fields}

    assert numbers(m.path) == numbers(source)
    (m.path / "big").write_bytes(bytes(4 * MiB))
    os.mkdir(m.path / "d")
    after = numbers(m.path)
    assert after == numbers(source)
    assert after["f_bfree"] < after["f_blocks"] and after["f_ffree"] < after["f_files"]
    m.stop()


# -- worker threads --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--threads", "1"], ["--threads", "4"], ["--threads", "4", "--nopassthrough"]],
    ids=["1-thread", "4-threads", "4-threads-nopassthrough"],
)
def test_concurrent_load(ptfs, args):
    m = ptfs.start(*args)

    def worker(t: int) -> None:
        d = m.path / f"t{t}"
        os.mkdir(d)
        for i in range(200):
            data = b"%d:%d;" % (t, i) * (i + 1)
            p = d / f"f{i}"
            p.write_bytes(data)
            assert os.stat(p).st_size == len(data)
            assert p.read_bytes() == data
            os.unlink(p)
        assert os.listdir(d) == []
        os.rmdir(d)

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(worker, t) for t in range(4)]:
            future.result()
    assert os.listdir(m.path) == []
    stats = m.stop()
    assert stats["create"] >= 1 and stats["unlink"] >= 1
    assert os.listdir(ptfs.source) == []
