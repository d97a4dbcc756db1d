"""Where a store lives and its one lock: the root directory (``--root``, else ``$LAYERFS_ROOT``, else
/var/lib/layerfs for root and ``$XDG_DATA_HOME/layerfs`` for a plain user, ``userdirs.py``), the lock
every change to the store is made under, and the scratch space where new things are built before they
get their names.

Only one command changes the store at a time; readers need no lock, since every change is a rename. All
work in the scratch space is done holding the lock, so what the next holder finds there is what an
interrupted command left: it goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator

from .. import userdirs


def root_from(option: str | None) -> str:
    """The store's root: ``--root``, else ``$LAYERFS_ROOT``, else the user's data directory."""
    return option or os.environ.get("LAYERFS_ROOT") or userdirs.data_dir()


class Root:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        for sub in ("layers", "content", "tmp"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def __str__(self) -> str:
        return self.path

    def sub(self, *names: str) -> str:
        """A path in the store."""
        return os.path.join(self.path, *names)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (not reentrant: one holder per command), the scratch space cleared."""
        with open(self.sub("lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name in os.listdir(self.sub("tmp")):
                shutil.rmtree(self.sub("tmp", name), ignore_errors=True)
            yield

    def scratch(self) -> str:
        """(Holding the lock.) A fresh name in the scratch space."""
        return self.sub("tmp", os.urandom(16).hex())

    def discard(self, path: str) -> None:
        """(Holding the lock.) Remove the tree at ``path``: its name at once, its files next."""
        doomed = self.scratch()
        os.rename(path, doomed)
        shutil.rmtree(doomed)
