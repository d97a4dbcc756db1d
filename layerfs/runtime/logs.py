"""``layerfs logs``: what a detached container wrote (its log, logformat.py) shown as ``docker logs``
shows it: standard output's lines on standard output, standard error's on standard error, each in the
order written, a partial last line as it is (no newline added); ``-t`` each line after its time,
``--tail N`` the last N lines to end, ``--since``/``--until`` the lines begun from/up to a time (docker's
order: the tail first, then the times), ``-f`` what it writes next too, until it ends."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from .. import durations
from ..errors import LayerfsError, UsageError
from ..store import Store
from . import lifecycle, logformat, state

_DATE = re.compile(r"(\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d)?)?)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?")
_FOLLOW_POLL_S = 0.1


@dataclass(frozen=True)
class Options:
    timestamps: bool = False
    tail: int | None = None  # None: every line
    since: int | None = None  # nanoseconds since the epoch
    until: int | None = None
    follow: bool = False


def parse_lines(text: str) -> int | None:
    """``--tail``'s N: a number of lines, or None for every line (``all``, or a negative number, as docker)."""
    try:
        count = int(text)
    except ValueError:
        if text == "all":
            return None
        raise UsageError(f"--tail {text}: not a number of lines (or all)") from None
    return None if count < 0 else count


def parse_time(text: str, flag: str, now_ns: int | None = None) -> int:
    """A time as docker's --since and --until take it, in nanoseconds since the epoch: an RFC 3339 date
    and time (local time without a zone), a Unix time (``1733633100.5``) or a duration before now
    (``10m``, ``1h30m``)."""
    now = time.time_ns() if now_ns is None else now_ns
    before = durations.nanoseconds(text)
    if before is not None:
        return now - before
    if re.fullmatch(r"\d+(\.\d{1,9})?", text):
        whole, _, fraction = text.partition(".")
        return int(whole) * 10**9 + int(fraction.ljust(9, "0") or 0)
    found = _DATE.fullmatch(text)
    if found is not None:
        zone = (found[3] or "").replace("Z", "+00:00")
        try:
            when = datetime.fromisoformat(found[1] + zone)
        except ValueError:
            when = None
        if when is not None:
            # (naive: local time, as docker takes it)
            return int(when.timestamp()) * 10**9 + int((found[2] or "").ljust(9, "0") or 0)
    raise UsageError(f"{flag} {text}: not a time (2026-12-08T04:45:00Z, a Unix time, or a duration such as 10m)")


def show(store: Store, name: str, options: Options, out: BinaryIO, err: BinaryIO) -> None:
    """Write container ``name``'s log to ``out`` and ``err`` as ``options`` say."""
    name, _ = lifecycle.status(store, name)
    try:
        log = open(state.log_path(store.containers.dir(name)), "rb")  # noqa: SIM115 (read as it grows)
    except FileNotFoundError:
        return
    with log:
        reader = _Reader(log)
        writer = _Writer(options, {logformat.STDOUT: out, logformat.STDERR: err})
        for entry in _last_lines(reader.entries(), options.tail):
            writer.write(entry)
        while options.follow and state.shim_alive(state.of(store.containers.get(name) or {})):
            time.sleep(_FOLLOW_POLL_S)
            for entry in reader.entries():
                writer.write(entry)
        if options.follow:  # (the shim ends once its log is written: what is there now is all)
            for entry in reader.entries():
                writer.write(entry)


class _Reader:
    """The entries of a log as it grows (a line being written is left for the next call)."""

    def __init__(self, log: BinaryIO) -> None:
        self._log = log
        self._pending = b""

    def entries(self) -> list[logformat.Entry]:
        self._pending += self._log.read()
        *lines, self._pending = self._pending.split(b"\n")
        try:
            return [logformat.decode(line) for line in lines]
        except ValueError as e:
            raise LayerfsError(f"{self._log.name}: {e}") from None


def _last_lines(entries: list[logformat.Entry], count: int | None) -> list[logformat.Entry]:
    """The entries of the last ``count`` lines (a line: the pieces of a stream up to a complete one, or
    to the end), counted back from the end of the log as lines ended."""
    if count is None:
        return entries
    lines, begun = [], {logformat.STDOUT: 0, logformat.STDERR: 0}
    for entry in entries:
        lines.append((entry.stream, begun[entry.stream]))
        begun[entry.stream] += entry.complete
    kept = set(list(dict.fromkeys(reversed(lines)))[:count])
    return [entry for entry, line in zip(entries, lines, strict=True) if line in kept]


class _Writer:
    """Entries written out, each stream to its file, a line shown or not as its first piece's time says."""

    def __init__(self, options: Options, files: dict[bytes, BinaryIO]) -> None:
        self._options = options
        self._files = files
        self._line_begins = dict.fromkeys(files, True)
        self._showing = dict.fromkeys(files, True)

    def write(self, entry: logformat.Entry) -> None:
        stream, options = entry.stream, self._options
        begins = self._line_begins[stream]
        if begins:
            when = entry.time_ns()
            self._showing[stream] = (options.since is None or when >= options.since) and (
                options.until is None or when <= options.until
            )
        self._line_begins[stream] = entry.complete
        if not self._showing[stream]:
            return
        file = self._files[stream]
        stamp = entry.time + b" " if begins and options.timestamps else b""
        file.write(stamp + entry.data + (b"\n" if entry.complete else b""))
        file.flush()
