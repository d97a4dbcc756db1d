"""containerd's snapshotters side by side: ``ctr images import`` (the image's layers unpacked) and ``ctr run
--rm`` (a container started and gone) with layerfs as a proxy snapshotter (serving its unions itself, and
``layerfs-helper``: with --mount-helper, containerd mounting them through mount.fuse3), containerd's
``overlayfs`` and its ``native`` (plain copies), in one run, interleaved, ``--reps`` times; then a
container's file workloads (``ctr run --rm`` of each) on layerfs's snapshot against overlayfs's. Prints a
table of medians (min..max) with layerfs's ratio to overlayfs, and the goals (unpack and start at most 1.5x
overlayfs).

A containerd and a layerfs snapshotter of the run's own, on sockets under a temporary directory (never the
machine's). The image: the benchmarks' debootstrap'd Debian root (importbench's tar), or ``--rootfs TAR``,
made one layer of a docker archive by ``layerfs import`` and ``layerfs save``, untimed. Before each import
the image is removed with its snapshots and content (``ctr images rm --sync``), ``sync`` and a pause.

    .venv/bin/python -m benchmarks.containerdbench [--reps 5] [--rootfs TAR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import data
from .containerd import Containerd, Snapshotterd, layerfs_on_path
from .importbench import rootfs_tar
from .util import log, remove_mounted_tree, run

SNAPSHOTTERS = ("layerfs", "layerfs-helper", "overlayfs", "native")
GOAL = 1.5  # layerfs / overlayfs, for unpack and start
STARTS = 3  # ctr run --rm of /bin/true per repetition
# (the tools are busybox's as much as GNU's; each ends well where the image lacks the paths)
WORKLOADS = {
    "find / (stat every entry)": "find / -xdev > /dev/null",
    "tar /usr (read every file)": "tar -cf - /usr 2>/dev/null | wc -c > /dev/null",
    "write 2,000 new files": "mkdir /w && i=0 && while [ $i -lt 2000 ]; do echo $i > /w/f$i; i=$((i+1)); done",
    "append to /usr/share/doc (copy-up)": (
        "find /usr/share/doc -type f -exec sh -c 'for f; do echo >> \"$f\"; done' sh {} + 2>/dev/null; true"
    ),
}


def docker_archive(rootfs: Path, work: Path) -> Path:
    """``rootfs`` as the one layer of a docker archive of the image ``bench:1``."""
    layerfs = [sys.executable, "-m", "layerfs"]
    store, archive = work / "store", work / "image.tar"
    run([*layerfs, "import", "--root", str(store), f"rootfs:{rootfs}", "bench:1"])
    run([*layerfs, "save", "--root", str(store), "-o", str(archive), "bench:1"])
    remove_mounted_tree(store)
    return archive


def _timed(daemon: Containerd, *args: str | Path) -> float:
    start = time.monotonic()
    daemon.ctr(*args)
    return time.monotonic() - start


def measure(daemon: Containerd, archive: Path, reps: int, pause: float) -> dict[str, dict[str, list[float]]]:
    """Samples in seconds, by measurement and snapshotter."""
    samples: dict[str, dict[str, list[float]]] = {}

    def add(what: str, snapshotter: str, took: float) -> None:
        samples.setdefault(what, {}).setdefault(snapshotter, []).append(took)

    image = None
    for rep in range(reps):
        for snapshotter in SNAPSHOTTERS:
            if image is not None:
                daemon.ctr("images", "rm", "--sync", image)
            os.sync()
            time.sleep(pause)
            add(
                "import (unpack)",
                snapshotter,
                _timed(daemon, "images", "import", "--snapshotter", snapshotter, archive),
            )
            image = image or daemon.ctr("images", "ls", "-q").stdout.split()[0]
            for n in range(STARTS):
                run_true = ("run", "--rm", "--snapshotter", snapshotter, image, f"c{n}", "true")
                add("run --rm true (start)", snapshotter, _timed(daemon, *run_true))
            if snapshotter in ("layerfs", "overlayfs"):  # (the file workloads: layerfs's against overlayfs's)
                for n, (what, script) in enumerate(WORKLOADS.items()):
                    run_script = ("run", "--rm", "--snapshotter", snapshotter, image, f"w{n}", "sh", "-c", script)
                    add(f"run --rm: {what}", snapshotter, _timed(daemon, *run_script))
        print(f"rep {rep + 1} of {reps} done", flush=True)
    return samples


def table(samples: dict[str, dict[str, list[float]]]) -> str:
    def cell(times: list[float] | None) -> str:
        if not times:
            return "-"
        return f"{statistics.median(times):.2f} s ({min(times):.2f}..{max(times):.2f})"

    lines = [
        "| " + " | ".join(["", *SNAPSHOTTERS, "layerfs / overlayfs"]) + " |",
        "|" + "---|" * (len(SNAPSHOTTERS) + 2),
    ]
    for what, by in samples.items():
        ratio = statistics.median(by["layerfs"]) / statistics.median(by["overlayfs"])
        lines.append("| " + " | ".join([what, *(cell(by.get(s)) for s in SNAPSHOTTERS), f"{ratio:.2f}x"]) + " |")
    return "\n".join(lines)


def goals(samples: dict[str, dict[str, list[float]]]) -> list[str]:
    checked = []
    for what in ("import (unpack)", "run --rm true (start)"):
        ratio = statistics.median(samples[what]["layerfs"]) / statistics.median(samples[what]["overlayfs"])
        verdict = "met" if ratio <= GOAL else "NOT met"
        checked.append(f"goal {what} <= {GOAL}x overlayfs: {ratio:.2f}x, {verdict}")
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rootfs", type=Path, help="a root filesystem tar (default: the Debian one)")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds of quiet before each import")
    args = parser.parse_args()
    rootfs = args.rootfs or rootfs_tar(data.DEFAULT_CACHE)
    # (short: containerd's sockets are unix sockets, at most 108 bytes)
    base = Path(tempfile.mkdtemp(prefix="ctrbench-", dir="/tmp"))
    try:
        archive = docker_archive(rootfs, base)
        log(f"{rootfs}: {archive.stat().st_size >> 20} MiB as a docker archive; load {os.getloadavg()[0]:.2f}")
        snapshotters = {
            "layerfs": Snapshotterd(base / "layerfs"),
            "layerfs-helper": Snapshotterd(base / "layerfs-helper", mount_helper=True),
        }
        try:
            daemon = Containerd(base, snapshotters, layerfs_on_path(base / "bin"))
            try:
                samples = measure(daemon, archive, args.reps, args.pause)
                races = daemon.helper_races
            finally:
                daemon.stop()
        finally:
            for snapshotter in snapshotters.values():
                snapshotter.stop()
    finally:
        remove_mounted_tree(base)
        shutil.rmtree(base, ignore_errors=True)
    print(table(samples))
    print("\n".join(goals(samples)))
    if races:
        print(f"{races} runs (layerfs-helper's) failed by containerd's mount helper race and were run again")


if __name__ == "__main__":
    main()
