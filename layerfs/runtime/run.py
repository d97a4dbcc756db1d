"""``layerfs run``: the command line's side: which layers, which process, and the mount around shim.run
(a container of the store is created here and run by lifecycle.py: in the foreground or detached,
removed with ``--rm``)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable

from ..errors import LayerfsError, UsageError
from ..fs import mount, options
from ..store import Store, root_from
from . import lifecycle, process, shim
from .confinement import Confinement


def main(args: argparse.Namespace) -> int:
    words = list(args.args)
    confined = Confinement.from_flags(args.cap_add, args.cap_drop, args.privileged)  # (its errors before any change)
    if args.lower:
        if args.detach:
            raise UsageError("run -d needs an image: a container of --lower dirs is thrown away when it ends")
        if words[:1] == ["--"]:
            words = words[1:]
        return _run_on_lowers([os.path.abspath(p) for p in args.lower], words, args, confined)
    if not words:
        raise UsageError("run what? give an IMAGE (or --lower DIR) and a command")
    image = words[0]
    store = Store(root_from(args.root))
    record = store.create(args.name or f"run-{uuid.uuid4().hex[:8]}", image)
    return lifecycle.launch(store, record["name"], args, run_stored)


def run_stored(store: Store, name: str, args: argparse.Namespace, started: Callable[[int], None]) -> int:
    """(In the shim.) Container ``name`` of the store run as ``run``'s flags ``args`` say (as given, or
    as ``start`` finds them kept)."""
    record = store.containers.get(name)
    if record is None:
        raise LayerfsError(f"no container {name!r}")
    command = args.args[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    config = lifecycle.image_config(store, record)
    return _run(
        record["lowers"],
        record["upper"],
        record["work"],
        record["merged"],
        command,
        config,
        args,
        Confinement.from_flags(args.cap_add, args.cap_drop, args.privileged),
        made=lambda paths: store.add_runtime_paths(name, paths),
        started=started,
        runtime_in=store.containers.dir(name),  # (what a killed shim leaves there goes with the container)
    )


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


def container_hostname(args: argparse.Namespace) -> str:
    return args.hostname or (args.name or "layerfs")[:63]


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
    started: Callable[[int], None] = lambda pid: None,
    runtime_in: str | None = None,
) -> int:
    hostname = container_hostname(args)
    to_run = shim.Process(
        process.argv(config, command, args.entrypoint),
        process.environment(config, args.env, args.env_file, hostname),
        process.workdir(config, args.workdir),
        args.user or config.get("User") or "",
        hostname,
        network=args.net == "host",
        confinement=confined,
        stdin=args.interactive,
        tty=args.tty,
        init=args.init,
    )
    mount_options = options.for_dirs(lowers, upper, work, x_layerfs_owner=os.getpid())
    if mount.mount(options.parse([mount_options], merged)) != 0:
        return 125
    runtime = tempfile.mkdtemp(prefix="layerfs-runtime-", dir=runtime_in)
    try:
        to_run.binds, files = shim.runtime_files(merged, runtime, hostname, to_run.network)
        made(shim.make_mount_points(merged) + files)
        return shim.run(merged, to_run, started)
    finally:
        mount.umount(merged)
        shutil.rmtree(runtime, ignore_errors=True)
