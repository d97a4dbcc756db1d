"""A container's terminal (``-t``): a pty of the container's own devpts, so that ``tty`` inside answers
``/dev/pts/0``, relayed by the shim to the caller's terminal.

The pty is opened inside the container (its /dev/ptmx is its devpts instance's), and its master handed
to the shim over a socket pair, as runc hands it over its ``--console-socket``. The container's process
makes the slave its controlling terminal and its standard input, output and error. The shim sizes the
pty as the caller's terminal before the command runs (and again on SIGWINCH), puts the caller's
terminal in raw mode (Ctrl-C is then a byte for the container's terminal to turn into SIGINT, as
under docker) and copies between the two until the container's side is closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import termios
import tty
from collections.abc import Iterator


class Console:
    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()

    def take(self, uid: int, gid: int) -> None:
        """(In the container, root still, before exec.) A new pty, the user's: its master sent to the
        shim, its slave this process's controlling terminal and its 0, 1 and 2."""
        self.ours.close()
        master, slave = os.openpty()
        os.fchown(slave, uid, gid)
        socket.send_fds(self.theirs, [b"m"], [master])
        os.close(master)
        self.theirs.recv(1)  # (the shim has given it its size: the command sees the right one at once)
        self.theirs.close()
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)

    def relay(self, stdin: bool) -> None:
        """(The shim, once the container is forked.) Relay the container's terminal to standard output
        (and standard input to it, with ``stdin``) until the container's side is closed."""
        self.theirs.close()
        with self.ours:
            try:
                _, fds, _, _ = socket.recv_fds(self.ours, 1, 1)
            except OSError:
                fds = []
            if not fds:
                return  # the container failed before it had a terminal (its error says why)
            master = fds[0]
            _copy_size(master)
            previous = signal.signal(signal.SIGWINCH, lambda *_: _copy_size(master))
            self.ours.send(b"k")
        try:
            with _raw(0) if stdin and os.isatty(0) else contextlib.nullcontext():
                _pump(master, stdin)
        finally:
            signal.signal(signal.SIGWINCH, previous)
            os.close(master)


def _copy_size(master: int) -> None:
    """The caller's terminal's window size (standard input's, else output's) given to the pty."""
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)
            return


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump(master: int, stdin: bool) -> None:
    sources = [master, 0] if stdin else [master]
    while True:
        ready, _, _ = select.select(sources, [], [])
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: every slave descriptor is closed, the container has ended
                    raise
                data = b""
            if not data:
                return
            _write_all(1, data)
        if 0 in ready:
            data = os.read(0, 65536)
            if data:
                _write_all(master, data)
            else:
                sources.remove(0)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
