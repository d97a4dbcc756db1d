"""``--init``: a minimal init as the container's PID 1, in the manner of tini (docker's ``--init``).

PID 1 of a PID namespace gets no signal it has no handler for, so a command that installs none (a
``sleep``) ignores ``layerfs stop`` and Ctrl-C when it is PID 1. Under ``--init`` the container's PID 1
is this code instead (in the layerfs process that set the container up, before its exec): it forks the
command, passes every signal it is sent on to it, reaps whatever ends in the container (orphans are
given to PID 1) and exits as the command did.
"""

from __future__ import annotations

import os
import signal

# Every signal init can take (SIGKILL and SIGSTOP cannot be caught, nor blocked).
_CAUGHT = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def exit_code(status: int) -> int:
    """A wait status as a shell's exit code: 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def fork_under_init() -> None:
    """Returns in a child, which goes on to exec the command; this process stays as its init, and exits
    with its exit code once it has ended."""
    # Blocked signals are queued for sigwaitinfo, even to a PID 1 with no handler for them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _CAUGHT)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        return
    while True:
        signum = signal.sigwaitinfo(_CAUGHT).si_signo
        if signum != signal.SIGCHLD:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass
            continue
        for pid, status in _reaped():
            if pid == child:
                os._exit(exit_code(status))


def _reaped() -> list[tuple[int, int]]:
    """The children that have ended, reaped."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))
