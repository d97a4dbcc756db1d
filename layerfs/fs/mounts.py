"""Running mounts, written down by their daemons: mount point -> daemon pid and layers.

``layerfs umount`` waits on the pid (the change index is final only when the daemon has exited) and
``layerfs diff MOUNTPOINT`` finds the layers of a mount here. A record whose daemon is gone is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .. import userdirs


@dataclass
class MountRecord:
    mountpoint: str
    pid: int
    lowers: list[str]
    upper: str | None
    work: str | None
    started: int = 0  # the daemon's start time (/proc/PID/stat): a reused pid is not the daemon


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None if there is no such process, or only
    its corpse (a zombie: a killed daemon whose new parent, as in some containers, does not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _file(mountpoint: str) -> str:
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(userdirs.runtime_dir(), digest[:32] + ".json")


def stats_file(mountpoint: str) -> str:
    """Where the daemon of ``mountpoint`` writes its request statistics when sent SIGUSR1."""
    return _file(mountpoint).removesuffix(".json") + ".stats.json"


def record(mount: MountRecord) -> None:
    os.makedirs(userdirs.runtime_dir(), mode=0o700, exist_ok=True)
    path = _file(mount.mountpoint)
    with open(path + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump(asdict(mount), f)
    os.replace(path + ".tmp", path)


def find(mountpoint: str) -> MountRecord | None:
    """The record of the live daemon serving ``mountpoint``, if there is one."""
    return _live(_file(mountpoint))


def running() -> Iterator[MountRecord]:
    """The records of every live daemon."""
    try:
        names = os.listdir(userdirs.runtime_dir())
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".json") and not name.endswith(".stats.json"):
            mount = _live(os.path.join(userdirs.runtime_dir(), name))
            if mount is not None:
                yield mount


def _live(path: str) -> MountRecord | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            mount = MountRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if start_time(mount.pid) != mount.started:  # its daemon is gone (killed): the record goes too
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return mount


def forget(mountpoint: str, pid: int) -> None:
    """Remove the record, if it is still ``pid``'s (a new mount may have replaced it)."""
    mount = find(mountpoint)
    if mount is None or mount.pid == pid:
        try:
            os.unlink(_file(mountpoint))
        except FileNotFoundError:
            pass


def wait_for_exit(pid: int, timeout: float | None) -> bool:
    """Wait until process ``pid`` (not a child of ours) has exited; False on timeout (None: no timeout)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
