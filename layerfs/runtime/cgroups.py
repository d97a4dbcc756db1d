"""Resource limits (``--memory``, ``--pids-limit``, ``--cpus``) through the host's cgroups, as runc sets
them for docker: a cgroup ``layerfs/<container>`` made in each controller the limits need, the limits
written there, the container's process put in it before it makes its namespaces (so everything it
starts is in it; ``layerfs exec``'s process joins it too), and the cgroup removed when the container has
ended.

Both layouts are met: cgroup v1, a hierarchy per controller (``/sys/fs/cgroup/memory``, ...), and v2's
unified one, where a controller must be enabled in each parent's ``cgroup.subtree_control``. On a hybrid
host (v1 controllers beside an empty v2 tree) a controller is used where it is mounted. A limit whose
controller the host lacks is refused in one line, before the container is made.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass

from .. import userdirs
from ..errors import LayerfsError, UsageError

_MIN_MEMORY = 6 * 1024 * 1024  # docker's floor
_CPU_PERIOD = 100_000  # microseconds, docker's
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None

    @classmethod
    def from_flags(cls, memory: str | None, pids: int | None, cpus: str | None) -> Limits:
        """The limits the flags ask for (docker's units and bounds); UsageError in docker's words."""
        return cls(
            _memory(memory) if memory is not None else None,
            pids if pids is not None and pids > 0 else None,  # 0 and -1: no limit, as docker
            _cpus(cpus) if cpus is not None else None,
        )

    @classmethod
    def from_run_flags(cls, args: argparse.Namespace) -> Limits:
        """The limits of ``layerfs run``'s flags (as given, or as kept in run.json)."""
        return cls.from_flags(args.memory, args.pids_limit, args.cpus)

    def controllers(self) -> list[str]:
        """The controllers they need, each with the flag that asks for it."""
        wanted = (("memory", self.memory), ("pids", self.pids), ("cpu", self.cpus))
        return [controller for controller, value in wanted if value is not None]

    def files(self, controller: str, v2: bool) -> list[tuple[str, str]]:
        """What to write in a cgroup of ``controller``, in order: (file, value)."""
        if controller == "memory":
            memory = self.memory or 0
            if v2:
                return [("memory.max", str(memory)), ("memory.swap.max", str(memory))]
            # (docker's default: as much swap as memory, where swap is accounted)
            return [("memory.limit_in_bytes", str(memory)), ("memory.memsw.limit_in_bytes", str(2 * memory))]
        if controller == "pids":
            return [("pids.max", str(self.pids))]
        quota = round((self.cpus or 0) * _CPU_PERIOD)
        if v2:
            return [("cpu.max", f"{quota} {_CPU_PERIOD}")]
        return [("cpu.cfs_period_us", str(_CPU_PERIOD)), ("cpu.cfs_quota_us", str(quota))]


_FLAGS = {"memory": "--memory", "pids": "--pids-limit", "cpu": "--cpus"}


def _memory(text: str) -> int:
    """docker's RAMInBytes: a number and a unit (b, k, m, g, t, p; 1024s; ``kb``, ``KiB`` alike)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?", text.strip().lower())
    if found is None:
        raise UsageError(f"invalid argument {text!r} for --memory: invalid size")
    size = int(float(found[1]) * _UNITS[found[2]])
    if size < _MIN_MEMORY:
        raise UsageError("Minimum memory limit allowed is 6MB")
    return size


def _cpus(text: str) -> float:
    try:
        cpus = float(text)
    except ValueError:
        raise UsageError(f"invalid argument {text!r} for --cpus: not a number") from None
    available = os.cpu_count() or 1
    if not 0.01 <= cpus <= available:
        raise UsageError(f"range of CPUs is from 0.01 to {available}.00, as there are only {available} CPUs available")
    return cpus


def _hierarchies() -> dict[str, tuple[str, bool]]:
    """Each controller the host has -> (where its hierarchy is mounted, whether that is v2's)."""
    found: dict[str, tuple[str, bool]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            point, fstype, options = fields[4], fields[dash + 1], fields[dash + 3]
            if fstype == "cgroup":
                for controller in options.split(","):
                    found.setdefault(controller, (point, False))
            elif fstype == "cgroup2":
                with contextlib.suppress(OSError), open(os.path.join(point, "cgroup.controllers")) as c:
                    for controller in c.read().split():
                        found.setdefault(controller, (point, True))
    return found


def check(limits: Limits) -> None:
    """LayerfsError (one line) for a limit whose controller the host lacks, and for any limit without
    root, which has no cgroup to set it in."""
    wanted = limits.controllers()
    if wanted and not userdirs.is_root():
        flag = _FLAGS[wanted[0]]
        raise LayerfsError(f"{flag}: resource limits need root (a container run without root gets no cgroup)")
    have = _hierarchies()
    for controller in wanted:
        if controller not in have:
            raise LayerfsError(f"{_FLAGS[controller]}: this host has no {controller} cgroup controller")


def _places(name: str, limits: Limits) -> list[tuple[str, str, str, bool]]:
    """For each controller ``limits`` need: (controller, its hierarchy's mount point, container
    ``name``'s cgroup directory there, whether the hierarchy is v2's)."""
    have = _hierarchies()
    return [
        (controller, have[controller][0], os.path.join(have[controller][0], "layerfs", name), have[controller][1])
        for controller in limits.controllers()
    ]


def of_container(name: str, limits: Limits) -> list[str]:
    """The cgroup directories of running container ``name`` (run with ``limits``): where ``layerfs exec``
    puts its process, as docker's does, so that its memory and pids count against the limits."""
    return list(dict.fromkeys(where for _, _, where, _ in _places(name, limits) if os.path.isdir(where)))


class Cgroup:
    """The cgroup of one container: its directory in each hierarchy its limits need."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.dirs: list[str] = []
        try:
            for controller, point, where, v2 in _places(name, limits):
                if v2:
                    _enable(point, controller)
                if where not in self.dirs:
                    os.makedirs(where, exist_ok=True)
                    self.dirs.append(where)
                for file, value in limits.files(controller, v2):
                    _write(os.path.join(where, file), value, optional=file.startswith("memory.memsw."))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the cgroup (once the processes of an ended container are gone: a moment after PID 1)."""
        _remove(self.dirs)
        self.dirs = []


def remove_left(name: str, limits: Limits) -> None:
    """Remove the cgroup of container ``name`` (run with ``limits``) that its killed shim left."""
    _remove(of_container(name, limits))


def _remove(dirs: list[str]) -> None:
    for where in reversed(dirs):
        for _ in range(100):
            try:
                os.rmdir(where)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)


def enter(dirs: list[str]) -> None:
    """Put the calling process in the cgroups ``dirs`` (what it forks from now on is there too)."""
    for where in dirs:
        _write(os.path.join(where, "cgroup.procs"), str(os.getpid()))


def _enable(point: str, controller: str) -> None:
    """(v2) ``controller`` enabled for the children of the root and of ``layerfs``."""
    for parent in (point, os.path.join(point, "layerfs")):
        os.makedirs(parent, exist_ok=True)
        _write(os.path.join(parent, "cgroup.subtree_control"), f"+{controller}")


def _write(path: str, value: str, *, optional: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not optional:
            raise LayerfsError(f"{path}: this host's cgroup has no such file") from None
    except OSError as e:
        raise LayerfsError(f"{path}: {value}: {e.strerror}") from None
