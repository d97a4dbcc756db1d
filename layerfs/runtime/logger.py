"""A detached container's log writer: a process of its own that reads the shim's standard output and
error (which the container inherits) from two pipes and appends what it reads to the container's log
(logformat.py), as conmon does for podman.

A process rather than a thread: the shim forks the container and the mount's daemon, which a thread
would make unsafe. It reads until both pipes are closed by every writer (the shim and every process of
the container), so nothing is lost when the container writes fast or ends at once; the shim waits for
it before it ends (``finish``), so a container's log is whole once its shim is gone. A ``-t``
container's output is the terminal's, relayed by the shim to its standard output: one stream, stdout,
as under docker.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import time

from .logformat import STDERR, STDOUT, encode


def start(path: str) -> int:
    """Fork the writer of the log ``path``; this process's standard output and error are then its pipes
    (standard input /dev/null). Returns the writer's pid, for ``finish``."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            keep = sorted({out_read, err_read, log})
            for low, high in itertools.pairwise([-1, *keep, os.sysconf("SC_OPEN_MAX")]):
                os.closerange(low + 1, high)
            _copy({out_read: STDOUT, err_read: STDERR}, log)
            code = 0
        finally:
            os._exit(code)
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, to in ((devnull, 0), (out_write, 1), (err_write, 2)):
        os.dup2(fd, to)
    for fd in (out_read, out_write, err_read, err_write, log, devnull):
        os.close(fd)
    return pid


def finish(pid: int) -> None:
    """(The shim, at its end.) Close its ends of the pipes and wait until the writer has written all."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _copy(streams: dict[int, bytes], log: int) -> None:
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                entries = encode(streams[key.fd], data, time.time_ns())
                while entries:
                    entries = entries[os.write(log, entries) :]
