"""``layerfs run``: a process with a layerfs mount as its container rootfs.

A container is a process on the host kernel with its own view: the shim mounts the rootfs (layerfs, in
the host's mount namespace, so that it can be unmounted whatever happens inside), then forks a child
that takes new mount, PID, UTS and IPC namespaces (and a network one for ``--net none``). Since a new PID
namespace applies to the children of the caller of unshare, that child forks once more: the grandchild is
PID 1 of the container. It makes every mount private, mounts ``/proc``, a fresh ``/dev`` (tmpfs with the
usual nodes, ``pts`` and ``shm``) and a read-only ``/sys`` inside the rootfs, then the volumes
(volumes.py; the rootfs itself read-only after them for ``--read-only``), pivot_roots into it and
detaches the old root (chroot would leave it reachable), sets the hostname, user and directory, and execs
the command, confined as confinement.py says (as runc orders it: the rootfs nodev and docker's /proc and
/sys paths masked before pivot_root, the bounding set cut before setuid, the process's capabilities,
no_new_privs, the descriptors and seccomp after it, just before exec). Everything mounted inside dies with
the container's mount namespace; the rootfs mount is taken down by the shim when the command ends, on
errors too. With ``-t`` the command's standard streams are a pty of the container's devpts
(terminal.py); with ``--init`` its PID 1 is a minimal init (init.py) and the command its child.

Run by a plain user, the shim is the same, as root of the user's namespace (usernamespace.py, entered
by the command line): "the host's mount namespace" is then the one made with it, and in the container
the /dev nodes are the host's bound on files (mknod of a device is refused there) and /sys is the
host's bound read-only, as runc makes them rootless.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import pyseccomp

from .. import syscalls, userdirs
from ..errors import LayerfsError
from ..syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC
from . import cgroups, confinement, init, volumes
from .confinement import Confinement
from .init import exit_code
from .process import find_user, make_workdir
from .terminal import Console

_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
_EXEC_FAILED = 127  # as a shell says "command not found"
# What a shell sends a foreground job (Ctrl-C, kill, a closed terminal): passed on to the container.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Process:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str = ""  # -u or the image's User, looked up in the container's /etc/passwd once inside
    hostname: str = "layerfs"
    network: bool = True  # False: a network namespace of its own (loopback only, down)
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host file, container path) bind-mounted
    confinement: Confinement = field(default_factory=Confinement)
    mounts: list[volumes.Mount] = field(default_factory=list)  # -v, --mount, --tmpfs (their sources on the host)
    read_only: bool = False  # --read-only: the rootfs mounted read-only (its mounts as they are)
    cgroups: list[str] = field(default_factory=list)  # the cgroups (cgroups.py) the container goes in
    stdin: bool = False  # -i: the caller's standard input (else /dev/null, as under docker)
    tty: bool = False  # -t: a terminal of the container's own (terminal.py)
    init: bool = False  # --init: a minimal init as PID 1 (init.py)


_MOUNT_POINTS = ("proc", "dev", "sys")


_RUNTIME_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def runtime_files(rootfs: str, where: str, hostname: str, network: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """Write the container's /etc/hostname, /etc/hosts and /etc/resolv.conf into ``where`` (outside the
    rootfs: they are the runtime's, not the container's) and make sure each has a file in the rootfs to
    be mounted on. Returns the binds and the container paths made for them; a file made in /etc puts
    its times back, so that /etc is not changed by it."""
    contents = {
        "/etc/hostname": f"{hostname}\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n",
        "/etc/resolv.conf": _host_resolv_conf() if network else "",
    }
    etc = os.path.join(rootfs, "etc")
    if not os.path.isdir(etc) or os.path.islink(etc):
        return [], []  # an image without /etc: nothing to give it
    binds, made = [], []
    for path in _RUNTIME_FILES:
        source = os.path.join(where, os.path.basename(path))
        with open(source, "w") as f:
            f.write(contents[path])
        target = os.path.join(rootfs, path.lstrip("/"))
        if os.path.islink(target):
            continue  # a symlink (resolv.conf -> ../run/...): left as the image has it
        if not os.path.exists(target):
            times = os.stat(etc)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.utime(etc, ns=(times.st_atime_ns, times.st_mtime_ns))
            made.append(path)
        binds.append((source, path))
    return binds, made


def _host_resolv_conf() -> str:
    try:
        with open("/etc/resolv.conf") as f:
            return f.read()
    except OSError:
        return ""


def make_mount_points(rootfs: str) -> list[str]:
    """Make the directories the container's /proc, /dev and /sys are mounted on, where the image lacks
    them; returns the container paths made (the runtime's, not changes of the container)."""
    made = []
    for name in _MOUNT_POINTS:
        path = os.path.join(rootfs, name)
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
            made.append("/" + name)
        elif not stat.S_ISDIR(os.lstat(path).st_mode):
            raise LayerfsError(f"the image's /{name} is not a directory")
    return made


def run(rootfs: str, process: Process, started: Callable[[int], None] = lambda pid: None) -> int:
    """Run ``process`` in ``rootfs`` (a mounted rootfs) and return its exit code (128+N for signal N);
    ``started`` is told the pid of the container's first process."""
    shim = os.getpid()
    seccomp = process.confinement.seccomp_filter()
    return supervise(process, started, lambda console: _container(rootfs, process, seccomp, shim, console))


def supervise(process: Process, started: Callable[[int], None], child: Callable[[Console | None], int]) -> int:
    """Fork ``child`` (with the console of ``process``'s terminal, if it has one), relay its terminal,
    pass the signals a shell sends on to it, and return its exit code."""
    console = Console() if process.tty else None
    pid = os.fork()
    if pid == 0:
        os._exit(child(console))
    started(pid)
    forward = {s: signal.signal(s, lambda n, _: _pass_on(pid, n)) for s in _FORWARDED}
    try:
        if console is not None:
            console.relay(process.stdin)
        return exit_code(_wait(pid))
    finally:
        for s, previous in forward.items():
            signal.signal(s, previous)


def _pass_on(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _die_with_parent(parent: int) -> None:
    """Be killed when the parent ends, even by SIGKILL: a killed shim takes its container with it."""
    syscalls.set_death_signal(signal.SIGKILL)
    # It ended before the line above: we were given to another parent. (PID 1 of a new PID namespace
    # sees its parent, outside, as 0.)
    if os.getppid() not in (parent, 0):
        os._exit(125)


def _container(
    rootfs: str, process: Process, seccomp: pyseccomp.SyscallFilter | None, shim: int, console: Console | None
) -> int:
    """(In the shim's child.) New namespaces, then PID 1 in them; returns its exit code."""
    try:
        _die_with_parent(shim)
        cgroups.enter(process.cgroups)  # (before any process of the container is made)
        flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
        syscalls.unshare(flags | (0 if process.network else syscalls.CLONE_NEWNET))
        return in_pid_namespace(lambda: _become_pid1(rootfs, process, seccomp, console))
    except OSError as e:
        os.write(2, f"layerfs: run: {_described(e)}\n".encode())
        return 125  # as docker run says the runtime failed


def in_pid_namespace(child: Callable[[], None]) -> int:
    """(After unshare or setns of a PID namespace, which only this process's children enter.) Fork
    ``child``, which never returns, pass signals on to it, and return its exit code."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _die_with_parent(parent)
        child()
    for s in _FORWARDED:
        signal.signal(s, lambda n, _: _pass_on(pid, n))
    return exit_code(_wait(pid))


def _described(e: OSError) -> str:
    """A failed setup call in a line: what it was about (a mount point, "unshare") and why."""
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror or str(e)


def _become_pid1(
    rootfs: str, process: Process, seccomp: pyseccomp.SyscallFilter | None, console: Console | None
) -> NoReturn:
    try:
        syscalls.mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing from here reaches the host
        syscalls.mount(rootfs, rootfs, None, MS_BIND | MS_REC)  # pivot_root wants the new root a mount point
        syscalls.mount("proc", os.path.join(rootfs, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        rootless = not userdirs.is_root()
        _make_dev(os.path.join(rootfs, "dev"), rootless)
        _mount_sys(os.path.join(rootfs, "sys"), rootless)
        for source, target in process.binds:  # the runtime's /etc/hostname and friends, over the image's
            syscalls.mount(source, os.path.join(rootfs, target.lstrip("/")), None, MS_BIND)
        volumes.mount_all(rootfs, process.mounts)
        confinement.confine_rootfs(rootfs, process.confinement)
        if process.read_only:
            confinement.remount(rootfs, MS_RDONLY)
        # Where the old root goes until it is detached: inside /dev, a tmpfs, so no trace in the rootfs.
        old = os.path.join(rootfs, "dev", ".oldroot")
        os.mkdir(old, 0o700)
        syscalls.pivot_root(rootfs, old)
        os.chdir("/")
        syscalls.umount("/dev/.oldroot", lazy=True)
        os.rmdir("/dev/.oldroot")
        socket.sethostname(process.hostname)
    except OSError as e:
        os.write(2, f"layerfs: run: setup: {_described(e)}\n".encode())
        os._exit(125)
    except LayerfsError as e:
        os.write(2, f"layerfs: run: {e}\n".encode())
        os._exit(125)
    exec_process(process, seccomp, console)


def _mount_sys(target: str, rootless: bool) -> None:
    """A read-only /sys: a sysfs of its own as root; in a user namespace the host's bound read-only, as
    runc does rootless (a sysfs mount there needs a network namespace of that user namespace's)."""
    if not rootless:
        syscalls.mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return
    syscalls.mount("/sys", target, None, MS_BIND | MS_REC)
    confinement.remount(target, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def exec_process(process: Process, seccomp: pyseccomp.SyscallFilter | None, console: Console | None) -> NoReturn:
    """(Inside the container's namespaces and root.) Become ``process``: its user, directory, terminal
    and confinement; then exec its command (under an init, for ``--init``)."""
    code = 125
    try:
        user = find_user(process.user)
        env = {"HOME": user.home, **process.env}
        make_workdir(process.cwd, user)
        if console is not None:
            console.take(user.uid, user.gid)
        elif not process.stdin:
            os.dup2(os.open("/dev/null", os.O_RDONLY), 0)  # (the descriptor itself goes with the others)
        confinement.bound_capabilities(process.confinement)
        parent = os.getppid()
        os.setgroups(user.groups)
        os.setgid(user.gid)
        os.setuid(user.uid)
        _die_with_parent(parent)  # (again: a change of user clears it)
        os.chdir(process.cwd)
        confinement.enter(process.confinement, seccomp, user.uid)
        if process.init:
            init.fork_under_init()
        code = _EXEC_FAILED
        os.execvpe(process.argv[0], process.argv, env)
    except OSError as e:
        what = f"{process.argv[0]}: {e.strerror or e}" if code == _EXEC_FAILED else f"setup: {_described(e)}"
        os.write(2, f"layerfs: run: {what}\n".encode())
    except LayerfsError as e:
        os.write(2, f"layerfs: run: {e}\n".encode())
    os._exit(code)


def _make_dev(dev: str, rootless: bool) -> None:
    """A fresh /dev: tmpfs with the usual character devices, pts (its own ptmx) and shm. In a user
    namespace, where mknod of a device is refused, the devices are the host's bound on empty files, as
    runc makes them rootless."""
    syscalls.mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name, (major, minor) in _DEVICES.items():
        node = os.path.join(dev, name)
        if rootless:
            os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            syscalls.mount(os.path.join("/dev", name), node, None, MS_BIND)
        else:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    for name in ("pts", "shm"):
        os.mkdir(os.path.join(dev, name), 0o755)
    syscalls.mount(
        "devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    syscalls.mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))
