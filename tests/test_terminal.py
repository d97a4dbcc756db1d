"""``-i`` and ``-t``: standard input only when asked for, and a terminal of the container's own (its
devpts), sized as the caller's, Ctrl-C reaching the command. The caller's terminal is a pty the test
makes, its size set with TIOCSWINSZ; the test types into its master and reads what the container wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios

import pytest
import test_lifecycle
from conftest import LAYERFS, layerfs

pytestmark = pytest.mark.root
images = test_lifecycle.images  # (the fixture: a busybox image, in a store of this module's own)


class Terminal:
    """A pty as the caller's terminal: ``layerfs ARGS`` runs with its slave as standard input, output and
    error; the test reads and types at its master."""

    def __init__(self, rows: int, columns: int, *args: str | os.PathLike) -> None:
        self.master, slave = pty.openpty()
        self.resize(rows, columns)
        self.process = subprocess.Popen(LAYERFS + [*map(str, args)], stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def read_until(self, text: bytes) -> bytes:
        while text not in self.seen:
            chunk = self._read()
            assert chunk, f"the terminal closed before {text!r}; it showed {self.seen!r}"
            self.seen += chunk
        return self.seen

    def _read(self) -> bytes:
        try:
            return os.read(self.master, 4096)
        except OSError as e:
            if e.errno != errno.EIO:  # (EIO: no one has the slave open any more)
                raise
            return b""

    def finish(self) -> tuple[int, bytes]:
        """The exit code, and all the terminal showed."""
        code = self.process.wait(timeout=60)
        while chunk := self._read():
            self.seen += chunk
        return code, self.seen

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@contextlib.contextmanager
def _terminal(rows: int, columns: int, *args: str | os.PathLike):
    terminal = Terminal(rows, columns, *args)
    try:
        yield terminal
    finally:
        terminal.close()


def test_the_container_has_a_terminal_of_its_own_sized_as_the_callers(images):
    store = images[0]
    script = "tty; stty size; echo ready; read line; stty size"
    with _terminal(33, 101, "run", "--root", store, "--rm", "-it", "box:usr1", "sh", "-c", script) as terminal:
        assert terminal.read_until(b"ready\r\n") == b"/dev/pts/0\r\n33 101\r\nready\r\n"
        terminal.resize(40, 120)
        os.kill(terminal.process.pid, signal.SIGWINCH)  # (as the kernel sends it to the terminal's foreground)
        os.write(terminal.master, b"go\r")
        code, shown = terminal.finish()
    assert code == 0
    assert shown.endswith(b"go\r\n40 120\r\n")  # (what was typed, echoed by the container's terminal)


def test_ctrl_c_reaches_the_command(images):
    store = images[0]
    args = ("run", "--root", store, "--rm", "-it", "--init", "box:usr1", "sh", "-c", "echo ready; exec sleep 100")
    with _terminal(24, 80, *args) as terminal:
        terminal.read_until(b"ready\r\n")
        os.write(terminal.master, b"\x03")
        code, shown = terminal.finish()
    assert code == 128 + signal.SIGINT, shown


def test_exec_has_a_terminal_of_the_containers_devpts(images):
    store = images[0]
    layerfs("run", "--root", store, "-d", "--name", "tty-exec", "box:usr1", "sleep", "100")
    try:
        args = ("exec", "--root", store, "-it", "tty-exec", "sh", "-c", "tty; stty size; ls /dev/pts")
        with _terminal(12, 34, *args) as terminal:
            code, shown = terminal.finish()
        assert code == 0 and shown == b"/dev/pts/0\r\n12 34\r\n0     ptmx\r\n", shown
    finally:
        layerfs("rm", "--root", store, "-f", "tty-exec")


def test_standard_input_only_with_i(images):
    store = images[0]
    for flags, expected in (([], ""), (["-i"], "typed\n")):
        result = layerfs("run", "--root", store, "--rm", *flags, "box:usr1", "cat", input="typed\n")
        assert result.stdout == expected
    # no terminal without -t, as under docker
    result = layerfs("run", "--root", store, "--rm", "box:usr1", "tty", check=False)
    assert (result.returncode, result.stdout) == (1, "not a tty\n")
