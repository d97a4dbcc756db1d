"""``layerfs ps``: the store's containers in docker's columns (CONTAINER ID, IMAGE, COMMAND, CREATED,
STATUS, NAMES), the running ones unless ``-a``, or their ids alone (``-q``). Only what the records hold is
shown: a container is up while the shim that started it runs and has not recorded its end (a record
whose shim was killed is set right first: runtime/lifecycle.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .tables import ago, duration, table

if TYPE_CHECKING:
    from ..store import Store


def render(store: Store, *, everything: bool, quiet: bool) -> str:
    rows = []
    from ..runtime.lifecycle import refresh

    for name in store.containers.names():
        record = refresh(store, name)  # (a killed shim's container set right first)
        if record is None:
            continue  # (removed since it was listed)
        shown = status(record)
        if everything or shown.startswith("Up"):
            rows.append(
                [
                    record.get("id", "")[:12],
                    record["image"] or ":".join(record.get("lower_dirs", [])),
                    _command(record.get("command") or []),
                    ago(record.get("created")),
                    shown,
                    name,
                ]
            )
    if quiet:
        return "".join(f"{row[0]}\n" for row in rows)
    return table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"], rows)


def status(record: dict) -> str:
    """docker's STATUS: ``Created``, ``Up 5 minutes``, ``Exited (0) 3 minutes ago`` (``Dead``: its shim
    ended without recording how)."""
    if record.get("exit_code") is not None:
        return f"Exited ({record['exit_code']}) {ago(record.get('finished'))}"
    if "started" not in record:
        return "Created"
    return f"Up {duration(record['started'])}" if _alive(record.get("pid")) else "Dead"


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _command(argv: list[str]) -> str:
    """As docker shows it: the words (those with a space in single quotes), cut at 20 characters, quoted."""
    line = " ".join(f"'{word}'" if " " in word else word for word in argv)
    return '"' + (line if len(line) <= 20 else line[:19] + "…") + '"'
