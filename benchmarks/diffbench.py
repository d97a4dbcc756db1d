"""How long a container's diff takes, three ways, as its image grows: the change index (``layerfs diff``),
a walk of the upper directory (what Docker's overlay2 does) and a naive comparison of the image's tree
with the container's (what Podman does with a FUSE mount_program, rootless Docker, and overlay with
redirect_dir/metacopy): the goal is that the index's time does not grow with the tree.

For each tree size (files in the lower layer), layerfs is mounted over it, a few changes are made (an
edit, a chmod, a delete, a new directory with files, a rename...), the mount is taken down, and each
way computes the diff of the same container, ``--reps`` times in a row; medians are printed with ratios,
and written to a JSON file. The three ways must agree (the naive one on the entries it can see:
it compares lstat facts, as Docker's does, and reports a replaced directory its own way).

    .venv/bin/python -m benchmarks.diffbench [--sizes 1000,10000,100000] [--changes 10] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerfs.container import Container, container_changes
from layerfs.core.changes import changes

from .util import REPO, log

_CACHE = Path("/var/cache/layerfs-bench/diff")
_PER_DIR = 500


def _lower(files: int) -> Path:
    """A lower layer of ``files`` small files in directories of 500, built once and cached."""
    path = _CACHE / f"lower-{files}"
    if path.is_dir():
        return path
    tmp = Path(tempfile.mkdtemp(dir=_CACHE.parent, prefix="diff-building-"))
    for i in range(files):
        d = tmp / f"d{i // _PER_DIR // 100}" / f"e{i // _PER_DIR}"
        if i % _PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(b"x" * (i % 200))
    _CACHE.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path


def _change(mnt: Path, n: int) -> None:
    """``n`` changes of the usual kinds, spread over the tree."""
    kinds = [
        lambda i: open(mnt / f"d0/e{i}/f{i * _PER_DIR}", "ab").write(b"edited"),
        lambda i: os.chmod(mnt / f"d0/e{i}/f{i * _PER_DIR + 1}", 0o600),
        lambda i: os.unlink(mnt / f"d0/e{i}/f{i * _PER_DIR + 2}"),
        lambda i: (mnt / f"new{i}").mkdir() or (mnt / f"new{i}/file").write_text("new"),
        lambda i: os.rename(mnt / f"d0/e{i}/f{i * _PER_DIR + 3}", mnt / f"d0/e{i}/renamed"),
    ]
    for i in range(n):
        kinds[i % len(kinds)](i // len(kinds))


def _naive(image: Path, container: Path) -> set[str]:
    """Docker's naive diff: both trees walked whole, entries compared by their lstat facts."""

    def entries(root: Path) -> dict[str, tuple]:
        out = {}
        todo = [""]
        while todo:
            rel = todo.pop()
            with os.scandir(os.path.join(root, rel.lstrip("/"))) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    path = f"{rel}/{e.name}"
                    out[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
                    if e.is_dir(follow_symlinks=False):
                        todo.append(path)
        return out

    old, new = entries(image), entries(container)
    return {p for p in old.keys() | new.keys() if old.get(p) != new.get(p)}


def _mount(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def _layerfs() -> list[str]:
    return [os.path.join(REPO, ".venv", "bin", "layerfs")]


def measure(files: int, n_changes: int, reps: int, base: Path) -> dict:
    lower = _lower(files)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    _mount(_layerfs() + ["-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)])
    try:
        _change(mnt, n_changes)
    finally:
        _mount(_layerfs() + ["umount", str(mnt)])

    # The image is the lower layer itself (one layer); the container is kernel overlayfs's view of it.
    image, view = lower, base / "view"
    view.mkdir()
    _mount(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={upper}:{lower}", str(view)])
    container = Container([str(lower)], str(upper), str(work))
    ways = {
        "index": lambda: container_changes(container, unchanged_copies=True),
        "upper walk": lambda: changes(str(upper), [str(lower)]),
        "naive": lambda: _naive(image, view),
    }
    times: dict[str, list[float]] = {w: [] for w in ways}
    try:
        answers = {}
        # Each way in a block of its own, after an untimed pass: interleaved with the naive way, whose walk
        # of the whole tree churns memory and the dentry cache, a sub-millisecond way measures that churn.
        for way, f in ways.items():
            answers[way] = f()
            for _ in range(reps):
                start = time.perf_counter()
                f()
                times[way].append(time.perf_counter() - start)
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)

    listed = {c.path for c in answers["index"]}
    assert answers["index"] == answers["upper walk"], "the index and the walk disagree"
    assert answers["naive"] <= listed, f"the naive diff saw more: {sorted(answers['naive'] - listed)}"
    medians = {w: statistics.median(t) for w, t in times.items()}
    return {"files": files, "changes": len(listed), "medians_seconds": medians}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="files in the lower layer, comma-separated")
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="/var/tmp/layerfs-bench/diff", help="where results.json goes")
    args = parser.parse_args()
    rows = []
    for files in (int(s) for s in args.sizes.split(",")):
        log(f"{files} files: building (once), mounting, changing, measuring")
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="layerfs-diffbench-") as tmp:
            rows.append(measure(files, args.changes, args.reps, Path(tmp)))
    print(
        f"{'files':>8} {'changes':>8} {'index':>10} {'upper walk':>11} {'naive':>10} "
        f"{'naive/index':>12} {'walk/index':>11}"
    )
    for r in rows:
        m = r["medians_seconds"]
        print(
            f"{r['files']:>8} {r['changes']:>8} {m['index'] * 1e3:>8.2f}ms {m['upper walk'] * 1e3:>9.2f}ms "
            f"{m['naive'] * 1e3:>8.1f}ms {m['naive'] / m['index']:>11.0f}x {m['upper walk'] / m['index']:>10.2f}x"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                "command": sys.argv,
                "rows": rows,
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
