"""Mounting and unmounting: the daemon's life cycle.

A mount program's caller (a person's shell, or containers-storage) waits for the command to exit and
then uses the mount. So by default layerfs forks a daemon and exits 0 only when the kernel has
initialised the FUSE connection; if the mount fails, the daemon's error is printed by the command,
which exits non-zero.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import resource
import shutil
import signal
import threading
import time

from .. import syscalls
from ..core.union import Union
from ..errors import LayerfsError, log_to_stderr, printable
from . import mounts
from .options import MountConfig

_READY = b"\0layerfs-ready\n"


def _prepare_process() -> None:
    # Modes arrive with the caller's umask already applied by the kernel; ours must not apply twice.
    os.umask(0)
    # Every open file of every container process holds one descriptor here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(config: MountConfig, union: Union, debug: bool, on_ready=None) -> None:
    from ..fuse import Config
    from .operations import serve

    def ready(session) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: _write_stats(session, config.mountpoint))
        mounts.record(
            mounts.MountRecord(
                os.path.abspath(config.mountpoint),
                os.getpid(),
                config.lowers,
                config.upper,
                config.work,
                mounts.start_time(os.getpid()) or 0,
            )
        )
        if config.owner is not None:
            watch = (config.owner, config.mountpoint, owner_gone)
            threading.Thread(target=_unmount_when_gone, args=watch, daemon=True).start()
        if on_ready is not None:
            on_ready()

    # SIGINT, SIGTERM, SIGHUP: unmount, which ends the session once nothing uses the mount any more.
    stopping = threading.Event()
    owner_gone = threading.Event()

    def stop(*_) -> None:
        stopping.set()
        _detach_quietly(config.mountpoint)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    fuse_config = Config(
        fsname=config.fsname,
        readonly=config.readonly,
        allow_other=config.allow_other,
        passthrough=config.passthrough,
        threads=config.threads,
        debug=debug,
    )
    try:
        serve(
            union,
            config.mountpoint,
            fuse_config,
            on_ready=ready,
            owners=config.owners,
            static_nlink=config.static_nlink,
        )
    except OSError as e:
        # Stopped by a signal between mount(2) and the kernel's INIT: nothing was served, and the
        # unmount the signal asked for is done. Anything else is a failure.
        if not (e.errno == errno.ENODEV and stopping.is_set()):
            raise
        union.close()
    finally:
        mounts.forget(config.mountpoint, os.getpid())
        if owner_gone.is_set() and config.exit_command:
            _run_exit_command(config.exit_command)


def _write_stats(session, mountpoint: str) -> None:
    """SIGUSR1: the requests served so far, by operation, for ``layerfs stats``."""
    stats = session.stats()
    with open(f"/proc/{os.getpid()}/status") as f:
        rss_kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    report = {
        "counts": stats.counts,
        "seconds": stats.seconds,
        "granted": session.granted_names(),
        "rss_kib": rss_kib,
        **session.operations.summary(),
    }
    path = mounts.stats_file(mountpoint)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


def _detach_quietly(mountpoint: str) -> None:
    try:
        syscalls.umount(os.path.abspath(mountpoint), lazy=True)
    except OSError:
        pass  # unmounted already


def _unmount_when_gone(owner: int, mountpoint: str, gone: threading.Event) -> None:
    """The mount's owner (layerfs run's shim) ended, maybe killed: detach the mount, so that the daemon
    ends once nothing uses it any more (and then runs the exit command)."""
    mounts.wait_for_exit(owner, None)
    gone.set()
    _detach_quietly(mountpoint)


def _run_exit_command(argv: list[str]) -> None:
    """Start the owner's cleanup on its own, as conmon starts its --exit-command: not waited for (it
    may wait for this daemon to have ended), with the usual umask (the daemon's is 0)."""
    import subprocess  # (here: no mount's start needs it)

    try:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, umask=0o022)
    except OSError as e:
        logging.getLogger(__name__).warning("exit command %s: %s", printable(argv[0]), e.strerror)


def mount(config: MountConfig, *, foreground: bool = False, debug: bool = False) -> int:
    """Mount ``config``; returns the exit code for the command."""
    log_to_stderr()  # (the daemon's warnings, until it is ready: then _log_to)
    _refuse_layers_in_use(config)
    # The union opens its layers now, before the mount hides any of them (a mount over its own lower).
    union = Union(
        config.lowers,
        config.upper,
        config.work,
        sync=config.sync,
        redirect_dir=config.redirect_dir,
        metacopy=config.metacopy,
        userxattr=config.userxattr,
        override_stat=config.override_stat,
    )
    if foreground:
        _prepare_process()
        _serve(config, union, debug)
        return 0

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return _wait_until_ready(read_end, pid)

    # The daemon.
    os.close(read_end)
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _prepare_process()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if not debug:
            os.dup2(write_end, 2)  # until ready, complaints go to the waiting command
        keep = sorted({0, 1, 2, write_end, devnull, *union.descriptors()})
        for low, high in itertools.pairwise([*keep, os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)

        def ready() -> None:
            os.write(write_end, _READY)
            if not debug:
                _log_to(config.log)
                os.dup2(devnull, 2)
            os.close(write_end)

        _serve(config, union, debug, on_ready=ready)
        code = 0
    except BaseException as e:  # (the daemon reports everything to the waiting command)
        try:
            os.write(write_end, f"{e}\n".encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(code)


def _refuse_layers_in_use(config: MountConfig) -> None:
    """Two daemons writing one upper (or work) directory would each change it under the other's
    feet: refused, as kernel overlayfs refuses one in use by another mount (EBUSY)."""
    for other in mounts.running():
        for role, mine in (("upperdir", config.upper), ("workdir", config.work)):
            if mine is not None and mine in (other.upper, other.work):
                raise LayerfsError(f"{role} {printable(mine)}: in use by the mount at {printable(other.mountpoint)}")


def _log_to(path: str | None) -> None:
    """Once the command has returned, the daemon's warnings and unexpected errors (with tracebacks) go
    to ``path`` (-o log=FILE), else to syslog where there is one."""
    if path is not None:
        handler: logging.Handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s layerfs[%(process)d]: %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # (here: sockets and pickle are no mount's start-up cost)

        handler = SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("layerfs[%(process)d]: %(message)s"))
    else:
        return
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _wait_until_ready(read_end: int, pid: int) -> int:
    received = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while _READY not in received:
            chunk = pipe.read(4096)
            if not chunk:
                break
            received += chunk
    if _READY in received:
        return 0
    os.waitpid(pid, 0)
    message = " ".join(line.strip() for line in received.decode(errors="replace").splitlines() if line.strip())
    raise LayerfsError(f"mount failed: {message or 'the daemon exited without a word'}")


def umount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount a layerfs (or any FUSE) mount, a dead one (daemon killed) included. Unless ``lazy``,
    returns when the daemon has exited."""
    path = os.path.abspath(mountpoint)
    daemon = mounts.find(path)
    _detach(mountpoint, path, lazy)
    if daemon is not None and not lazy and not mounts.wait_for_exit(daemon.pid, _DAEMON_EXIT_S):
        raise LayerfsError(f"{mountpoint}: unmounted, but its daemon (pid {daemon.pid}) has not exited")


def stats(mountpoint: str) -> dict:
    """Ask the daemon of ``mountpoint`` for its statistics (SIGUSR1) and return them."""
    daemon = mounts.find(os.path.abspath(mountpoint))
    if daemon is None:
        raise LayerfsError(f"{mountpoint}: not a running layerfs mount")
    path = mounts.stats_file(daemon.mountpoint)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.kill(daemon.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            time.sleep(0.02)
    raise LayerfsError(f"{mountpoint}: its daemon (pid {daemon.pid}) did not answer")


def render_stats(report: dict) -> str:
    lines = [f"{'operation':<14}{'requests':>10}{'total ms':>11}{'mean us':>10}"]
    for name, count in sorted(report["counts"].items(), key=lambda item: -item[1]):
        seconds = report["seconds"][name]
        lines.append(f"{name:<14}{count:>10}{seconds * 1e3:>11.1f}{seconds / count * 1e6:>10.1f}")
    lines.append(
        f"nodes {report['nodes']}, open files {report['open files']}, resident {report['rss_kib'] / 1024:.1f} MiB"
    )
    lines.append(
        "kernel features: " + ", ".join(report["granted"]) + ("" if report["passthrough"] else " (passthrough off)")
    )
    return "\n".join(lines) + "\n"


_DAEMON_EXIT_S = 120  # saving a change index of a million paths takes seconds, not minutes


def _detach(mountpoint: str, path: str, lazy: bool) -> None:
    try:
        syscalls.umount(path, lazy=lazy)
        return
    except PermissionError:
        pass  # not root: the setuid helper may do it
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise LayerfsError(f"{mountpoint}: not mounted") from e
        if e.errno == errno.EBUSY:
            raise LayerfsError(f"{mountpoint}: busy (files open or a process inside; -l detaches it)") from e
        if e.errno == errno.ENOENT:
            raise LayerfsError(f"{mountpoint}: no such directory") from e
        raise
    helper = shutil.which("fusermount3") or shutil.which("fusermount")
    if helper is None:
        raise LayerfsError(f"{mountpoint}: permission denied and no fusermount to ask")
    import subprocess  # (here: a mount needs none)

    args = [helper, "-u"] + (["-z"] if lazy else []) + [path]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise LayerfsError(f"{mountpoint}: {result.stderr.strip() or 'unmount failed'}")
