"""How long a Dockerfile takes to build: ``layerfs build`` against ``buildah bud --layers`` on kernel
overlayfs and ``buildah bud --layers`` with fuse-overlayfs as containers-storage's ``mount_program``,
each uncached (``--no-cache``) and then cached (the same build again, every step reused), in the same
run, interleaved, ``--reps`` times; medians (and min..max) printed as a table, and written as JSON.

The Dockerfile has seven steps over a busybox image: two RUNs (the first changes files of the image and
adds 200, the second changes files the first made), two COPYs (a tree of 200 files, a small file) and
three config steps. Every pass starts from a store (or a Buildah storage under ``/tmp``, with this host's
settings as tests/test_podman.py has them) holding only the base image, imported untimed; the storage
goes after the pass, untimed too.

    .venv/bin/python -m benchmarks.buildbench [--reps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerfs.oci.layout import write_image

from .podman import BUD_FLAGS, BUSYBOX, storage_env, write_configs
from .util import log, remove_mounted_tree, run

IMAGE = "localhost/bench-busybox:latest"
TOOLS = ("sh", "mkdir", "seq", "echo", "sed", "rm", "cat", "ls", "wc")
DOCKERFILE = f"""\
FROM {IMAGE}
RUN mkdir -p /app/data && for i in $(seq 200); do echo "file $i" > /app/data/f$i; done \\
    && sed -i s/v1/v2/ /etc/motd && rm /etc/obsolete
COPY tree /app/tree
ENV MODE=production
COPY small.txt /app/
RUN cat /app/small.txt >> /app/data/f1 && rm /app/data/f2 && echo v3 > /etc/motd && ls /app/data | wc -l
WORKDIR /app
CMD ["cat", "/app/small.txt"]
"""
TOOLS_COMPARED = ("layerfs", "buildah-overlay", "buildah-fuse-overlayfs")


def _inputs(base: Path) -> tuple[Path, Path]:
    """The base image's OCI layout (tag ``1``) and the build context."""
    root = base / "rootfs"
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for tool in TOOLS:
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc/motd").write_text("v1\n")
    (root / "etc/obsolete").write_text("to be deleted\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    layout = base / "layout"
    # (a history entry for its layer: Buildah's commits count the base's layers by its history)
    config = {"architecture": "amd64", "os": "linux", "config": {}, "history": [{"created_by": "buildbench"}]}
    write_image(str(layout), "1", [str(root)], config)
    context = base / "context"
    for n in range(200):
        path = context / f"tree/d{n % 8}/f{n}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {n}\n" * (n % 50 + 1))
    (context / "small.txt").write_text("small\n")
    (context / "Dockerfile").write_text(DOCKERFILE)
    return layout, context


class _Layerfs:
    def __init__(self, home: Path, layout: Path) -> None:
        self.store = home / "store"
        self._layerfs("import", f"oci:{layout}:1", IMAGE)

    def _layerfs(self, *args: str | os.PathLike) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "layerfs", *map(str, args), "--root", str(self.store)])

    def build(self, context: Path, *flags: str) -> None:
        self._layerfs("build", "-t", "localhost/built:1", *flags, context)


class _Buildah:
    def __init__(self, home: Path, layout: Path, mount_program: str | None) -> None:
        write_configs(home, mount_program)
        self.env = storage_env(home)
        image_id = self._buildah("pull", "-q", f"oci:{layout}:1").stdout.split()[-1]
        self._buildah("tag", image_id, IMAGE)

    def _buildah(self, *args: str | os.PathLike) -> subprocess.CompletedProcess:
        return run(["buildah", *map(str, args)], env=self.env, timeout=600)

    def build(self, context: Path, *flags: str) -> None:
        self._buildah(
            "bud",
            "--layers",
            *BUD_FLAGS,
            "-t",
            "localhost/built:1",
            *flags,
            context,
        )

    def reset(self) -> None:
        self._buildah("rm", "--all")
        self._buildah("rmi", "--all", "--force")


def _builder(tool: str, home: Path, layout: Path) -> _Layerfs | _Buildah:
    if tool == "layerfs":
        return _Layerfs(home, layout)
    return _Buildah(home, layout, shutil.which("fuse-overlayfs") if tool == "buildah-fuse-overlayfs" else None)


def _pass(tool: str, layout: Path, context: Path) -> tuple[float, float]:
    """One uncached build and one cached rebuild with ``tool`` in a storage of its own; their seconds."""
    home = Path(tempfile.mkdtemp(prefix=f"lfsbb-{tool[:8]}-"))
    try:
        builder = _builder(tool, home, layout)
        started = time.perf_counter()
        builder.build(context, "--no-cache")
        uncached = time.perf_counter() - started
        started = time.perf_counter()
        builder.build(context)
        cached = time.perf_counter() - started
        if isinstance(builder, _Buildah):
            builder.reset()
        return uncached, cached
    finally:
        remove_mounted_tree(home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="buildbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write the times here too")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="buildbench-"))
    try:
        layout, context = _inputs(work)
        times: dict[str, dict[str, list[float]]] = {t: {"uncached": [], "cached": []} for t in TOOLS_COMPARED}
        for rep in range(args.reps):
            for tool in TOOLS_COMPARED:
                uncached, cached = _pass(tool, layout, context)
                log(f"rep {rep + 1}/{args.reps} {tool}: uncached {uncached:.2f}s, cached {cached:.2f}s")
                times[tool]["uncached"].append(uncached)
                times[tool]["cached"].append(cached)
    finally:
        shutil.rmtree(work)
    print(_table(times))
    if args.json:
        Path(args.json).write_text(json.dumps({"dockerfile": DOCKERFILE, "seconds": times}, indent=1) + "\n")
    return 0


def _table(times: dict[str, dict[str, list[float]]]) -> str:
    """Medians (min..max) in seconds, with layerfs's ratio to each."""
    ours = {kind: statistics.median(times["layerfs"][kind]) for kind in ("uncached", "cached")}
    lines = ["| build | " + " | ".join(TOOLS_COMPARED) + " |", "|---|" + "---|" * len(TOOLS_COMPARED)]
    for kind in ("uncached", "cached"):
        cells = []
        for tool in TOOLS_COMPARED:
            values = times[tool][kind]
            median = statistics.median(values)
            ratio = "" if tool == "layerfs" else f" ({median / ours[kind]:.1f}x layerfs's)"
            cells.append(f"{median:.2f} s [{min(values):.2f}..{max(values):.2f}]{ratio}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
