"""Transfers a few at a time: the first failure stops the rest, and every one has finished, its temporary
files gone, before the failure is raised; their bytes counted for one progress display.

An interrupt (Ctrl-C) does not wait for them: a transfer stuck in a stalled registry's read would keep it
waiting for the client's timeout. The transfers are told to stop and given a moment to; one still stuck is
left behind in its daemon thread, which does not hold up the exit, and the caller's clean-up removes what
it was writing (a pull writes only in the store's scratch space).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

Progress = Callable[[int, int | None, str], None]  # done, total, label: what progress.Bar takes
T = TypeVar("T")
_GRACE = 0.5  # seconds the transfers get to stop after an interrupt


class Stopped(Exception):
    """A transfer given up because another one failed or the user interrupted."""


def in_parallel(tasks: list[Callable[[threading.Event], T]], jobs: int) -> list[T]:
    """Each task's result, in order; a task is handed the event that says it should stop (raising Stopped)."""
    stop = threading.Event()
    results: list[T | None] = [None] * len(tasks)
    errors: list[BaseException] = []
    pending = iter(enumerate(tasks))
    lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                results[item[0]] = item[1](stop)
            except BaseException as e:
                with lock:
                    errors.append(e)
                stop.set()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(jobs, len(tasks)))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # KeyboardInterrupt
        stop.set()
        deadline = time.monotonic() + _GRACE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise
    for error in errors:
        if not isinstance(error, Stopped):
            raise error
    return cast(list[T], results)  # (every task has given its result)


class Counter:
    """Bytes moved by several threads, told to ``progress`` as one total."""

    def __init__(self, progress: Progress | None, total: int, label: str) -> None:
        self._progress, self._total, self._label = progress, total, label
        self._done = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._done += n
            if self._progress is not None:
                self._progress(self._done, self._total, self._label)
