"""Transfers a few at a time: the first failure (or an interrupt) stops the rest, and every one has finished,
its temporary files gone, before the failure is raised; their bytes counted for one progress display."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

Progress = Callable[[int, int | None, str], None]  # done, total, label: what progress.Bar takes
T = TypeVar("T")


class Stopped(Exception):
    """A transfer given up because another one failed or the user interrupted."""


def in_parallel(tasks: list[Callable[[threading.Event], T]], jobs: int) -> list[T]:
    """Each task's result, in order; a task is handed the event that says it should stop (raising Stopped)."""
    stop = threading.Event()
    executor = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [executor.submit(task, stop) for task in tasks]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in finished:
            error = future.exception()
            if error is not None and not isinstance(error, Stopped):
                raise error
        return [future.result() for future in futures]
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)


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
