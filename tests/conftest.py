"""Shared fixtures: real mounts of layerfs and of kernel overlayfs, always unmounted afterwards.

Most tests run as root with /dev/fuse (tools/test installs what is needed): those are marked ``root``
(pyproject.toml), by hand or, for every test that uses a mounting fixture, here; without root they are
skipped, and ``-m "not root"`` runs the rest, which needs neither. Every mount made through the
``mounts`` fixture is unmounted at teardown even when the test fails; a session-end check fails the run
if anything under pytest's temporary directories is still mounted. ``public_base`` gives mount points
that users other than root can reach (pytest's own temporary directories are private to root).
``plain_user`` is a user made for one test (and removed after it, with its processes), who runs layerfs
through an interpreter they may use, with /dev/fuse open to them for the test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import layerfs as layerfs_package

LAYERFS = [sys.executable, "-m", "layerfs"]


def layerfs(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``layerfs ARGS`` (text output captured); a failure fails the test unless ``check`` is False."""
    return subprocess.run(
        LAYERFS + [*map(str, args)], capture_output=True, text=True, timeout=120, check=check, **kwargs
    )


def runc_run(bundle: Path, name: str) -> subprocess.CompletedProcess:
    """``runc run`` of a bundle ``layerfs bundle`` made (its output captured), its rootfs's mount
    unmounted after, whatever happened."""
    try:
        return subprocess.run(
            ["runc", "run", "--bundle", str(bundle), f"{name}-{os.getpid()}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        layerfs("umount", bundle / "rootfs")


def table_rows(output: str) -> list[dict[str, str]]:
    """A table as docker prints it (``ps``, ``images``): each row by its header's column names, cut where
    the header's columns start."""
    header, *rows = output.splitlines()
    names = re.findall(r"\S+(?: \S+)*", header)
    starts = [header.index(name) for name in names] + [None]
    return [
        {name: row[start:end].strip() for name, start, end in zip(names, starts, starts[1:], strict=False)}
        for row in rows
    ]


def assert_journal_complete(index) -> None:
    """A change index read back after its mount ended: not rebuilt, and no directory walked again but those
    whose entries the mount changed (the parents of the paths it journaled: their ctimes moved, which a
    reader cannot tell from a change behind the index's back). A change the daemon did not journal shows
    as another directory walked again."""
    changed_dirs = {p.rpartition("/")[0] or "/" for p in index.journaled} | set(index.journaled)
    assert not index.rebuilt, "the index was rebuilt: its snapshot or journal was unusable"
    assert set(index.rescanned) <= changed_dirs, f"a change was not journaled: {index.rescanned} walked again"


def errno_of(action) -> int | None:
    """The errno ``action()`` failed with; None if it did not."""
    try:
        action()
    except OSError as e:
        return e.errno
    return None


def _mounted_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def is_mounted(path: str | os.PathLike) -> bool:
    return os.path.abspath(path) in _mounted_points()


def _fstype(path: Path) -> str | None:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        types = [line.split()[2] for line in f if line.split()[1].replace("\\040", " ") == target]
    return types[-1] if types else None


def force_unmount(path: str | os.PathLike) -> None:
    """Unmount ``path`` by every means, for cleanup; no error if it is not mounted."""
    path = os.path.abspath(path)
    for args in (["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True)
        time.sleep(0.05)


class Layers:
    """Builds layer directories under a base directory."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def dir(self, name: str) -> Path:
        p = self.base / name
        p.mkdir(parents=True, exist_ok=True)
        return p


class Mounts:
    """Mounts layerfs, kernel overlayfs or fuse-overlayfs and remembers them for cleanup."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    @staticmethod
    def options(lowers, upper=None, work=None, extra: str = "") -> str:
        opts = "lowerdir=" + ":".join(str(p) for p in lowers)
        if upper is not None:
            opts += f",upperdir={upper},workdir={work}"
        return opts + ("," + extra if extra else "")

    def layerfs(self, mountpoint, lowers, upper=None, work=None, extra: str = "") -> Path:
        """Mount layerfs (daemonized, as a user would) and return the mount point."""
        mnt = Path(mountpoint)
        mnt.mkdir(parents=True, exist_ok=True)
        self.points.append(mnt)
        result = subprocess.run(
            LAYERFS + ["-o", self.options(lowers, upper, work, extra), str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"layerfs mount failed: {result.stderr}"
        assert is_mounted(mnt)
        return mnt

    def overlay(self, mountpoint, lowers, upper=None, work=None, extra: str = "") -> Path:
        """Mount kernel overlayfs, the reference implementation."""
        mnt = Path(mountpoint)
        mnt.mkdir(parents=True, exist_ok=True)
        self.points.append(mnt)
        opts = self.options(lowers, upper, work, extra)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, capture_output=True, timeout=60
        )
        return mnt

    def fuse_overlayfs(self, mountpoint, lowers, upper, work, extra: str = "") -> Path:
        """Mount fuse-overlayfs, the FUSE peer whose options layerfs takes."""
        mnt = Path(mountpoint)
        mnt.mkdir(parents=True, exist_ok=True)
        self.points.append(mnt)
        subprocess.run(
            ["fuse-overlayfs", "-o", self.options(lowers, upper, work, extra), str(mnt)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return mnt

    def unmount(self, mountpoint) -> None:
        """Unmount cleanly (the test wants it gone now, e.g. to look at the upper layer)."""
        mnt = Path(mountpoint)
        if is_mounted(mnt):
            # layerfs's own umount also waits for the daemon to exit.
            command = LAYERFS + ["umount"] if _fstype(mnt) == "fuse.layerfs" else ["umount"]
            subprocess.run(command + [str(mnt)], check=True, capture_output=True, timeout=60)
        if mnt in self.points:
            self.points.remove(mnt)

    def cleanup(self) -> None:
        for mnt in reversed(self.points):
            force_unmount(mnt)
        self.points.clear()


@pytest.fixture
def mounts():
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def layers(tmp_path) -> Layers:
    return Layers(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_mounted(tmp_path_factory):
    yield
    # With the slash: a run in pytest-1 must not take the mounts of another run, in pytest-12, for its own.
    base = str(tmp_path_factory.getbasetemp()) + "/"
    left = sorted(p for p in _mounted_points() if p.startswith(base))
    for p in left:
        force_unmount(p)
    assert not left, f"tests left mounts behind: {left}"


# The fixtures that mount: a test that uses one (itself or through another fixture) needs root, marked so
# here rather than by hand, so that no such test can be left out of the mark.
_MOUNTING_FIXTURES = {"mounts", "public_base", "tmpfs"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _MOUNTING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.root)
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (mounts, chown, mknod or namespaces): run as root, or -m 'not root'")
        for item in items:
            if item.get_closest_marker("root"):
                item.add_marker(skip)


@pytest.fixture
def public_base(mounts) -> Iterator[Path]:
    """A directory every user can traverse, for mount points used by non-root scenarios.

    Only mount point directories go in here: at teardown everything is unmounted first, then the
    (empty) directories are removed with rmdir, which never descends into anything still mounted.
    """
    base = Path(tempfile.mkdtemp(prefix="layerfs-scenarios-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        mounts.cleanup()
        for child in base.iterdir():
            try:
                child.rmdir()
            except OSError:
                pass
        base.rmdir()


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs: another filesystem (one with a UUID), and one we can try to unmount to see who still
    holds it."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if is_mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=True)


# -- a plain user ---------------------------------------------------------------------------------


@dataclass
class User:
    name: str
    uid: int
    gid: int
    env: dict[str, str]  # what runs this layerfs as this user: PATH, and PYTHONPATH (the source under test)

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        """``args`` run as the user (runuser: no password, no login shell), text output captured."""
        command = ["runuser", "-u", self.name, "--", "env", *(f"{k}={v}" for k, v in self.env.items()), *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 or not check, f"{args} as {self.name}: {result.stderr}"
        return result

    def layerfs(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "layerfs", *args, check=check)

    def layerfs_program(self, path: Path) -> Path:
        """A ``layerfs`` the user can run, at ``path`` (a mount_program for their Podman)."""
        settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items() if k == "PYTHONPATH")
        path.write_text(f'#!/bin/sh\n{settings} exec {sys.executable} -m layerfs "$@"\n')
        path.chmod(0o755)
        return path


def _check_python_runs_as(name: str) -> None:
    """The user must be able to run this interpreter: tools/setup makes the venv on the system's python3 for
    that (a Python under /root, as pyenv's, is closed to other users)."""
    probe = subprocess.run(["runuser", "-u", name, "--", sys.executable, "-c", ""], capture_output=True)
    if probe.returncode != 0:
        pytest.fail(f"{sys.executable}: other users cannot run it; tools/setup makes a venv they can", pytrace=False)


def processes_of(uid: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(int(pid))
        except FileNotFoundError:
            pass
    return found


def end_processes_of(uid: int) -> None:
    """Kill every process of ``uid`` until none is left (one may start another as it is killed: Podman's
    pause process, conmon), so that userdel finds the user gone."""
    deadline = time.monotonic() + 15
    while (pids := processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.fixture
def plain_user() -> Iterator[User]:
    """A user made for this test alone, removed (with whatever it left running) even when the test fails;
    /dev/fuse opened to every user for the test, as udev leaves it on every desktop and server."""
    name = f"lfs-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    entry = pwd.getpwnam(name)
    try:
        os.chmod("/dev/fuse", 0o666)
        _check_python_runs_as(name)
        source = str(Path(layerfs_package.__file__).parents[1])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": source}
        yield User(name, entry.pw_uid, entry.pw_gid, env)
    finally:
        os.chmod("/dev/fuse", mode)
        end_processes_of(entry.pw_uid)
        subprocess.run(["userdel", name], check=True, capture_output=True)


def give_subordinate_ids(user: User) -> None:
    """65536 subordinate uids and gids for ``user``, as Debian's useradd gives a new user where
    /etc/login.defs lets it; where it did not, a range past every one given (userdel removes it)."""
    for table, option in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        ranges = [line.split(":") for line in Path(table).read_text().splitlines() if line.count(":") == 2]
        if not any(name == user.name for name, _, _ in ranges):
            start = max([100000, *(int(first) + int(count) for _, first, count in ranges)])
            subprocess.run(["usermod", option, f"{start}-{start + 65535}", user.name], check=True)
