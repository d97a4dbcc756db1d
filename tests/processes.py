"""Finding the processes behind a mount, and waiting for them to go.

A daemonized layerfs is a fork of the command, so its command line is the one it was started with:
``... layerfs [mount] -o OPTIONS MOUNTPOINT``. Zombies have an empty command line, so a daemon that
exited but was not reaped yet no longer counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def daemon_pids(mountpoint: str | os.PathLike) -> list[int]:
    """Pids of the live layerfs processes whose command line names ``mountpoint``."""
    target = os.path.abspath(mountpoint)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        args = _cmdline(pid)
        if any("layerfs" in a for a in args) and target in args:
            found.append(int(pid))
    return found


def _under(target: str, prefix: str) -> bool:
    return (target + "/").startswith(prefix)


def open_files_under(pid: int, path: str | os.PathLike) -> list[str]:
    """What process ``pid`` has open below ``path`` (targets of its /proc/PID/fd links)."""
    prefix = os.path.abspath(path).rstrip("/") + "/"
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if _under(target, prefix):
            found.append(target)
    return found


def pids_using(path: str | os.PathLike) -> list[int]:
    """Pids with an open file, a working directory or a root under ``path`` (what blocks its umount)."""
    prefix = os.path.abspath(path).rstrip("/") + "/"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        places = []
        for link in ("cwd", "root"):
            try:
                places.append(os.readlink(f"/proc/{pid}/{link}"))
            except OSError:
                pass
        if any(_under(p, prefix) for p in places) or open_files_under(int(pid), path):
            found.append(int(pid))
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; returns its last value.

    The timeout only bounds a hang: it is generous and no test asserts on how long anything took.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
