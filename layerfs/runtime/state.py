"""What a container of the store is doing, as its shim writes it down, beside its record:

    STORE/containers/<name>/state.json     created, running (the shim's pid) or exited (the exit code)
    STORE/containers/<name>/run.json       the ``layerfs run`` flags it was made with (``start`` runs them again)
    STORE/containers/<name>/container.log  what a detached container wrote (standard output and error)
    STORE/containers/<name>/layerfs-runtime-*/  its /etc/hostname, hosts, resolv.conf while it runs

The shim is the one process that writes ``state.json``; a record that says running while its shim is gone
(SIGKILLed) is the leftover of a crash, which ``lifecycle.refresh`` clears, as podman's cleanup does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

from ..fs import mounts

KILLED = 137  # the exit code of a container whose shim was killed under it (128 + SIGKILL)


@dataclass
class State:
    status: str = "created"  # created, running or exited
    shim: int = 0  # the process that runs the container, mounts and unmounts its rootfs
    shim_started: int = 0  # its start time (/proc/PID/stat): a reused pid is not the shim
    pid: int = 0  # the container's first process on the host (its PID 1's parent, outside its namespaces)
    exit_code: int | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    rm: bool = False  # run --rm: removed as soon as it has ended


def read(directory: str) -> State:
    try:
        with open(os.path.join(directory, "state.json")) as f:
            return State(**json.load(f))
    except FileNotFoundError:
        return State()


def write(directory: str, state: State) -> None:
    path = os.path.join(directory, "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(state), f)
    os.replace(path + ".tmp", path)


def running(directory: str, shim: int, pid: int, rm: bool) -> None:
    """(The shim.) The container's first process ``pid`` has started."""
    write(directory, State("running", shim, mounts.start_time(shim) or 0, pid, None, time.time(), 0.0, rm))


def exited(directory: str, code: int) -> None:
    state = read(directory)
    state.status, state.exit_code, state.finished_at = "exited", code, time.time()
    write(directory, state)


def shim_alive(state: State) -> bool:
    return state.status == "running" and mounts.start_time(state.shim) == state.shim_started


def container_init(state: State) -> int | None:
    """The host pid of the container's PID 1 (the first process's one child), None once it has gone."""
    try:
        with open(f"/proc/{state.pid}/task/{state.pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def describe(state: State) -> str:
    """As docker's status says it: created, running, exited (CODE)."""
    return f"exited ({state.exit_code})" if state.status == "exited" else state.status


def save_flags(directory: str, args: argparse.Namespace) -> None:
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump(vars(args), f, indent=1)


def load_flags(directory: str) -> argparse.Namespace | None:
    try:
        with open(os.path.join(directory, "run.json")) as f:
            return argparse.Namespace(**json.load(f))
    except FileNotFoundError:
        return None


def log_path(directory: str) -> str:
    return os.path.join(directory, "container.log")
