"""``layerfs run``: the command line's side: which layers, which process, and the container's life cycle
(create, mount, run, unmount, remove with ``--rm``) around shim.run."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid

from ..errors import UsageError
from ..fs import mount, options
from ..store import Store, root_from
from . import process, shim
from .confinement import Confinement


def main(args: argparse.Namespace) -> int:
    words = list(args.args)
    confined = Confinement.from_flags(args.cap_add, args.cap_drop, args.privileged)  # (its errors before any change)
    if args.lower:
        if words[:1] == ["--"]:
            words = words[1:]
        return _run_on_lowers([os.path.abspath(p) for p in args.lower], words, args, confined)
    if not words:
        raise UsageError("run what? give an IMAGE (or --lower DIR) and a command")
    image, command = words[0], words[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    store = Store(root_from(args.root))
    config = (store.images.find(image) or {}).get("config", {}).get("config") or {}
    record = store.create(args.name or f"run-{uuid.uuid4().hex[:8]}", image)
    try:
        return _run(
            record["lowers"],
            record["upper"],
            record["work"],
            record["merged"],
            command,
            config,
            args,
            confined,
            made=lambda paths: store.add_runtime_paths(record["name"], paths),
        )
    finally:
        if args.rm:
            store.remove(record["name"])


def _run_on_lowers(lowers: list[str], command: list[str], args: argparse.Namespace, confined: Confinement) -> int:
    """A container of plain lower directories, with a throwaway upper."""
    where = tempfile.mkdtemp(prefix="layerfs-run-")
    try:
        upper, work, merged = (os.path.join(where, d) for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.mkdir(d)
        return _run(lowers, upper, work, merged, command, {}, args, confined)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _run(
    lowers: list[str],
    upper: str,
    work: str,
    merged: str,
    command: list[str],
    config: dict,
    args: argparse.Namespace,
    confined: Confinement,
    made=lambda paths: None,
) -> int:
    hostname = args.hostname or (args.name or "layerfs")[:63]
    to_run = shim.Process(
        process.argv(config, command, args.entrypoint),
        process.environment(config, args.env, args.env_file, hostname),
        process.workdir(config, args.workdir),
        args.user or config.get("User") or "",
        hostname,
        network=args.net == "host",
        confinement=confined,
    )
    mount_options = options.for_dirs(lowers, upper, work, x_layerfs_owner=os.getpid())
    if mount.mount(options.parse([mount_options], merged)) != 0:
        return 125
    runtime = tempfile.mkdtemp(prefix="layerfs-runtime-")
    try:
        to_run.binds, files = shim.runtime_files(merged, runtime, hostname, to_run.network)
        made(shim.make_mount_points(merged) + files)
        return shim.run(merged, to_run)
    finally:
        mount.umount(merged)
        shutil.rmtree(runtime, ignore_errors=True)
