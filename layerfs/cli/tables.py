"""Tables as docker prints them (``images``, ``ps``, ``history``): columns three spaces apart, sizes and
ages in docker's words."""

from __future__ import annotations

import os
import time
from datetime import datetime


def table(header: list[str], rows: list[list[str]]) -> str:
    """``header`` and ``rows`` in columns as wide as their widest cell, three spaces apart."""
    lines = [header, *rows]
    widths = [max(len(row[n]) for row in lines) for n in range(len(header) - 1)] + [0]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in lines
    )


def tree_size(path: str) -> int:
    """Bytes of the files of a layer directory (each inode once), as docker counts a layer's size."""
    seen, total = set(), 0
    for parent, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(parent, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def human_size(size: int) -> str:
    """As docker shows sizes: three significant digits, powers of 1000 (``4.26MB``, ``0B``)."""
    shown = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if shown < 1000:
            return f"{shown:.3g}{unit}"
        shown /= 1000
    return f"{shown:.3g}TB"


def ago(created: object) -> str:
    """``5 minutes ago``, as docker says it; ``N/A`` where there is no time."""
    since = duration(created)
    return "N/A" if since is None else f"{since} ago"


def duration(since: object) -> str | None:
    """How long since the ISO time ``since``, as docker says it (``5 minutes``); None for no time."""
    try:
        seconds = time.time() - datetime.fromisoformat(str(since).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    for size, unit in (
        (31536000, "year"),
        (2592000, "month"),
        (604800, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ):
        count = int(seconds // size)
        if count >= 1:
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return "Less than a second"
