"""What a container of the store is doing, as its shim writes it in the container's record
(``container.json``, through ``Store.update_container``):

    started, pid          when it last started, and its shim's pid (``layerfs run`` itself, or -d's daemon)
    shim_started          the shim's start time (/proc/PID/stat): a reused pid is not the shim
    first_pid             the container's first process on the host (its PID 1's parent, outside)
    exit_code, finished   how and when it ended (None while it runs)
    rm                    run --rm: removed as soon as it has ended

and beside it in its directory:

    STORE/containers/<name>/run.json             the ``layerfs run`` flags (``start`` runs them again)
    STORE/containers/<name>/container.log        what a detached container wrote (logformat.py's entries)
    STORE/containers/<name>/layerfs-runtime-*/   its /etc/hostname, hosts, resolv.conf while it runs

The shim is the one process that writes these fields; a record that says running while its shim is gone
(SIGKILLed) is the leftover of a crash, which ``lifecycle.refresh`` clears (run by the mount's daemon as
its exit command, or by the next command), as podman's cleanup does.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from ..fs import mounts
from ..store import Store

KILLED = 137  # the exit code of a container whose shim was killed under it (128 + SIGKILL)


@dataclass
class State:
    status: str  # created, running or exited
    shim: int = 0
    shim_started: int = 0
    pid: int = 0  # the container's first process
    exit_code: int | None = None
    rm: bool = False


def of(record: dict) -> State:
    if "started" not in record:
        return State("created")
    status = "running" if record.get("exit_code") is None else "exited"
    return State(
        status,
        record.get("pid") or 0,
        record.get("shim_started") or 0,
        record.get("first_pid") or 0,
        record.get("exit_code"),
        bool(record.get("rm")),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def running(store: Store, name: str, shim: int, pid: int, rm: bool) -> None:
    """(The shim.) The container's first process ``pid`` has started."""
    started = mounts.start_time(shim) or 0
    fields = {"pid": shim, "shim_started": started, "first_pid": pid, "rm": rm, "exit_code": None, "finished": None}
    store.update_container(name, started=_now(), **fields)


def exited(store: Store, name: str, code: int) -> None:
    store.update_container(name, exit_code=code, finished=_now())


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
