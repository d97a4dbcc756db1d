"""The snapshotter: containerd's snapshot operations on a root of snapshot directories and their records.

``ROOT/snapshots/ID/fs`` is a snapshot's own layer and ``ROOT/snapshots/ID/work`` its work directory,
as containerd's overlay snapshotter lays them out, and ``ROOT/snapshots/ID/mnt`` the union the snapshotter
serves there (daemons.py) unless containerd is to mount it (``helper_mounts``); ``ROOT/metadata.db`` holds
the records. A new
snapshot's directory is built under a scratch name and renamed to its id inside the transaction that
records it; a removed one loses its record first and its directory after. Whatever a crash leaves is a
directory no record names, removed when the snapshotter opens and by Cleanup.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable

from ..errors import LayerfsError
from .daemons import Mounter, serving, stop
from .metadata import FailedPrecondition, InvalidArgument, Metadata, Snapshot, now_ns
from .mounts import TYPE, UNPACK_PREFIX, Mount, mounts
from .usage import Usage, index_for_commit, usage

MAX_LABEL = 4096  # containerd's limit on a label's key and value together, in bytes
_SCRATCH = "new-"
_DAEMON_EXIT_S = 5  # a daemon saves nothing at its end (its journal has it all); one in use ends later


def check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label {key[:64]!r}: key and value over {MAX_LABEL} bytes")


class Snapshotter:
    """One root's snapshots; every method may be called from any thread (one runs at a time). Unless
    ``helper_mounts``, its unions are served by daemons it starts (daemons.py)."""

    def __init__(self, root: str, *, helper_mounts: bool = False) -> None:
        self.root = os.path.abspath(root)
        self._snapshots = os.path.join(self.root, "snapshots")
        os.makedirs(self._snapshots, mode=0o700, exist_ok=True)
        # held while this snapshotter lives: a second one on the root would remove the first's new snapshots
        self._lock_file = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_file)
            raise LayerfsError(f"{self.root}: another snapshotter serves this root") from None
        self._records = Metadata(os.path.join(self.root, "metadata.db"))
        self._lock = threading.Lock()
        self.cleanup()
        self._mounter = None if helper_mounts else Mounter()

    def close(self) -> None:
        """The snapshotter's own ends; its daemons serve on (containers run on them)."""
        if self._mounter is not None:
            self._mounter.close()
        self._records.close()
        os.close(self._lock_file)

    def _directory(self, snapshot: Snapshot) -> str:
        return os.path.join(self._snapshots, str(snapshot.id))

    def _fs(self, snapshot: Snapshot) -> str:
        return os.path.join(self._directory(snapshot), "fs")

    def _work(self, snapshot: Snapshot) -> str:
        return os.path.join(self._directory(snapshot), "work")

    @staticmethod
    def _mountpoint(directory: str) -> str:
        return os.path.join(directory, "mnt")

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create("active", key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create("view", key, parent, labels)

    def _create(self, kind: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if not key:
            raise InvalidArgument("a snapshot needs a key")
        check_labels(labels)
        with self._lock:
            scratch = tempfile.mkdtemp(prefix=_SCRATCH, dir=self._snapshots)
            try:
                fs = os.path.join(scratch, "fs")
                os.mkdir(fs)
                os.chmod(fs, 0o755)  # (whatever the umask: a container's root is 0755)
                os.mkdir(os.path.join(scratch, "work"), 0o700)
                with self._records.transaction() as records:
                    if parent:
                        below = records.get(parent)
                        if below.kind != "committed":
                            raise InvalidArgument(f"parent {parent}: not a committed snapshot")
                        st = os.stat(self._fs(below))
                        os.chown(fs, st.st_uid, st.st_gid)  # (a user-namespaced image's root stays its own)
                    snapshot = records.add(key, parent, kind, labels)
                    os.rename(scratch, self._directory(snapshot))
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            try:
                return self._mounts(snapshot)
            except BaseException:
                self._remove(snapshot)
                raise

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            return self._mounts(self._records.get(key))

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        lowers = [self._fs(parent) for parent in self._records.chain(snapshot)]
        # (containerd's metadata store names a snapshot NAMESPACE/NUMBER/KEY to the snapshotter)
        unpacking = snapshot.kind == "active" and snapshot.key.split("/", 2)[-1].startswith(UNPACK_PREFIX)
        found = mounts(snapshot.kind, self._fs(snapshot), self._work(snapshot), lowers, unpacking=unpacking)
        if self._mounter is None or found[0].type != TYPE:
            return found
        # A union: served here (again, after a reboot or a killed daemon), handed out as a bind mount.
        mountpoint = self._mountpoint(self._directory(snapshot))
        if not serving(mountpoint):
            stop(mountpoint, 0)  # (a dead daemon's mount)
            os.makedirs(mountpoint, mode=0o755, exist_ok=True)
            self._mounter.mount(",".join(found[0].options), mountpoint)
        return [Mount("bind", mountpoint, ["ro" if snapshot.kind == "view" else "rw", "rbind"])]

    def _stop_daemon(self, directory: str) -> None:
        """The daemon of a snapshot that is committed or removed ends (once no container uses it)."""
        stop(self._mountpoint(directory), _DAEMON_EXIT_S)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise InvalidArgument("a committed snapshot needs a name")
        check_labels(labels)
        with self._lock, self._records.transaction() as records:
            snapshot = records.get(key)
            if snapshot.kind != "active":
                raise FailedPrecondition(f"snapshot {key}: not active")
            self._stop_daemon(self._directory(snapshot))
            size, inodes = index_for_commit(self._fs(snapshot), self._work(snapshot))
            stamp = now_ns()
            snapshot.key, snapshot.kind, snapshot.labels = name, "committed", labels
            snapshot.created_ns = snapshot.updated_ns = stamp
            snapshot.size, snapshot.inodes = size, inodes
            records.save(snapshot, old_key=key)

    def remove(self, key: str) -> None:
        with self._lock:
            with self._records.transaction() as records:
                snapshot = records.get(key)
                if records.has_children(key):
                    raise FailedPrecondition(f"snapshot {key}: has children (remove them first)")
                records.remove(key)
            self._remove_directory(self._directory(snapshot))

    def _remove(self, snapshot: Snapshot) -> None:
        with self._records.transaction() as records:
            records.remove(snapshot.key)
        self._remove_directory(self._directory(snapshot))

    def _remove_directory(self, directory: str) -> None:
        self._stop_daemon(directory)
        if os.path.ismount(self._mountpoint(directory)):  # (never a removal through a union into its layers)
            raise LayerfsError(f"{self._mountpoint(directory)}: still mounted")
        shutil.rmtree(directory, ignore_errors=True)

    def stat(self, key: str) -> Snapshot:
        with self._lock:
            return self._records.get(key)

    def update(self, key: str, labels: dict[str, str], paths: Iterable[str]) -> Snapshot:
        """Labels changed as containerd's Update: ``labels`` replaces them all, ``labels.KEY`` sets one (an
        empty value removes it), no paths at all replaces them all; other fields are immutable."""
        paths = list(paths) or ["labels"]
        with self._lock, self._records.transaction() as records:
            snapshot = records.get(key)
            updated = dict(snapshot.labels)
            for path in paths:
                if path == "labels":
                    updated = dict(labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    updated[label] = labels.get(label, "")
                else:
                    raise InvalidArgument(f"snapshot {key}: field {path!r} cannot be updated")
            snapshot.labels = {k: v for k, v in updated.items() if v}
            check_labels(snapshot.labels)
            snapshot.updated_ns = now_ns()
            records.save(snapshot)
            return snapshot

    def list(self, selected: Callable[[Snapshot], bool]) -> list[Snapshot]:
        with self._lock:
            return [snapshot for snapshot in self._records.all() if selected(snapshot)]

    def usage(self, key: str) -> Usage:
        with self._lock:
            snapshot = self._records.get(key)
            if snapshot.kind == "active":
                return usage(self._fs(snapshot), self._work(snapshot))
            return Usage(snapshot.size, snapshot.inodes)

    def cleanup(self) -> None:
        """Remove the directories no record names: removed snapshots', and what a crash left half-made."""
        with self._lock:
            kept = {str(i) for i in self._records.ids()}
            for name in os.listdir(self._snapshots):
                if name not in kept:
                    self._remove_directory(os.path.join(self._snapshots, name))
