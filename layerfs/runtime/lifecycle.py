"""A container of the store from start to end: run in the foreground or detached (``-d``: a shim of its
own, its output in a log), started again, stopped, killed, waited for, removed, and cleaned up after a
shim that was killed (state.py says where each thing is kept).

The shim is the process that mounts the rootfs, runs the container and unmounts it: ``layerfs run``
itself in the foreground, a daemon forked from it with ``-d``. Whatever ends the shim, the container
ends with it (its processes have PR_SET_PDEATHSIG, and the PID namespace dies with its PID 1) and the
layerfs daemon unmounts the rootfs (the shim is its owner). What is left, a record that says running,
is set right (``refresh``: exited 137, or removed for ``--rm``) by ``layerfs cleanup``, which the
daemon runs once it has unmounted (the mount's exit command, as conmon runs podman's ``container
cleanup``), and by any command that looks at the container before that has run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable

from ..errors import LayerfsError, UsageError
from ..fs import mount, mounts
from ..store import Store
from . import cgroups, logger, state

# (store, name, args, started): run container ``name`` as ``args`` say, calling ``started(pid)`` once its
# first process is there; returns its exit code.
RunFn = Callable[[Store, str, argparse.Namespace, Callable[[int], None]], int]
_DEFAULT_STOP_TIMEOUT = 10
_READY = b"ready\n"


def launch(store: Store, name: str, args: argparse.Namespace, run: RunFn) -> int:
    """Run container ``name``: in this process, or with ``args.detach`` in a shim of its own (the
    container's name printed once it has started)."""
    directory = store.containers.dir(name)
    state.save_flags(directory, args)
    if not args.detach:
        return _shim(store, name, args, run, lambda: None)
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            said = pipe.readline()
        if said != _READY:
            raise LayerfsError(said.decode(errors="replace").strip() or f"container {name}: the shim ended")
        print(name)
        return 0
    os.close(read_end)
    code, writer = 125, 0
    try:
        os.setsid()
        writer = logger.start(state.log_path(directory))

        def started() -> None:
            os.write(write_end, _READY)
            os.close(write_end)

        code = _shim(store, name, args, run, started)
    except BaseException as e:  # (the daemon's errors go to the waiting command, then to the log)
        with contextlib.suppress(OSError):
            os.write(write_end, f"{e}\n".encode(errors="replace"))
        print(f"layerfs: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if writer:
            logger.finish(writer)
        os._exit(code)


def _shim(store: Store, name: str, args: argparse.Namespace, run: RunFn, ready: Callable[[], None]) -> int:
    def started(pid: int) -> None:
        state.running(store, name, os.getpid(), pid, args.rm)
        ready()

    code = 125
    try:
        code = run(store, name, args, started)
        return code
    finally:
        if args.rm:
            store.remove(name, anonymous_volumes=True)
        elif _state(store, name).status == "running":
            state.exited(store, name, code)


def cleanup_command(store: Store, name: str) -> list[str]:
    """The command that sets container ``name`` right once its shim has ended: the exit command of its
    rootfs's mount."""
    return [sys.executable, "-m", "layerfs", "cleanup", "--root", store.root.path, name]


def refresh(store: Store, name: str) -> dict | None:
    """Container ``name``'s record, its state set right first if its shim was killed: the rootfs
    unmounted, its daemon gone, its cgroup removed, exited with 137 (and removed, for ``--rm``: then
    None)."""
    record = store.containers.get(name)
    if record is None:
        return None
    name, found = record["name"], state.of(record)
    if found.status != "running" or state.shim_alive(found):
        return record
    with contextlib.suppress(LayerfsError):  # (not mounted: its daemon detached it on its own)
        mount.umount(record["merged"], lazy=True)
    for daemon in mounts.running():
        if daemon.upper == record["upper"]:
            mounts.wait_for_exit(daemon.pid, 120)
    flags = state.load_flags(store.containers.dir(name))
    if flags is not None:
        cgroups.remove_left(name, cgroups.Limits.from_run_flags(flags))
    if found.rm:
        store.remove(name, anonymous_volumes=True)
        return None
    state.exited(store, name, state.KILLED)
    return store.containers.get(name)


def status(store: Store, name: str) -> tuple[str, state.State]:
    """Container ``name`` (or id)'s name and state, set right (``refresh``)."""
    record = refresh(store, name)
    if record is None:
        raise UsageError(f"no container {name!r}")
    return record["name"], state.of(record)


def _state(store: Store, name: str) -> state.State:
    record = store.containers.get(name)
    return state.of(record) if record else state.State("created")


def start(store: Store, name: str, attach: bool, run: RunFn) -> int:
    """``layerfs start``: a container that is not running run again with the flags it was made with."""
    name, found = status(store, name)
    if found.status == "running":
        print(name)
        return 0
    args = state.load_flags(store.containers.dir(name))
    if args is None:
        raise UsageError(f"container {name!r} was made by layerfs create: layerfs run an image instead")
    args.detach = not attach
    return launch(store, name, args, run)


def image_config(store: Store, record: dict) -> dict:
    """The config (Cmd, Env, StopSignal...) of the image of container ``record``; {} if it has gone."""
    return (store.images.find(record["image"]) or {}).get("config", {}).get("config") or {}


def stop_signal(store: Store, name: str) -> int:
    """The image's StopSignal (``SIGQUIT``, ``QUIT`` or ``3``), else SIGTERM."""
    record = store.containers.get(name)
    return parse_signal((image_config(store, record) if record else {}).get("StopSignal") or "SIGTERM")


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return int(signal.Signals["SIG" + text.upper().removeprefix("SIG")])
    except KeyError:
        raise UsageError(f"{text}: not a signal") from None


def kill(store: Store, name: str, signum: int) -> None:
    """Signal the container's PID 1 (which, as under docker, ignores what it has no handler for)."""
    name, found = status(store, name)
    pid = state.container_init(found) if found.status == "running" else None
    if pid is None:
        raise LayerfsError(f"container {name!r} is not running")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def stop(store: Store, name: str, timeout: float | None) -> None:
    """The stop signal, then SIGKILL after ``timeout`` seconds; returns once the shim has cleaned up."""
    name, found = status(store, name)
    if found.status != "running":
        return
    with contextlib.suppress(LayerfsError):
        kill(store, name, stop_signal(store, name))
    wait_s = _DEFAULT_STOP_TIMEOUT if timeout is None else timeout
    if not mounts.wait_for_exit(found.shim, wait_s):
        with contextlib.suppress(LayerfsError):
            kill(store, name, signal.SIGKILL)
    mounts.wait_for_exit(found.shim, None)
    refresh(store, name)


def wait(store: Store, name: str) -> int:
    """Until the container has ended; its exit code."""
    name, found = status(store, name)
    if found.status == "running":
        mounts.wait_for_exit(found.shim, None)
        name, found = status(store, name)
    if found.exit_code is None:
        raise LayerfsError(f"container {name!r} has never run")
    return found.exit_code


def remove(store: Store, name: str, force: bool, volumes: bool) -> None:
    """``layerfs rm``: refused while it runs, unless ``force`` (killed first, as docker rm -f); with
    ``volumes``, its anonymous volumes too."""
    name, found = status(store, name)
    if found.status == "running":
        if not force:
            raise LayerfsError(f"container {name!r} is running (layerfs stop it first, or rm -f)")
        stop(store, name, 0)
    if store.containers.get(name) is not None:  # (a --rm container has removed itself)
        store.remove(name, anonymous_volumes=volumes)
