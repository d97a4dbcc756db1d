"""Go's duration strings (``30s``, ``1m30s``, ``500ms``), as Dockerfiles and docker's flags take them."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def nanoseconds(text: str) -> int | None:
    """The duration ``text`` in nanoseconds; None if it is not one."""
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(round(float(n) * _NS[unit]) for n, unit in parts)
