"""How long ``layerfs import`` of a root filesystem tar takes against ``tar -x`` + ``sync`` of the same tar:
in the same run, interleaved, ``--reps`` times, each into a directory of its own after ``sync`` and a pause
(interleaving puts both under the same weather). Prints each pair and the ratio of the medians.

No tree is removed before the last run: ext4 gives a new file no inode freed in the last minute (five while
its inode table block is dirty), and looks at each such inode on the way to a free one. A tree of 14,000
files removed before a run made each of its creates look at thousands (``perf``: 80% of ``tar -x``'s time
in ext4's ``recently_deleted``; its system time 0.66 s in a fresh directory, 3.11 s right after an ``rm -rf``
of the same tree), which swamped what is measured.

The tar: the benchmarks' debootstrap'd Debian root (``data.ensure``'s cache), tarred once with numeric owners
and xattrs, or ``--tar FILE``.

    .venv/bin/python -m benchmarks.importbench [--reps 5] [--tar FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import data
from .util import log, remove_tree, run

_LAYERFS = [sys.executable, "-m", "layerfs"]


def rootfs_tar(cache: Path) -> Path:
    """The debootstrap'd root as a tar, made once."""
    tar = cache / "rootfs.tar"
    if not tar.exists():
        tree = cache / "debootstrap-bookworm"
        if not tree.is_dir():
            data.ensure(cache, "debootstrap")
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(tree), "-cf", f"{tar}.tmp", "."])
        os.rename(f"{tar}.tmp", tar)
    return tar


def _timed(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tar", type=Path)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds of quiet before each timed run")
    args = parser.parse_args()
    tar = args.tar or rootfs_tar(data.DEFAULT_CACHE)
    log(f"{tar}: {tar.stat().st_size >> 20} MiB")
    work = Path(tempfile.mkdtemp(prefix="importbench-", dir="/var/tmp"))
    times: dict[str, list[float]] = {"tar -x + sync": [], "layerfs import": []}
    try:
        for rep in range(args.reps):
            for n, name in enumerate(times):
                target = work / f"{rep}-{n}"
                target.mkdir()
                os.sync()
                time.sleep(args.pause)
                if name == "tar -x + sync":
                    took = _timed(["sh", "-c", f"tar -C {target} -xf {tar} && sync"])
                else:
                    took = _timed([*_LAYERFS, "import", "--root", str(target), f"rootfs:{tar}", "bench"])
                times[name].append(took)
            print(f"rep {rep + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    finally:
        remove_tree(work)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: median {medians[name]:.2f} s ({min(t):.2f}..{max(t):.2f})")
    pairs = [i / t for t, i in zip(times["tar -x + sync"], times["layerfs import"], strict=True)]
    print(
        f"ratio of medians {medians['layerfs import'] / medians['tar -x + sync']:.2f}x; "
        f"per pair {min(pairs):.2f}x..{max(pairs):.2f}x"
    )


if __name__ == "__main__":
    main()
