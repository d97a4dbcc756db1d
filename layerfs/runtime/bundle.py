"""``layerfs bundle C DIR``: an OCI runtime bundle whose rootfs is container C's layerfs mount.

``DIR/config.json`` is runc's default configuration (``runc spec``) with the process ``layerfs run`` would
run (process.py's rules: the image's ``Entrypoint``/``Cmd`` or the command given, ``Env`` with ``-e`` and
``--env-file``, ``User`` or ``-u`` resolved to ids in the container's own /etc/passwd and /etc/group, HOME,
``WorkingDir`` or ``-w``), no terminal (a bundle is run
by a program more often than by a person), and a writable root, since writes are what the container's
upper layer is for; and with docker's default confinement (confinement.py), capabilities, seccomp
profile, masked and read-only paths, which runc applies itself. ``DIR/rootfs`` is the mount; ``layerfs
umount DIR/rootfs`` takes it down.
"""

from __future__ import annotations

import argparse
import json
import os

from ..errors import LayerfsError
from ..fs import mount, options
from ..store import Store
from . import process, shim
from .confinement import MASKED_PATHS, READONLY_PATHS, Confinement


def _mounts() -> list[dict]:
    """runc spec's mounts."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def config(args: list[str], env: dict[str, str], cwd: str, user: process.User, hostname: str) -> dict:
    confined = Confinement()
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.groups},
            "args": args,
            "env": [f"{k}={v}" for k, v in {"HOME": user.home, **env}.items()],
            "cwd": cwd,
            "capabilities": {k: sorted(confined.capabilities) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": _mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": confined.seccomp(),
        },
    }


def write(store: Store, name: str, directory: str, command: list[str], flags: argparse.Namespace) -> str:
    """Mount container ``name`` at ``directory``/rootfs and write the bundle's config.json, its process
    chosen from the image's config and ``flags`` (run's -e, --env-file, -u, -w, --entrypoint); returns the
    rootfs path."""
    record = store.containers.get(name)
    if record is None:
        raise LayerfsError(f"no container {name!r}")
    image_config = (store.images.find(record["image"]) or {}).get("config", {}).get("config") or {}
    hostname = name[:63]
    args = process.argv(image_config, command, flags.entrypoint)
    env = process.environment(image_config, flags.env, flags.env_file, hostname)
    cwd = process.workdir(image_config, flags.workdir)
    user = process.find_user_in_layers(flags.user or image_config.get("User") or "", record["upper"], record["lowers"])
    rootfs = os.path.join(os.path.abspath(directory), "rootfs")
    os.makedirs(rootfs, exist_ok=True)
    if mount.mount(options.parse([options.for_dirs(record["lowers"], record["upper"], record["work"])], rootfs)) != 0:
        raise LayerfsError(f"could not mount container {name!r}")
    try:
        store.add_runtime_paths(name, shim.make_mount_points(rootfs))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config(args, env, cwd, user, hostname), f, indent=1)
    except BaseException:
        mount.umount(rootfs)
        raise
    return rootfs
