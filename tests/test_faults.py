"""Faults injected into real mounts: the daemon killed with SIGKILL in the middle of a write-heavy workload,
and an upper layer that runs out of space.

Kills (2 seeds x 26 kills): two workers, forked from the test, write through the mount. One creates,
rewrites (a temporary written, fsynced and renamed over), renames and deletes small files and appends to
lower ones; the other copies up (by opening for writing, or by renaming) and deletes lower files of 24, 36
and 48 MiB. The daemon is killed 0.1-0.9 s (seeded) after they start. Each worker logs an operation
before and after doing it (a file it writes is fsynced before it counts as done), and the test replays
the logs into a model of what the mount must show. After each kill: the workers and the test got
ENOTCONN (ECONNABORTED for a request in flight), ``layerfs umount`` removed the dead mount, and the change
index the dead daemon left agrees with a walk of the upper. The same upper and work directories are then
mounted again: workdir/work is empty, the operation each worker had in flight was done or not (a file
being written may hold any prefix of its content), and all else is exactly the model, every copied-up
file whole (the lower original, or the version a worker wrote over it) and as long as its size says.

Out of space (upper and work on an 8 MiB tmpfs; kernel overlayfs over a twin tmpfs, with the same lower
and the same operations, is the reference): a new file or a copy-up that does not fit fails with ENOSPC
and leaves the lower version, nothing half copied; files written before stay whole; once space is freed a
copy-up goes through. A full upper still takes changes that need no space, and can be mounted again.

Lower layers are hashed (sha256 of every file, with its metadata) before and after: never written to.
Every test stays within about 40 s on two slow cores.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import itertools
import json
import os
import random
import signal
import stat
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash
from conftest import Mounts, errno_of, force_unmount, is_mounted
from pair import append, errname, tree
from processes import daemon_pids, wait_for
from test_index import _fields

from layerfs.core.index import read_index
from layerfs.core.union import INDEX_DIR

MiB = 1 << 20
KILLS = 26  # per seed
# What a user of a dead mount gets: ENOTCONN, or ECONNABORTED for a request the daemon had not answered,
# or EIO where the kernel was moving pages for it (seen once in about a hundred kills).
DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
BIG_SIZES = (24 * MiB, 36 * MiB, 48 * MiB)
BIG_NAMES = 250  # hard links to each big lower file: every name is copied up on its own
HEADER = 64  # bytes a worker writes over the start of a big file


def _create_empty(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY))


def _content(seed: str, size: int) -> bytes:
    """``size`` bytes that belong to ``seed`` alone, so that a prefix of them is recognisable."""
    block = hashlib.sha256(seed.encode()).digest() * 128
    return (block * (size // len(block) + 1))[:size]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _layer_digest(root: Path) -> dict[str, tuple]:
    """Every entry of a layer with its metadata (ctime too: any change moves it) and a file's sha256,
    read once per inode (the big files have many names)."""
    digests: dict[int, str] = {}
    found = {".": _entry_digest(str(root), digests)}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = _entry_digest(path, digests)
    return found


def _entry_digest(path: str, digests: dict[int, str]) -> tuple:
    st = os.lstat(path)
    xattrs = tuple(
        (n, os.getxattr(path, n, follow_symlinks=False)) for n in sorted(os.listxattr(path, follow_symlinks=False))
    )
    data = None
    if stat.S_ISREG(st.st_mode):
        if st.st_ino not in digests:
            with open(path, "rb") as f:
                digests[st.st_ino] = hashlib.file_digest(f, "sha256").hexdigest()
        data = digests[st.st_ino]
    elif stat.S_ISLNK(st.st_mode):
        data = os.readlink(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, xattrs, data


def _assert_index_agrees(upper: Path, work: Path, lowers: list[Path], walk_state: Path) -> None:
    """The change index in ``work`` (read back as the next mount reads it, but read-only: the next mount
    does it again for real) holds what a full walk of the upper finds, lower facts included."""
    lower_paths = [str(p) for p in lowers]
    with (
        read_index(str(upper), str(work / INDEX_DIR), lowers=lower_paths) as left,
        read_index(str(upper), str(walk_state), lowers=lower_paths) as walked,
    ):
        assert walked.rebuilt  # nothing is ever saved in walk_state: always a full walk
        assert _fields(left) == _fields(walked)


def _free(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


# -- killing the daemon -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Big:
    """A big lower file: its size, first bytes and the hash of the rest (what a header leaves alone)."""

    size: int
    head: bytes
    rest: str


@dataclass
class Model:
    """What the mount must show below /files, /etc and /big: small files by content, big ones (the lower
    files, copied up or not) by which Big they are and the header written over their start, if any."""

    small: dict[str, bytes]
    big: dict[str, tuple[int, bytes | None]]
    copied: set[str] = field(default_factory=set)  # big paths the upper holds a copy of

    def apply(self, op: dict) -> None:
        """``op`` was done."""
        kind, path = op["op"], op["path"]
        if kind in ("put", "replace"):
            self.small[path] = _content(op["seed"], op["size"])
        elif kind == "append":
            self.small[path] += op["data"].encode()
        elif kind == "header":
            self.big[path] = (self.big[path][0], op["header"].encode())
            self.copied.add(path)
        elif kind == "rename":
            for files in (self.small, self.big):
                if path in files:
                    files[op["to"]] = files.pop(path)
            if op["to"] in self.big:
                self.copied.discard(path)
                self.copied.add(op["to"])
        elif kind == "delete":
            self.small.pop(path, None)
            self.big.pop(path, None)
            self.copied.discard(path)


def _small_op(model: Model, rng: random.Random, tag: str) -> dict:
    files = sorted(p for p in model.small if p.startswith("/files/"))
    where = f"/files/d{rng.randrange(4)}"
    size = rng.choice((0, rng.randrange(1, 4096), rng.randrange(4096, 300_000)))
    r = rng.random()
    if len(files) < 10 or (r < 0.3 and len(files) < 60):
        return {"op": "put", "path": f"{where}/n{tag}", "seed": tag, "size": size}
    if r < 0.45:
        target = rng.choice(files)
        return {
            "op": "replace",
            "path": target,
            "tmp": f"{os.path.dirname(target)}/.tmp{tag}",
            "seed": tag,
            "size": size,
        }
    if r < 0.6:
        return {"op": "rename", "path": rng.choice(files), "to": f"{where}/m{tag}"}
    if r < 0.8:
        return {"op": "delete", "path": rng.choice(files)}
    lower_files = sorted(p for p in model.small if p.startswith("/etc/"))
    return {"op": "append", "path": rng.choice(lower_files), "data": f"line {tag}\n"}


def _big_op(model: Model, rng: random.Random, tag: str) -> dict:
    copies = sorted(model.copied)
    lower_only = sorted(p for p in model.big if p not in model.copied)
    if not lower_only:  # every name copied up already: the copies are rewritten, never all deleted
        path = rng.choice(copies)
        return {"op": "header", "path": path, "header": f"{path} {tag} ".ljust(HEADER, "=")}
    if len(copies) > 2:  # few copies at a time: the upper stays small, the checks quick
        return {"op": "delete", "path": rng.choice(copies)}
    path, r = rng.choice(lower_only), rng.random()
    if r < 0.25:  # copied up to be renamed
        return {"op": "rename", "path": path, "to": f"/big/moved-{tag}"}
    if r < 0.35 and len(lower_only) > 1:  # a whiteout (one lower name always stays: see above)
        return {"op": "delete", "path": path}
    if r < 0.4 and copies:  # a copy rewritten: no copy-up
        path = rng.choice(copies)
    # Otherwise copied up when opened for writing.
    return {"op": "header", "path": path, "header": f"{path} {tag} ".ljust(HEADER, "=")}


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _do(mnt: str, op: dict) -> None:
    kind, path = op["op"], mnt + op["path"]
    if kind == "put":
        _write_file(path, _content(op["seed"], op["size"]))
    elif kind == "replace":
        _write_file(mnt + op["tmp"], _content(op["seed"], op["size"]))
        os.rename(mnt + op["tmp"], path)
    elif kind == "rename":
        os.rename(path, mnt + op["to"])
    elif kind == "delete":
        os.unlink(path)
    else:
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if kind == "append" else 0))
        try:
            if kind == "append":
                _write_all(fd, op["data"].encode())
            else:
                os.pwrite(fd, op["header"].encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def _work(
    mnt: str, model: Model, choose: Callable[[Model, random.Random, str], dict], seed: str, log_path: Path
) -> None:
    """A worker: one operation after another until the mount dies. The log gets ``begin`` before an
    operation, ``done`` once it returned and ``error`` at the end. Only the daemon is killed, never the
    worker, so what it logged is in the kernel: the log needs no fsync."""
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for i in itertools.count():
        op = choose(model, rng, f"{seed}-{i}")
        os.write(log, (json.dumps({"begin": op}) + "\n").encode())
        try:
            _do(mnt, op)
        except OSError as e:
            os.write(log, (json.dumps({"error": e.errno, "text": str(e)}) + "\n").encode())
            return
        os.write(log, b'{"done": true}\n')
        model.apply(op)  # the worker's own copy, forked with it


def _fork(target: Callable[..., None], *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            target(*args)
            code = 0
        except BaseException:  # (the child must never return into pytest)
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _reap(pid: int, timeout: float = 20.0) -> int:
    """The exit code of child ``pid``, which is killed if it has not ended within ``timeout``."""
    status: list[int] = []

    def ended() -> bool:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(code)
        return bool(done)

    if not wait_for(ended, timeout):
        os.kill(pid, signal.SIGKILL)
        status.append(os.waitpid(pid, 0)[1])
    return os.waitstatus_to_exitcode(status[0])


@pytest.fixture
def children() -> Iterator[list[int]]:
    """Pids of forked workers not reaped yet: killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _replay(log_path: Path) -> tuple[list[dict], dict | None, int]:
    """The operations a worker finished, the one it had in flight (None if none) and the errno it met."""
    done, pending, error = [], None, None
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if "begin" in record:
            pending = record["begin"]
        elif "done" in record:
            done.append(pending)
            pending = None
        else:
            error = record
    assert error is not None, f"{log_path.name}: the worker stopped without an error"
    assert error["error"] in DEAD, f"{log_path.name}: {error['text']} during {pending}"
    return done, pending, error["error"]


def _read(path: str, size: int = -1) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        return None


class KillScene:
    """A lower layer with small and big files, an upper, a work directory, a mount point and the model."""

    def __init__(self, base: Path) -> None:
        self.lower, self.upper, self.work, self.mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
        for d in (self.upper, self.work):
            d.mkdir()
        small: dict[str, bytes] = {}
        for path in [f"/etc/conf{i}" for i in range(20)] + [f"/files/d{k}/lower{k}" for k in range(4)]:
            small[path] = _content(path, 100 + 397 * len(small))
        for path, data in small.items():
            (self.lower / path[1:]).parent.mkdir(parents=True, exist_ok=True)
            (self.lower / path[1:]).write_bytes(data)
        (self.lower / "big").mkdir()
        self.bigs: list[Big] = []
        big: dict[str, tuple[int, bytes | None]] = {}
        for n, size in enumerate(BIG_SIZES):
            data = os.urandom(size)
            self.bigs.append(Big(size, data[:HEADER], xxhash.xxh3_128_hexdigest(data[HEADER:])))
            first = self.lower / f"big/b{n}-000"
            first.write_bytes(data)
            for k in range(BIG_NAMES):
                if k:
                    os.link(first, self.lower / f"big/b{n}-{k:03}")
                big[f"/big/b{n}-{k:03}"] = (n, None)
        self.model = Model(small, big)

    def in_upper(self, path: str) -> bool:
        """Whether the upper holds a file (a copy, not a whiteout) at ``path``."""
        try:
            return stat.S_ISREG(os.lstat(self.upper / path[1:]).st_mode)
        except FileNotFoundError:
            return False

    def settle(self, op: dict) -> None:
        """The operation in flight when the daemon died was done or not, and data being written may have
        got in partly: check that the mount shows one of those outcomes, and make it the model's."""
        kind, path, mnt = op["op"], op["path"], str(self.mnt)
        is_big = path in self.model.big
        seen = _read(mnt + path, HEADER if is_big else -1)
        what = f"after {op} was cut short, {path} shows {seen!r:.100}"
        if kind == "put":
            assert seen is None or _content(op["seed"], op["size"]).startswith(seen), what
            if seen is not None:
                self.model.small[path] = seen
        elif kind == "replace":
            old, content, tmp = self.model.small[path], _content(op["seed"], op["size"]), _read(mnt + op["tmp"])
            assert seen in (old, content), what
            # Still there, the temporary was not renamed yet: being written, or written.
            assert tmp is None or (seen == old and content.startswith(tmp)), f"{what}; {op['tmp']}: {tmp!r:.100}"
            self.model.small[path] = seen
            if tmp is not None:
                self.model.small[op["tmp"]] = tmp
        elif kind == "append":
            old, data = self.model.small[path], op["data"].encode()
            assert seen is not None and seen.startswith(old) and data.startswith(seen[len(old) :]), what
            self.model.small[path] = seen
        elif kind == "header":
            base, header = self.model.big[path]
            assert seen in (header or self.bigs[base].head, op["header"].encode()), what
            if seen == op["header"].encode():
                self.model.apply(op)
        else:  # rename or delete
            there = seen is not None
            if kind == "rename":
                assert there != os.path.lexists(mnt + op["to"]), f"after {op} was cut short: both names or neither"
            if not there:
                self.model.apply(op)

    def check(self) -> None:
        """The mount shows exactly the model: every file whole, and as long as its size says."""
        mnt = str(self.mnt)
        visible = set()
        for top in ("files", "etc", "big"):
            for directory, _, files in os.walk(self.mnt / top):
                visible.update("/" + os.path.relpath(os.path.join(directory, f), mnt) for f in files)
        expected = self.model.small.keys() | self.model.big.keys()
        assert visible == expected, (
            f"only in the mount: {sorted(visible - expected)}; missing: {sorted(expected - visible)}"
        )
        for path, content in self.model.small.items():
            seen = _read(mnt + path)
            assert seen == content, f"{path}: {len(seen)} bytes {seen[:40]!r}, not {len(content)} {content[:40]!r}"
            assert os.stat(mnt + path).st_size == len(seen), path
        self.model.copied = {p for p in self.model.big if self.in_upper(p)}  # (the workers start from it)
        for path, (base, header) in self.model.big.items():
            big = self.bigs[base]
            assert os.stat(mnt + path).st_size == big.size, f"{path}: not the size of the lower file"
            if path in self.model.copied:  # (the others are the lower file itself)
                self._check_copy(mnt + path, big, header)

    @staticmethod
    def _check_copy(path: str, big: Big, header: bytes | None) -> None:
        rest = xxhash.xxh3_128()
        length = 0
        with open(path, "rb") as f:
            head = f.read(HEADER)
            while chunk := f.read(MiB):
                rest.update(chunk)
                length += len(chunk)
        assert head == (header or big.head), f"{path}: starts with {head!r}"
        assert HEADER + length == big.size, f"{path}: {HEADER + length} bytes read of {big.size}: a partial copy"
        assert rest.hexdigest() == big.rest, f"{path}: not the content of the lower file"


def _copies_up(model: Model, op: dict) -> bool:
    """Whether ``op`` copies a big lower file up (a copy of it is not in the upper yet)."""
    return op["op"] in ("header", "rename") and op["path"] in model.big and op["path"] not in model.copied


@pytest.mark.parametrize("seed", [1, 2])
def test_a_killed_daemon_loses_nothing_finished_and_leaves_nothing_half_done(mounts, tmp_path, children, seed):
    scene = KillScene(tmp_path)
    lower_before = _layer_digest(scene.lower)
    rng = random.Random(seed)
    figures: collections.Counter[str] = collections.Counter()
    in_flight: list[dict] = []
    for n in range(KILLS + 1):
        mounts.layerfs(scene.mnt, [scene.lower], scene.upper, scene.work)
        assert os.listdir(scene.work / "work") == [], "what the killed daemon left in workdir/work survived"
        for op in in_flight:
            scene.settle(op)
        scene.check()
        if n == KILLS:
            break
        logs = [tmp_path / f"log-{n}-{name}" for name in ("small", "big")]
        pids = [
            _fork(_work, str(scene.mnt), scene.model, choose, f"{seed}-{n}-{i}", log)
            for i, (choose, log) in enumerate(zip((_small_op, _big_op), logs, strict=True))
        ]
        children.extend(pids)
        time.sleep(rng.uniform(0.1, 0.9))
        (daemon,) = daemon_pids(scene.mnt)
        os.kill(daemon, signal.SIGKILL)
        # (A stat could be answered from the kernel's attribute cache; a listing has to ask.)
        assert wait_for(lambda: errno_of(lambda: os.listdir(scene.mnt)) == errno.ENOTCONN)
        for pid in pids:
            children.remove(pid)
            assert _reap(pid) == 0, "a worker failed (its traceback is in the captured stderr)"
        mounts.unmount(scene.mnt)  # `layerfs umount`, on a dead mount
        assert not is_mounted(scene.mnt)
        figures["leftovers in workdir/work"] += bool(os.listdir(scene.work / "work"))
        _assert_index_agrees(scene.upper, scene.work, [scene.lower], tmp_path / "walk")
        in_flight = []
        for log in logs:
            done, pending, error = _replay(log)
            figures[errno.errorcode[error]] += 1
            figures["operations done"] += len(done)
            for op in done:
                figures["copy-ups of big files done"] += _copies_up(scene.model, op)
                scene.model.apply(op)
            if pending is not None:
                in_flight.append(pending)
                figures["kills during a copy-up of a big file"] += _copies_up(scene.model, pending)
    mounts.unmount(scene.mnt)
    _assert_index_agrees(scene.upper, scene.work, [scene.lower], tmp_path / "walk")
    assert _layer_digest(scene.lower) == lower_before
    print(f"seed {seed}: {KILLS} kills, {dict(figures)}")
    # Evidence that the kills hit what they were meant to: copy-ups cut short, partial copies left behind.
    assert figures["kills during a copy-up of a big file"] >= KILLS // 4, figures
    assert figures["leftovers in workdir/work"] > 0, figures


# -- running out of space ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path, mounts: Mounts) -> Iterator[Callable[[str], Path]]:
    """Makes 8 MiB tmpfs filesystems with upper/ and work/ in them; unmounted at teardown, after the
    mounts on top of them (which hold them busy)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
        made.append(path)
        for d in ("upper", "work"):
            (path / d).mkdir()
        return path

    try:
        yield make
    finally:
        mounts.cleanup()
        for path in made:
            force_unmount(path)


def _small_lower(lower: Path) -> Path:
    (lower / "gone").mkdir(parents=True)
    (lower / "big").write_bytes(_content("big", 5 * MiB))
    (lower / "small").write_bytes(_content("small", 100_000))
    for i in range(40):
        (lower / "gone" / f"{i:02}").write_text("deleted when the upper is full\n")
    return lower


def _write_new(path: Path, data: bytes) -> str:
    """Write a new file and fsync it: "ok", or which call failed and how ("write: ENOSPC")."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    failed = None
    try:
        _write_all(fd, data)
        failed = "fsync"
        os.fsync(fd)
        failed = None
    except OSError as e:
        failed = f"{failed or 'write'}: {errno.errorcode[e.errno]}"
    try:
        os.close(fd)
    except OSError as e:
        failed = failed or f"close: {errno.errorcode[e.errno]}"
    return failed or "ok"


def _both(
    mounts: Mounts,
    small_fs: Callable[[str], Path],
    lower: Path,
    tmp_path: Path,
    scenario: Callable[[Callable[[], Path], Path], dict],
) -> dict[str, dict]:
    """Run ``scenario(mount, fs)`` on kernel overlayfs, then on layerfs, each with its upper and work on
    a small filesystem ``fs``; ``mount()`` mounts (again) and returns the mount point."""
    results = {}
    for kind in ("overlay", "layerfs"):
        fs = small_fs(f"fs-{kind}")
        mnt = tmp_path / f"mnt-{kind}"
        results[kind] = scenario(functools.partial(getattr(mounts, kind), mnt, [lower], fs / "upper", fs / "work"), fs)
        mounts.unmount(mnt)
        if kind == "layerfs":
            _assert_index_agrees(fs / "upper", fs / "work", [lower], tmp_path / "walk")
    return results


def test_what_does_not_fit_fails_with_enospc_and_leaves_no_half_copy(small_fs, mounts, tmp_path):
    lower = _small_lower(tmp_path / "lower")
    lower_before = _layer_digest(lower)
    big, small = (lower / "big").read_bytes(), (lower / "small").read_bytes()

    def scenario(mount: Callable[[], Path], fs: Path) -> dict:
        mnt, leftovers = mount(), fs / "work" / "work"
        seen = {
            "write a": _write_new(mnt / "a", _content("a", 2 * MiB)),
            "write b": _write_new(mnt / "b", _content("b", 3 * MiB)),
            # 5 MiB to copy into the 3 MiB left: it fails half way.
            "copy up big": errname(append, mnt / "big", b"tail\n"),
        }
        assert (mnt / "big").read_bytes() == big and os.listdir(leftovers) == []
        seen["write c"] = _write_new(mnt / "c", _content("c", 4 * MiB))
        c = (mnt / "c").read_bytes()
        assert len(c) == os.stat(mnt / "c").st_size and len(c) < 4 * MiB and _content("c", 4 * MiB).startswith(c)
        seen["chmod small"] = errname(os.chmod, mnt / "small", 0o600)  # a copy-up too, on a full upper
        assert (mnt / "small").read_bytes() == small and os.listdir(leftovers) == []
        assert (mnt / "a").read_bytes() == _content("a", 2 * MiB) and (mnt / "b").read_bytes() == _content("b", 3 * MiB)
        seen["rm c"], seen["rm b"] = errname(os.unlink, mnt / "c"), errname(os.unlink, mnt / "b")
        # layerfs closes its side of a file after close(2) returns: the space may come back a moment later.
        assert wait_for(lambda: _free(fs) > 5.5 * MiB), _free(fs)
        seen["copy up big, with room"] = errname(append, mnt / "big", b"tail\n")
        seen["chmod small, with room"] = errname(os.chmod, mnt / "small", 0o600)
        assert (mnt / "big").read_bytes() == big + b"tail\n"
        return {"seen": seen, "tree": tree(mnt)}

    results = _both(mounts, small_fs, lower, tmp_path, scenario)
    assert results["overlay"]["seen"] == {
        "write a": "ok",
        "write b": "ok",
        "copy up big": "ENOSPC",
        "write c": "write: ENOSPC",
        "chmod small": "ENOSPC",
        "rm c": "ok",
        "rm b": "ok",
        "copy up big, with room": "ok",
        "chmod small, with room": "ok",
    }
    assert results["layerfs"] == results["overlay"]
    assert _layer_digest(lower) == lower_before


def test_a_full_upper_still_takes_changes_that_need_no_space(small_fs, mounts, tmp_path):
    lower = _small_lower(tmp_path / "lower")
    lower_before = _layer_digest(lower)

    def scenario(mount: Callable[[], Path], fs: Path) -> dict:
        mnt = mount()
        seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        seen["write old"][_write_new(mnt / "old", _content("old", MiB))] += 1
        mounts.unmount(mnt)
        mnt = mount()
        seen["fill"][_write_new(mnt / "filler", _content("filler", 9 * MiB))] += 1
        for i in range(40):
            name = f"{i:02}-" + "n" * 100  # long names: layerfs journals each new path
            seen["create empty file"][errname(_create_empty, mnt / name)] += 1
            seen["rename"][errname(os.rename, mnt / name, mnt / f"{name}.moved")] += 1
            seen["mkdir"][errname(os.mkdir, mnt / f"{name}.d")] += 1
            seen["rm lower file"][errname(os.unlink, mnt / "gone" / f"{i:02}")] += 1
        # A file of an earlier mount: how a user frees space (a file just written is the easy case).
        seen["rm old"][errname(os.unlink, mnt / "old")] += 1
        seen["rm filler"][errname(os.unlink, mnt / "filler")] += 1
        return {"seen": {k: dict(v) for k, v in seen.items()}, "tree": tree(mnt)}

    results = _both(mounts, small_fs, lower, tmp_path, scenario)
    assert results["overlay"]["seen"] == {
        "write old": {"ok": 1},
        "fill": {"write: ENOSPC": 1},
        "create empty file": {"ok": 40},
        "rename": {"ok": 40},
        "mkdir": {"ok": 40},
        "rm lower file": {"ok": 40},
        "rm old": {"ok": 1},
        "rm filler": {"ok": 1},
    }
    assert results["layerfs"]["seen"] == results["overlay"]["seen"]
    assert results["layerfs"]["tree"] == results["overlay"]["tree"]
    assert _layer_digest(lower) == lower_before


def test_a_full_upper_can_be_mounted_again_and_freed(small_fs, mounts, tmp_path):
    lower = _small_lower(tmp_path / "lower")
    lower_before = _layer_digest(lower)

    def scenario(mount: Callable[[], Path], fs: Path) -> dict:
        mnt = mount()
        seen = {"fill": _write_new(mnt / "log", _content("log", 9 * MiB))}
        mounts.unmount(mnt)
        mnt = mount()
        seen["rm log"] = errname(os.unlink, mnt / "log")  # a file of an earlier mount: the way to free space
        assert wait_for(lambda: _free(fs) > 5.5 * MiB), _free(fs)
        seen["copy up big"] = errname(append, mnt / "big", b"tail\n")
        return {"seen": seen, "tree": tree(mnt)}

    results = _both(mounts, small_fs, lower, tmp_path, scenario)
    assert results["overlay"]["seen"] == {"fill": "write: ENOSPC", "rm log": "ok", "copy up big": "ok"}
    assert results["layerfs"] == results["overlay"]
    assert _layer_digest(lower) == lower_before


class _Signalled(Exception):
    pass


def test_a_signal_stops_a_long_copy_up_and_leaves_nothing(mounts, tmp_path):
    """A caller signalled in the middle of a copy-up of a big file gets EINTR (here: its signal handler's
    exception) instead of waiting for the copy; the upper layer and the work directory hold nothing of
    it, the lower file shows as it was, and the next open copies it up whole."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g", "tmpfs", str(disk)], check=True)
    try:
        lower, upper, work = (disk / n for n in ("lower", "upper", "work"))
        for d in (lower, upper, work):
            d.mkdir()
        with open(lower / "big", "wb") as f:  # 1 GiB: copied at a few hundred MB/s here
            for i in range(1024):
                f.write(_content(str(i), MiB))
        mnt = mounts.layerfs(tmp_path / "mnt", [lower], upper, work)
        previous = signal.signal(signal.SIGALRM, functools.partial(_raise, _Signalled()))
        try:
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(_Signalled):
                os.close(os.open(mnt / "big", os.O_RDWR))
            waited = time.monotonic() - started
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert os.listdir(upper) == [] and os.listdir(work / "work") == [], "a half copy was left"
        assert os.stat(mnt / "big").st_size == 1024 * MiB
        with open(mnt / "big", "r+b") as f:  # uninterrupted: copied up whole
            f.seek(1023 * MiB)
            assert f.read(MiB) == _content("1023", MiB)
        assert os.stat(upper / "big").st_size == 1024 * MiB
        print(f"interrupted copy-up answered after {waited:.2f} s")
        mounts.unmount(mnt)
    finally:
        mounts.cleanup()
        force_unmount(disk)


def _raise(error: Exception, *_args) -> None:
    raise error
