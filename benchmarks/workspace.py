"""A run's scratch space: a journaled ext4 loop image holding copies of the layers, and every mount.

The machine's root filesystem is ext4 without a journal, where file creation slows down 10-15x after mass
deletions; so each run makes its own journaled image (sparse, 8 GiB), copies the cached layers into it,
mounts everything inside it, and removes it all at the end. ``close()`` unmounts whatever is still
mounted (lazily if busy) even after errors or Ctrl-C, and a new run first cleans up after runs whose
process is gone.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import layers, podman
from .data import LAYER_NAMES, Data
from .impls import Impl
from .util import log, mounted_points, remove_mounted_tree, remove_tree, run, umount

RUNS = Path(os.environ.get("LAYERFS_BENCH_RUNS", "/var/tmp/layerfs-bench"))


@dataclass
class Mount:
    impl: Impl
    tag: str
    root: Path  # where workloads run
    base: Path | None = None  # holds upper/, work/ and mnt/ (None for native)
    pid: int | None = None  # the FUSE daemon

    @property
    def upper(self) -> Path | None:
        return None if self.base is None else self.base / "upper"


class Workspace:
    def __init__(self, data: Data, *, native: bool = True, flat: bool = True, size: str = "8G") -> None:
        self.data = data
        self.want_native = native
        self.want_flat = flat
        self.size = size
        self.dir = RUNS / f"run-{os.getpid()}"
        self.fs = self.dir / "fs"
        self.mounts: list[Mount] = []
        self._image_mounted = False
        self._serial = 0

    # -- life cycle

    def __enter__(self) -> Workspace:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        clean_stale()
        self.dir.mkdir(parents=True)
        image = self.dir / "ext4.img"
        run(["truncate", "-s", self.size, str(image)])
        # Inode tables and journal zeroed now, not by a kernel thread in the background during the first passes.
        run(["mkfs.ext4", "-q", "-F", "-O", "has_journal", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)])
        self.fs.mkdir()
        run(["mount", "-o", "loop", str(image), str(self.fs)])
        self._image_mounted = True
        log("copying the layers into a fresh journaled ext4 image")
        (self.fs / "layers").mkdir()
        for name in LAYER_NAMES:
            run(["cp", "-a", str(self.data.root / name), str(self.fs / "layers" / name)])
        if self.want_flat:
            layers.flatten(self.lowers, self.fs / "flat")
        if self.want_native:
            # The merged tree again, from hard links to the layers' files (so native reads the very same
            # inodes), except the one existing file a workload writes into (copyup), a real copy. Every
            # other write makes new names or removes names, which a hard-linked tree keeps to itself.
            layers.flatten(self.lowers, self.fs / "native")
            written = self.fs / "native" / self.data.manifest["big"]["big-100M"]
            run(["cp", "-a", str(written), f"{written}.copy"])
            os.rename(f"{written}.copy", written)
        (self.fs / "m").mkdir()
        os.sync()

    def close(self) -> None:
        """Unmount everything and remove the image; safe to call twice, deaf to a second Ctrl-C."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for m in reversed(list(self.mounts)):
                try:
                    self.unmount(m)
                except Exception as e:  # (keep unmounting the rest)
                    log(f"unmounting {m.root}: {e}")
            if self._image_mounted:
                umount(str(self.fs))
                self._image_mounted = False
            remove_tree(self.dir)
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- layers and mounts

    @property
    def lowers(self) -> list[Path]:
        return [self.fs / "layers" / name for name in LAYER_NAMES]

    def lowers_for(self, impl: Impl) -> list[Path]:
        return [self.fs / "flat"] if impl.flat else self.lowers

    def mount(self, impl: Impl, tag: str) -> Mount:
        """Mount ``impl`` with a fresh, empty upper layer; native gets its plain directory."""
        if impl.kind == "native":
            return Mount(impl, tag, self.fs / "native")
        self._serial += 1
        base = self.fs / "m" / f"{impl.name}-{tag}-{self._serial}"
        for sub in ("upper", "work", "mnt"):
            (base / sub).mkdir(parents=True)
        m = Mount(impl, tag, base / "mnt", base)
        run(impl.command(self.lowers_for(impl), base / "upper", base / "work", m.root), timeout=120)
        self.mounts.append(m)
        if str(m.root) not in mounted_points():
            raise RuntimeError(f"{impl.name}: mount command succeeded but nothing is mounted at {m.root}")
        if impl.kind == "fuse":
            m.pid = _daemon_of(m.root)
        return m

    def unmount(self, m: Mount) -> None:
        """Unmount and delete the mount's upper layer."""
        if m.base is None:
            return
        if m in self.mounts:
            self.mounts.remove(m)
        umount(str(m.root))
        if m.pid is not None:
            _wait_gone(m.pid)
        remove_tree(m.base)

    def replace(self, m: Mount) -> Mount:
        """A broken mount (its daemon died or was stopped) swapped for a fresh one."""
        self.unmount(m)
        return self.mount(m.impl, m.tag)


def _daemon_of(mnt: Path) -> int | None:
    """The pid of the FUSE daemon serving ``mnt``: the process whose arguments end with it."""
    want = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args:
            return int(entry)
    return None


def _alive(pid: int) -> bool:
    """Running, not a zombie (the daemons are reparented to this machine's init, which reaps lazily)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)  # our own daemon, unmounted, that did not exit
    except ProcessLookupError:
        pass


def rss_kib(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in KiB, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def stop_daemon(m: Mount) -> None:
    """Kill a hung FUSE daemon: the kernel then fails its pending requests (ENOTCONN)."""
    if m.pid is not None:
        try:
            os.kill(m.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def clean_stale() -> None:
    """Unmount and remove what runs that no longer exist left behind (killed with SIGKILL, say): their
    workspaces and podman-build's storages, both named after the run's pid."""
    for d in [*RUNS.glob("run-*"), *podman.HOMES.glob(podman.PREFIX + "*")]:
        pid = d.name.rpartition("-")[2]
        if not pid.isdigit() or (int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}")):
            continue
        log(f"removing the leftovers of an old run: {d}")
        if d.name.startswith(podman.PREFIX):
            podman.remove(d)
        else:
            remove_mounted_tree(d)
