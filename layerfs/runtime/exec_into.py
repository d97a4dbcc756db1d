"""``layerfs exec``: a process started in a running container, as ``docker exec`` starts one.

It joins the container's cgroups (those of its limits, cgroups.py: what it starts counts against them,
as under docker), then the namespaces of the container's PID 1 that are not its own already (the user
namespace first, which a container run without root has; then PID, IPC, UTS, network and mount, the last
of which puts it at the container's root) and becomes the process as the container's own did
(shim.exec_process: the user from the container's /etc/passwd, the container's confinement and
environment, ``-t``'s terminal from the container's devpts). Joining a PID namespace applies to the
joiner's children, so the process is a grandchild of the command, which waits for it and passes
signals on, as ``layerfs run`` does. It dies with the container's PID 1, as every process in its PID
namespace does.
"""

from __future__ import annotations

import argparse
import os

from pyseccomp import SyscallFilter

from .. import syscalls
from ..errors import LayerfsError
from ..store import Store
from . import cgroups, lifecycle, process, run, shim, state
from .confinement import Confinement
from .terminal import Console

# Joined in this order: the mount namespace last, since it changes what /proc and / are.
_NAMESPACES = (
    ("ipc", syscalls.CLONE_NEWIPC),
    ("uts", syscalls.CLONE_NEWUTS),
    ("net", syscalls.CLONE_NEWNET),
    ("mnt", syscalls.CLONE_NEWNS),
)


def main(store: Store, name: str, args: argparse.Namespace) -> int:
    """``layerfs exec [-i] [-t] [-u USER] [-e K[=V]] [-w DIR] CONTAINER CMD...``; the command's exit code."""
    name, found = lifecycle.status(store, name)
    pid1 = state.container_init(found) if found.status == "running" else None
    run_flags = state.load_flags(store.containers.dir(name))
    record = store.containers.get(name)
    if pid1 is None or run_flags is None or record is None:
        raise LayerfsError(f"container {name!r} is not running")
    config = lifecycle.image_config(store, record)
    # The container's environment, then exec's -e.
    env = process.environment(config, run_flags.env + args.env, run_flags.env_file, run.container_hostname(run_flags))
    to_run = shim.Process(
        args.cmd,
        env,
        args.workdir or process.workdir(config, run_flags.workdir),
        args.user or run_flags.user or config.get("User") or "",
        confinement=Confinement.from_flags(run_flags.cap_add, run_flags.cap_drop, run_flags.privileged),
        cgroups=cgroups.of_container(name, cgroups.Limits.from_run_flags(run_flags)),
        stdin=args.interactive,
        tty=args.tty,
    )
    seccomp = to_run.confinement.seccomp_filter()
    # Those it shares with this process are not joined: a container run without root, in a user namespace
    # of its own, may share the host's network, which its user may not join.
    kinds = [kind for kind in ("user", "pid", *dict(_NAMESPACES)) if not _shared(pid1, kind)]
    namespaces = {kind: os.open(f"/proc/{pid1}/ns/{kind}", os.O_RDONLY) for kind in kinds}
    try:
        return shim.supervise(to_run, lambda pid: None, lambda console: _join(namespaces, to_run, seccomp, console))
    finally:
        for fd in namespaces.values():
            os.close(fd)


def _shared(pid: int, kind: str) -> bool:
    return os.path.samefile(f"/proc/{pid}/ns/{kind}", f"/proc/self/ns/{kind}")


def _join(
    namespaces: dict[str, int], to_run: shim.Process, seccomp: SyscallFilter | None, console: Console | None
) -> int:
    try:
        cgroups.enter(to_run.cgroups)  # (from the host's side: a user namespace may not move itself)
        if "user" in namespaces:
            syscalls.setns(namespaces["user"], syscalls.CLONE_NEWUSER)
        if "pid" in namespaces:
            syscalls.setns(namespaces["pid"], syscalls.CLONE_NEWPID)
    except OSError as e:
        os.write(2, f"layerfs: exec: {e.strerror}\n".encode())
        return 125
    except LayerfsError as e:
        os.write(2, f"layerfs: exec: {e}\n".encode())
        return 125
    return shim.in_pid_namespace(lambda: _enter(namespaces, to_run, seccomp, console))


def _enter(
    namespaces: dict[str, int], to_run: shim.Process, seccomp: SyscallFilter | None, console: Console | None
) -> None:
    try:
        for kind, flag in _NAMESPACES:
            if kind in namespaces:
                syscalls.setns(namespaces[kind], flag)
    except OSError as e:
        os.write(2, f"layerfs: exec: {e.strerror}\n".encode())
        os._exit(125)
    shim.exec_process(to_run, seccomp, console)
