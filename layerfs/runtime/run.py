"""``layerfs run``: the command line's side: which layers, which process, and the container's life cycle
(check, create, mount, run, unmount) around shim.run. A container of an image, or of plain lower
directories given a ``--name``, is recorded in the store and run by lifecycle.py (in the foreground or
detached, removed with ``--rm``); a nameless ``--lower`` run is a throwaway."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import LayerfsError, UsageError
from ..fs import mount, options
from ..store import Store, root_from
from . import cgroups, lifecycle, process, shim, volumes
from .confinement import Confinement


def main(args: argparse.Namespace) -> int:
    # Everything that can refuse the run is asked before a container is made: a refused run leaves nothing.
    confined = Confinement.from_flags(args.cap_add, args.cap_drop, args.privileged)
    requested = volumes.parse(args.volume, args.mount, args.tmpfs)
    limits = cgroups.Limits.from_run_flags(args)
    cgroups.check(limits)
    throwaway = args.lower and not args.name
    if throwaway and args.detach:
        raise UsageError("run -d needs an image or a --name: a nameless --lower container is thrown away")
    needs_store = not throwaway or any(m.kind == volumes.VOLUME for m in requested)
    store = Store(root_from(args.root)) if needs_store else None
    image, lowers, command, config = _what_to_run(args, store)
    to_run = _process(args, command, config, confined)
    try:
        process.find_user_in_layers(to_run.user, None, lowers)
    except LayerfsError as e:
        print(f"layerfs: run: {e}", file=sys.stderr)
        return 125  # as docker run says it
    name = args.name or f"run-{uuid.uuid4().hex[:8]}"
    if throwaway:
        return _run_throwaway(lowers, to_run, _Asked(name, requested, limits, store))
    assert store is not None
    if image:
        store.create(name, image)
    else:
        store.create_on_dirs(name, lowers)
    return lifecycle.launch(store, name, args, run_stored)


def run_stored(store: Store, name: str, args: argparse.Namespace, started: Callable[[int], None]) -> int:
    """(In the shim.) Container ``name`` of the store run as ``run``'s flags ``args`` say (as given, or
    as ``start`` finds them kept)."""
    record = store.containers.get(name)
    if record is None:
        raise LayerfsError(f"no container {name!r}")
    _, _, command, config = _what_to_run(args, store)
    to_run = _process(args, command, config, Confinement.from_flags(args.cap_add, args.cap_drop, args.privileged))
    requested = _same_volumes(volumes.parse(args.volume, args.mount, args.tmpfs), record.get("mounts") or [])
    limits = cgroups.Limits.from_run_flags(args)
    asked = _Asked(name, requested, limits, store, lifecycle.cleanup_command(store, name))
    store.update_container(name, command=to_run.argv)

    def keep(paths: list[str], mounts: list[dict]) -> None:
        store.add_runtime_paths(name, paths)
        store.update_container(name, mounts=mounts)

    lowers, upper, work, merged = record["lowers"], record["upper"], record["work"], record["merged"]
    # (what a killed shim leaves of the runtime's files goes with the container)
    return _run(lowers, upper, work, merged, to_run, asked, keep, started, store.containers.dir(name))


def _same_volumes(requested: list[volumes.Mount], had: list[dict]) -> list[volumes.Mount]:
    """The anonymous volumes a container started again had before (its record's mounts), not new ones,
    as docker starts it."""
    names = {m["Destination"]: m["Name"] for m in had if m.get("Type") == volumes.VOLUME and m.get("Name")}
    return [
        replace(m, source=names.get(m.target, "")) if m.kind == volumes.VOLUME and not m.source else m
        for m in requested
    ]


def container_hostname(args: argparse.Namespace) -> str:
    return args.hostname or (args.name or "layerfs")[:63]


def _process(args: argparse.Namespace, command: list[str], config: dict, confined: Confinement) -> shim.Process:
    hostname = container_hostname(args)
    return shim.Process(
        process.argv(config, command, args.entrypoint),
        process.environment(config, args.env, args.env_file, hostname),
        process.workdir(config, args.workdir),
        args.user or config.get("User") or "",
        hostname,
        network=args.net == "host",
        confinement=confined,
        read_only=args.read_only,
        stdin=args.interactive,
        tty=args.tty,
        init=args.init,
    )


def _what_to_run(args: argparse.Namespace, store: Store | None) -> tuple[str | None, list[str], list[str], dict]:
    """The image (None for ``--lower``), the lower directories, the command given and the image's config."""
    words = list(args.args)
    if args.lower:
        return None, [os.path.abspath(p) for p in args.lower], words[1:] if words[:1] == ["--"] else words, {}
    if not words or store is None:
        raise UsageError("run what? give an IMAGE (or --lower DIR) and a command")
    image, command = words[0], words[1:]
    config = store.images.record(image).get("config", {}).get("config") or {}
    return image, store.images.lowerdirs(image), command[1:] if command[:1] == ["--"] else command, config


@dataclass
class _Asked:
    """What a run asks for beside its process, under the container's name: its volumes (made in the store,
    if it has one), its limits, and what the rootfs's daemon runs if the shim is killed under it."""

    name: str
    mounts: list[volumes.Mount]
    limits: cgroups.Limits
    store: Store | None
    exit_command: list[str] = field(default_factory=list)


def _run_throwaway(lowers: list[str], to_run: shim.Process, asked: _Asked) -> int:
    """A container of plain lower directories with no name: a throwaway upper, nothing kept (its anonymous
    volumes neither)."""
    where = tempfile.mkdtemp(prefix="layerfs-run-")
    mounted: list[dict] = []
    try:
        upper, work, merged = (os.path.join(where, d) for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.mkdir(d)
        return _run(lowers, upper, work, merged, to_run, asked, lambda _, mounts: mounted.extend(mounts))
    finally:
        shutil.rmtree(where, ignore_errors=True)
        for volume in (m["Name"] for m in mounted if "Name" in m):
            if asked.store is not None and asked.store.volumes.is_anonymous(volume):
                asked.store.remove_volume(volume)


def _run(
    lowers: list[str],
    upper: str,
    work: str,
    merged: str,
    to_run: shim.Process,
    asked: _Asked,
    keep: Callable[[list[str], list[dict]], None],
    started: Callable[[int], None] = lambda pid: None,
    runtime_in: str | None = None,
) -> int:
    """Mount the rootfs, make it ready (the runtime's files and mount points, the volumes: ``keep`` is told
    the paths made and the volumes mounted), run the process in its cgroup, unmount."""
    owner: dict[str, object] = {"x_layerfs_owner": os.getpid()}
    if asked.exit_command:
        owner["x_layerfs_exit_command"] = asked.exit_command
    mount_options = options.for_dirs(lowers, upper, work, **owner)
    if mount.mount(options.parse([mount_options], merged)) != 0:
        return 125
    runtime = tempfile.mkdtemp(prefix="layerfs-runtime-", dir=runtime_in)
    try:
        to_run.binds, files = shim.runtime_files(merged, runtime, to_run.hostname, to_run.network)
        made = shim.make_mount_points(merged) + files
        prepared = volumes.prepare(merged, asked.mounts, asked.store)
        to_run.mounts = prepared.mounts
        keep(made + prepared.made, prepared.described)
        if not asked.limits.controllers():
            return shim.run(merged, to_run, started)
        cgroup = cgroups.Cgroup(asked.name, asked.limits)
        try:
            to_run.cgroups = cgroup.dirs
            return shim.run(merged, to_run, started)
        finally:
            cgroup.remove()
    finally:
        mount.umount(merged)
        shutil.rmtree(runtime, ignore_errors=True)
