"""Progress of long work (export, commit, import) on a terminal: one line on stderr, redrawn in place."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class Bar:
    """``layerfs: layer 2/3 [#####.....]  52% 130/250 MiB``; a total of None shows the bytes only."""

    def __init__(self) -> None:
        self._shown: tuple | None = None

    def __call__(self, done: int, total: int | None, label: str = "") -> None:
        prefix = f"layerfs: {label} " if label else "layerfs: "
        if total:
            percent = min(100, 100 * done // total)
            shown = (label, percent)
            line = (
                f"{prefix}[{'#' * (percent // 5)}{'.' * (20 - percent // 5)}] {percent:3d}% "
                f"{done >> 20}/{total >> 20} MiB"
            )
        else:
            shown = (label, done >> 20)
            line = f"{prefix}{done >> 20} MiB"
        if shown != self._shown:
            self._shown = shown
            sys.stderr.write(f"\r{line}\033[K")
            sys.stderr.flush()

    def done(self) -> None:
        if self._shown is not None:
            sys.stderr.write("\n")


@contextlib.contextmanager
def on_terminal() -> Iterator[Bar | None]:
    """A Bar when stderr is a terminal, else None (nothing drawn into logs or pipes)."""
    bar = Bar() if sys.stderr.isatty() else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.done()
