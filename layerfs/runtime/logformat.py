"""A container's log, written and read: podman's (and the kubelet's CRI) ``k8s-file`` format. Each entry
is one line,

    2026-12-08T04:45:00.123456789+00:00 stdout F text

its time (UTC, to the nanosecond), its stream (``stdout`` or ``stderr``), ``F`` for a line that ended
with a newline or ``P`` for a piece without one (the rest of the line follows in later entries), and the
bytes as the container wrote them, the newline left out (anything else kept, binary bytes too). What
one read of a stream gives is written at once, as conmon writes it: its lines, then a partial piece.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

STDOUT, STDERR = b"stdout", b"stderr"
_ENTRY = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+00:00) (stdout|stderr) ([FP]) (.*)")


@dataclass(frozen=True)
class Entry:
    time: bytes  # as written: "2026-12-08T04:45:00.123456789+00:00"
    stream: bytes  # STDOUT or STDERR
    complete: bool  # F: the line ended here (a newline was written)
    data: bytes

    def time_ns(self) -> int:
        """The time, in nanoseconds since the epoch."""
        return time_ns(self.time)


def format_time(ns: int) -> bytes:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09d+00:00" % fraction


def time_ns(text: bytes) -> int:
    """The nanoseconds since the epoch of a time as ``format_time`` writes it."""
    seconds = calendar.timegm(time.strptime(text[:19].decode(), "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int(text[20:29])


def encode(stream: bytes, data: bytes, ns: int) -> bytes:
    """The entries of ``data``, read from ``stream`` at ``ns``: one per line, a last piece without its
    newline marked partial."""
    stamp = format_time(ns)
    *lines, rest = data.split(b"\n")
    entries = [b"%s %s F %s\n" % (stamp, stream, line) for line in lines]
    if rest:
        entries.append(b"%s %s P %s\n" % (stamp, stream, rest))
    return b"".join(entries)


def decode(line: bytes) -> Entry:
    """The entry of one line of a log (its newline taken off); ValueError if it is none."""
    found = _ENTRY.fullmatch(line)
    if found is None:
        raise ValueError(f"not a log entry: {line[:60]!r}")
    return Entry(found[1], found[2], found[3] == b"F", found[4])
