"""podman-build: ``podman build`` of a small Dockerfile, with each union as the storage's overlay driver.

Kernel overlayfs is containers-storage's own overlay driver; fuse-overlayfs and layerfs serve as its
``mount_program``, as in tests/test_podman.py. A plain directory and unionfs-fuse cannot be an overlay
driver: they take no part (the report shows "—").

Each pass has a Podman of its own: graphroot, runroot and temporary directory under a short
``/tmp/lfspm-bench-IMPL-PID`` (under state paths of about 60 characters Podman 4.3 misses its
containers' exits, says tests/test_podman.py), named in a storage.conf and containers.conf of its own
(runc, cgroupfs, events in a file, no network, ulimits this host allows); nothing global is touched.
Untimed before the pass: those files, a busybox image imported, the build context. Timed: ``podman build
--layers --no-cache``, three steps, each committed as an image layer. Untimed after: ``podman system
reset``, an unmount of whatever is still mounted below the directory, and its removal;
``workspace.clean_stale`` does the same for a run that was killed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from .impls import layerfs_command
from .util import have, remove_mounted_tree, run

if TYPE_CHECKING:
    from .workloads import Ctx

HOMES = Path("/tmp")
PREFIX = "lfspm-bench-"
DRIVERS = ("overlay", "fuse-overlayfs", "layerfs")  # the implementations that can take part
BUSYBOX = shutil.which("busybox") or "/bin/busybox"  # busybox-static: runs in a rootfs of its own
IMAGE = "localhost/bench-busybox"
STEPS = 3
# The first RUN changes files of the imported image (copy-ups, a whiteout) and adds some; the second
# changes files of the layers the first RUN and the COPY committed.
DOCKERFILE = f"""\
FROM {IMAGE}
RUN mkdir -p /app/data && for i in $(seq 20); do echo "file $i" > /app/data/f$i; done \\
    && sed -i s/v1/v2/ /etc/motd && rm /etc/obsolete
COPY small.txt /app/
RUN cat /app/small.txt >> /app/data/f1 && rm /app/data/f2 && echo v3 > /etc/motd && ls /app/data | wc -l
"""
FILES = {"etc/motd": "v1\n", "etc/obsolete": "to be deleted\n", "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"}


def home(ctx: Ctx) -> Path:
    return HOMES / f"{PREFIX}{ctx.impl}-{os.getpid()}"


def _mount_program(impl: str) -> str | None:
    """containers-storage's mount_program for an implementation; None for kernel overlayfs."""
    if impl == "overlay":
        return None
    return shutil.which("fuse-overlayfs") if impl == "fuse-overlayfs" else layerfs_command()[0]


def _podman(base: Path, *args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    return run(["podman", *map(str, args)], env=storage_env(base), timeout=timeout)


def storage_env(base: Path) -> dict[str, str]:
    """The environment that points Podman and Buildah at the configuration ``write_configs`` wrote in ``base``."""
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "CONTAINERS_CONF": str(base / "containers.conf"),
    }


# ``buildah bud``'s flags for this host's settings (as containers.conf has them for Podman).
BUD_FLAGS = (
    "--runtime",
    "runc",
    "--isolation",
    "oci",
    "--network",
    "none",
    "--cgroup-manager",
    "cgroupfs",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
)


def write_configs(base: Path, program: str | None) -> None:
    """A storage of its own under ``base`` (graph, run, tmp) mounting with ``program`` (None: kernel
    overlayfs), and this host's settings: runc, cgroupfs, events in a file, no network, ulimits it allows."""
    for d in ("graph", "run", "tmp"):
        (base / d).mkdir(parents=True)
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\nrunroot = "{base}/run"\n'
        + (f'[storage.options.overlay]\nmount_program = "{program}"\n' if program else "")
    )
    (base / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\nnetns = "none"\n'
        f'[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'tmp_dir = "{base}/tmp"\n'
    )


def prepare(ctx: Ctx) -> None:
    if not have("podman"):
        raise RuntimeError("podman is not installed (tools/setup installs it)")
    base = home(ctx)
    write_configs(base, _mount_program(ctx.impl))
    (base / "context").mkdir()
    (base / "context" / "Dockerfile").write_text(DOCKERFILE)
    (base / "context" / "small.txt").write_text("a small file\n")
    rootfs_tar(base / "busybox.tar")
    _podman(base, "import", base / "busybox.tar", IMAGE)


def rootfs_tar(path: Path) -> None:
    """A busybox rootfs: the static binary, a link per applet in /bin, and the FILES the build changes."""

    def entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, link
        return info

    applets = set(run([BUSYBOX, "--list"]).stdout.split()) - {"busybox"}
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "root", "tmp"):
            tar.addfile(entry(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        tar.add(BUSYBOX, "bin/busybox")
        for applet in sorted(applets):
            tar.addfile(entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        for name, text in FILES.items():
            tar.addfile(entry(name, tarfile.REGTYPE, 0o644, len(text)), io.BytesIO(text.encode()))


def build(ctx: Ctx) -> int:
    """podman build of the Dockerfile; every step really runs (--no-cache) and is committed (--layers)."""
    base = home(ctx)
    _podman(
        base,
        "build",
        "--layers",
        "--no-cache",
        "--pull=never",
        "--network",
        "none",
        "-t",
        "localhost/bench-built",
        base / "context",
        timeout=ctx.scale.timeout,
    )
    return STEPS


def cleanup(ctx: Ctx) -> None:
    remove(home(ctx))


def remove(base: Path) -> None:
    """A storage reset (images, containers, and their mounts), then whatever is left below ``base``."""
    try:
        if (base / "storage.conf").exists():
            _podman(base, "system", "reset", "--force")
    finally:
        remove_mounted_tree(base)
