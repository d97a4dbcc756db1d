"""A generated stand-in for a Debian rootfs, used when debootstrap cannot run (no network, not Debian).

About 15,000 entries and 330 MB with a container image's size mix: many small text files (docs, man
pages, dpkg info, zoneinfo, Python sources and their .pyc), mid-sized binaries and shared libraries, a few
big files (apt lists, large libraries), merged-/usr symlinks and library version symlinks. Content is
pseudo-random (not compressible, not sparse) and the same on every machine (fixed seed).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

# (directory pattern, number of subdirectories, files, median size, spread (lognormal sigma), file name
# pattern). "{d}" in the directory pattern is replaced by the subdirectory's name.
_CATEGORIES = [
    ("usr/bin", 0, 450, 30_000, 1.3, "prog{i}"),
    ("usr/sbin", 0, 120, 25_000, 1.0, "sprog{i}"),
    ("usr/lib/x86_64-linux-gnu", 0, 300, 110_000, 1.4, "lib{i}.so.{v}"),
    ("usr/lib/python3.11/{d}", 25, 1600, 6_000, 1.2, "mod{i}.py"),
    ("usr/lib/python3/dist-packages/{d}", 40, 800, 5_000, 1.2, "mod{i}.py"),
    ("usr/share/doc/{d}", 250, 500, 2_500, 1.0, "doc{i}"),
    ("usr/share/man/{d}", 8, 1500, 2_000, 0.8, "page{i}.gz"),
    ("usr/share/locale/{d}/LC_MESSAGES", 60, 600, 15_000, 1.0, "dom{i}.mo"),
    ("usr/share/zoneinfo/{d}", 12, 1200, 1_500, 0.5, "Zone{i}"),
    ("usr/share/perl/5.36/{d}", 50, 1000, 8_000, 1.1, "Mod{i}.pm"),
    ("usr/include/{d}", 60, 1400, 5_000, 1.3, "h{i}.h"),
    ("etc/{d}", 40, 350, 600, 1.5, "conf{i}"),
    ("var/lib/dpkg/info", 0, 1400, 1_500, 1.5, "pkg{i}.list"),
    ("var/lib/apt/lists", 0, 8, 7_000_000, 0.5, "deb_{i}_Packages"),
]
_BIG = [("usr/lib/x86_64-linux-gnu/libbig1.so.1", 28_000_000), ("usr/lib/x86_64-linux-gnu/libbig2.so.3", 21_000_000)]
_EMPTY_DIRS = [
    "proc",
    "sys",
    "dev",
    "run",
    "root",
    "home",
    "srv",
    "mnt",
    "opt",
    "media",
    "usr/local/bin",
    "usr/local/lib",
    "var/tmp",
    "var/log",
    "tmp",
]
_MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


class _Content:
    """Pseudo-random bytes cut from one block at varying offsets: fast, incompressible, reproducible."""

    def __init__(self, rng: random.Random, size: int = 8 << 20) -> None:
        self.block = rng.randbytes(size)
        self.rng = rng

    def write(self, path: Path, size: int) -> None:
        with open(path, "wb") as f:
            while size > 0:
                start = self.rng.randrange(len(self.block) // 2)
                n = min(size, len(self.block) - start)
                f.write(self.block[start : start + n])
                size -= n


def generate_rootfs(dest: Path, seed: int = 1) -> None:
    """Write the generated rootfs into the empty or missing directory ``dest``."""
    rng = random.Random(seed)
    content = _Content(rng)
    dest.mkdir(parents=True, exist_ok=True)
    for d in _EMPTY_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "var/tmp", 0o1777)
    for pattern, ndirs, nfiles, median, sigma, name in _CATEGORIES:
        subdirs = [f"{pattern.split('/')[-1].strip('{}')}{k}" for k in range(max(ndirs, 1))]
        for i in range(nfiles):
            sub = subdirs[i % len(subdirs)]
            directory = dest / pattern.format(d=sub)
            directory.mkdir(parents=True, exist_ok=True)
            size = int(math.exp(rng.gauss(math.log(median), sigma)))
            path = directory / name.format(i=i, v=rng.randint(0, 9))
            content.write(path, size)
            if path.suffix == ".py":  # its compiled twin, as Debian's packages install them
                cache = directory / "__pycache__"
                cache.mkdir(exist_ok=True)
                content.write(cache / f"{path.stem}.cpython-311.pyc", int(size * 0.8))
            if pattern.startswith("usr/bin") and i % 3 == 0:
                os.symlink(path.name, directory / f"alias{i}")
            if pattern.startswith("usr/lib/x86_64") and ".so." in path.name:
                os.symlink(path.name, directory / path.name.split(".so.")[0].replace("lib", "libdev", 1))
                os.symlink(path.name, directory / (path.name.split(".so.")[0] + ".so"))
    for rel, size in _BIG:
        content.write(dest / rel, size)
    for link, target in _MERGED_USR.items():
        (dest / target).mkdir(parents=True, exist_ok=True)
        os.symlink(target, dest / link)


def start_lookups(root: Path) -> dict:
    """What the container-start stand-in looks up in the generated tree: a dynamic loader's and an
    interpreter's search paths, where most names probed do not exist."""
    libs = sorted(p.name for p in (root / "usr/lib/x86_64-linux-gnu").iterdir() if ".so." in p.name)[:40]
    modules = sorted({p.stem for p in (root / "usr/lib/python3.11").rglob("*.py")})[:150]
    return {
        "kind": "lookups",
        "libdirs": [
            "usr/local/lib/x86_64-linux-gnu",
            "usr/local/lib",
            "lib/x86_64-linux-gnu/tls",
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
        ],
        "libs": libs,
        "pydirs": ["usr/lib/python311.zip", "usr/local/lib/python3.11/dist-packages", "usr/lib/python3/dist-packages"]
        + sorted(str(p.relative_to(root)) for p in (root / "usr/lib/python3.11").iterdir() if p.is_dir()),
        "modules": modules,
    }
