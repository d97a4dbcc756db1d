"""Small helpers shared by the benchmark modules: commands, logging, system facts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_started = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr with the seconds since start, so a slow step shows where the time goes."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing with its stderr in the message."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    result = subprocess.run(args, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {(result.stderr or '').strip()[-2000:]}")
    return result


def output(args: list[str]) -> str:
    """First line of a command's output (stdout, else stderr), or "" when it cannot run."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = r.stdout.strip() or r.stderr.strip()
    return text.splitlines()[0] if text else ""


def remove_tree(path: str | os.PathLike) -> None:
    """rm -rf (as root; fast, and unbothered by overlay's mode-000 work directories)."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(path)], check=True)


def remove_mounted_tree(path: str | os.PathLike) -> None:
    """Unmount whatever is mounted below ``path`` (deepest first), then rm -rf it."""
    prefix = os.fspath(path) + "/"
    for point in sorted((p for p in mounted_points() if p.startswith(prefix)), key=len, reverse=True):
        umount(point)
    remove_tree(path)


def below(root: str | os.PathLike) -> Iterator[str]:
    """Every path under ``root`` (not ``root`` itself), symbolic links not followed."""
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            yield os.path.join(directory, name)


def allocated(paths: Iterable[str | os.PathLike]) -> tuple[int, int]:
    """(bytes allocated, entries) of ``paths``: their st_blocks, an inode with several of the names counted
    once, as du counts."""
    inodes: set[tuple[int, int]] = set()
    total = entries = 0
    for path in paths:
        st = os.lstat(path)
        entries += 1
        if (st.st_dev, st.st_ino) not in inodes:
            inodes.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total, entries


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (the cold variants' starting point)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def umount(path: str) -> None:
    """Unmount ``path`` if mounted, retrying while busy, lazily as a last resort."""
    for attempt in range(20):
        if path not in mounted_points():
            return
        if subprocess.run(["umount", path], capture_output=True).returncode == 0:
            return
        time.sleep(0.05 * (attempt + 1))  # EBUSY: a process of ours is still finishing
    subprocess.run(["umount", "-l", path], capture_output=True)


def have(program: str) -> bool:
    return shutil.which(program) is not None
