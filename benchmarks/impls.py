"""The implementations compared, and how each is mounted over the same layers.

- native: the merged tree as a plain directory (a real copy, so its writes touch nothing shared).
- overlay: kernel overlayfs.
- fuse-overlayfs: the Debian package, with its defaults (it picks long entry/attr timeouts and the
  writeback cache itself) plus ``dev,suid``, which layerfs sets itself when mounted by root: without
  them the rootfs's /dev/null cannot be opened and perl and git fail to start in the chroot.
- unionfs: unionfs-fuse in copy-on-write mode with its defaults (multi-threaded), plus ``dev,suid``,
  ``use_ino`` and ``hide_meta_files`` (its bookkeeping directory stays out of listings). It reads neither
  overlay whiteouts nor opaque markers: deleted lower files show through it as 0/0 character devices and
  replaced directories as the merge of old and new; the runner reports exactly what each one sees.
- layerfs: this project's command, ``layerfs -o lowerdir=...,upperdir=...,workdir=...``, as users run it.
- layerfs-flat: layerfs over one lower layer holding the same merged content (hard links), to measure
  what the layering itself costs; it runs only the stat and read workloads.
- overlay-metacopy, layerfs-metacopy: kernel overlayfs and layerfs mounted with ``metacopy=on`` as well
  (a change of a lower file's metadata copies up its metadata only). Variants like these run only in the
  workloads that name them (``Workload.impls``: chown-r), not in every one.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .util import REPO, have, output


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # native | kernel | fuse
    flat: bool = False  # mounts the flattened one-layer tree instead of the layer stack
    options: str = ""  # mount options added to the implementation's usual ones
    userns: bool = False  # mounted in a user namespace (benchmarks/rootless.py): overlayfs with userxattr

    @property
    def variant(self) -> bool:
        """Mounted with options of its own: it runs only in the workloads that name it (Workload.impls)."""
        return bool(self.options)

    def problem(self) -> str | None:
        """Why this implementation cannot run here, or None."""
        if self.kind == "kernel":
            with open("/proc/filesystems") as f:
                return None if "overlay" in f.read().split() else "kernel has no overlay filesystem"
        if self.name == "fuse-overlayfs" and not have("fuse-overlayfs"):
            return "fuse-overlayfs not installed (apt-get install fuse-overlayfs)"
        if self.name == "unionfs" and not have("unionfs"):
            return "unionfs-fuse not installed (apt-get install unionfs-fuse)"
        if self.kind == "fuse" and not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if self.name.startswith("layerfs") and not layerfs_command():
            return "layerfs not installed (tools/setup)"
        return None

    def version(self) -> str:
        if self.name == "native":
            return f"ext4 (journaled loop image), kernel {platform.release()}"
        if self.kind == "kernel":
            return f"kernel {platform.release()}"
        if self.name == "fuse-overlayfs":
            return (
                f"{_line(['fuse-overlayfs', '--version'], 'fuse-overlayfs')} "
                f"(Debian {_deb('fuse-overlayfs')}, libfuse3 {_deb('fuse3')})"
            )
        if self.name == "unionfs":
            return (
                f"{_line(['unionfs', '--version'], 'unionfs-fuse version')} "
                f"(Debian {_deb('unionfs-fuse')}, libfuse2 {_deb('libfuse2')})"
            )
        commit = output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
        dirty = output(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "layerfs"])
        changes = " + local changes" if dirty else ""
        return f"{output(layerfs_command() + ['--version'])} (git {commit}{changes}, its own FUSE server)"

    def command(self, lowers: list[Path], upper: Path, work: Path, mnt: Path) -> list[str]:
        """The mount command; lowers top first."""
        lowerdir = ":".join(str(p) for p in lowers)
        if self.kind == "kernel":
            return [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                # (userxattr refuses redirect_dir=on: a rename of a merged directory is EXDEV there, and mv copies)
                self._with(
                    f"lowerdir={lowerdir},upperdir={upper},workdir={work},"
                    + ("userxattr" if self.userns else "redirect_dir=on")
                ),
                str(mnt),
            ]
        if self.name == "fuse-overlayfs":
            return [
                "fuse-overlayfs",
                "-o",
                self._with(f"dev,suid,lowerdir={lowerdir},upperdir={upper},workdir={work}"),
                str(mnt),
            ]
        if self.name == "unionfs":
            branches = ":".join([f"{upper}=RW"] + [f"{p}=RO" for p in lowers])
            return ["unionfs", "-o", self._with("cow,hide_meta_files,use_ino,dev,suid"), branches, str(mnt)]
        if self.name.startswith("layerfs"):
            return layerfs_command() + [
                "-o",
                self._with(f"lowerdir={lowerdir},upperdir={upper},workdir={work}"),
                str(mnt),
            ]
        raise ValueError(f"{self.name} is not mounted")

    def _with(self, options: str) -> str:
        return f"{options},{self.options}" if self.options else options


IMPLS = [
    Impl("native", "native"),
    Impl("overlay", "kernel"),
    Impl("overlay-metacopy", "kernel", options="metacopy=on"),
    Impl("fuse-overlayfs", "fuse"),
    Impl("unionfs", "fuse"),
    Impl("layerfs", "fuse"),
    Impl("layerfs-metacopy", "fuse", options="metacopy=on"),
    Impl("layerfs-flat", "fuse", flat=True),
]
BY_NAME = {i.name: i for i in IMPLS}


def layerfs_command() -> list[str]:
    """The project's own layerfs (its virtualenv), else the one on PATH."""
    venv = os.path.join(REPO, ".venv", "bin", "layerfs")
    if os.access(venv, os.X_OK):
        return [venv]
    return ["layerfs"] if have("layerfs") else []


def _line(args: list[str], marker: str) -> str:
    """The line of a program's --version output that names it (they print their libraries' too)."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return next((line.strip() for line in (r.stdout + r.stderr).splitlines() if marker in line), "?")


def _deb(package: str) -> str:
    return output(["dpkg-query", "-W", "-f", "${Version}", package]) or "?"
