"""The ``layerfs`` command.

It also answers fuse-overlayfs's calling convention, ``layerfs [-f] [-d] -o OPTIONS MOUNTPOINT`` and
``layerfs --version``, which is how containers-storage runs a ``mount_program``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import LayerfsError, UsageError, log_to_stderr
from . import build, dispatch, images, lifecycle, snapshotter, volumes

if TYPE_CHECKING:
    from ..store import Store

COMMANDS = (
    (
        "mount",
        "umount",
        "stats",
        "diff",
        "export",
        "commit",
        "create",
        "rm",
        "rmi",
        "layers",
        "gc",
        "inspect",
        "run",
        "ps",
        "bundle",
        "example",
    )
    + images.COMMANDS
    + volumes.COMMANDS
    + build.COMMANDS
    + lifecycle.COMMANDS
    + snapshotter.COMMANDS
)
_ROOT_HELP = "the store (default $LAYERFS_ROOT, else /var/lib/layerfs, or $XDG_DATA_HOME/layerfs without root)"


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``command``, for that command only."""
    parser = argparse.ArgumentParser(prog="layerfs", description="A layered copy-on-write filesystem for containers.")
    parser.add_argument("--version", action="version", version=f"layerfs version {__version__}")
    sub = dispatch.Commands(parser.add_subparsers(dest="command", metavar="COMMAND"), command)

    m = sub.add_parser(
        "mount",
        help="mount lower layers under an upper layer, or a container of the store",
        usage="layerfs mount [-f] [--debug] -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT\n"
        "       layerfs mount [--root DIR] CONTAINER [MOUNTPOINT]",
    )
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="lowerdir=DIR[:DIR...] (leftmost on top), upperdir=DIR, workdir=DIR, volatile, ro",
    )
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", "--debug", action="store_true", help="log every operation (implies nothing else)")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("container_mountpoint", nargs="?", help=argparse.SUPPRESS)
    m.add_argument("--root", metavar="DIR", help=_ROOT_HELP)

    u = sub.add_parser("umount", help="unmount a layerfs mount (a dead one too)")
    u.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")
    u.add_argument("mountpoint")
    u.add_argument("--debug", action="store_true")

    t = sub.add_parser("stats", help="what a running mount's daemon has served: requests by operation and their time")
    t.add_argument("mountpoint")
    t.add_argument("--json", action="store_true", help="the daemon's figures as they are")

    d = sub.add_parser(
        "diff",
        help="list a container's changes (A added, C changed, D deleted), as docker diff does",
        usage="layerfs diff [--json] [--all] MOUNTPOINT [PATH]\n"
        "       layerfs diff [--json] [--all] --upperdir U --lowerdir L1:L2 [--workdir W] [PATH]",
    )
    d.add_argument("target", nargs="?", metavar="MOUNTPOINT", help="a running layerfs mount")
    d.add_argument("path", nargs="?", metavar="PATH", help="only this path and what is below it")
    d.add_argument("--json", action="store_true", help='[{"Path": ..., "Kind": 0|1|2}], as Docker\'s API')
    _container_arguments(d)

    x = sub.add_parser(
        "export",
        help="write a container's changes as an OCI image layer (tar)",
        usage="layerfs export [--gzip] [--clamp-mtime SECONDS] -o FILE MOUNTPOINT\n"
        "       layerfs export [--gzip] -o FILE --upperdir U --lowerdir L1:L2 [--workdir W]",
    )
    x.add_argument("target", nargs="?", metavar="MOUNTPOINT", help="a running layerfs mount")
    x.add_argument("-o", "--output", required=True, metavar="FILE", help="the layer file (- for standard output)")
    x.add_argument("--gzip", action="store_true", help="compress (the digest is then of the compressed bytes)")
    x.add_argument(
        "--clamp-mtime",
        type=float,
        metavar="SECONDS",
        help="no mtime later than this (seconds since the epoch), for reproducible layers",
    )
    _container_arguments(x)

    c = sub.add_parser(
        "commit",
        help="freeze a container's changes into a read-only layer, usable as a lowerdir",
        usage="layerfs commit [--root DIR] MOUNTPOINT\n"
        "       layerfs commit [--root DIR] --upperdir U --lowerdir L1:L2 [--workdir W]",
    )
    c.add_argument("target", nargs="?", metavar="CONTAINER|MOUNTPOINT", help="a container, or a running mount")
    c.add_argument("image", nargs="?", metavar="IMAGE[:TAG]", help="record it as a new image (a container's only)")
    c.add_argument(
        "--share",
        default="reflink",
        choices=("reflink", "hardlink", "none"),
        help="how alike files share their data in the store: reflink (invisible; none on ext4), "
        "hardlink (everywhere, but st_nlink shows it), none",
    )
    _container_arguments(c)

    n = sub.add_parser(
        "create", help="make a container of an image", usage="layerfs create [--root DIR] --name C IMAGE"
    )
    n.add_argument("--name", required=True)
    n.add_argument("image")
    n.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    n.add_argument("--debug", action="store_true")

    x = sub.add_parser(
        "run",
        help="run a command in a container of an image (or of lower dirs)",
        usage="layerfs run [--root DIR] [--name C] [--rm] [-d] [-i] [-t] [--init] [-e K[=V]] [--env-file FILE] "
        "[-w DIR] [-u USER[:GROUP]] [--entrypoint CMD] "
        "[--hostname H] [--net host|none] [--cap-add CAP] [--cap-drop CAP] [--privileged] "
        "[-v [SRC:]DEST[:ro]] [--mount type=...] [--tmpfs DEST] [--read-only] "
        "[-m BYTES] [--pids-limit N] [--cpus N] "
        "IMAGE|--lower DIR... [--] [CMD ARGS...]",
    )
    x.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    x.add_argument("--name", help="the container's name (default: run-<random>)")
    x.add_argument("--rm", action="store_true", help="remove the container when the command ends")
    x.add_argument("-d", "--detach", action="store_true", help="in the background: print its name, keep its output")
    x.add_argument("-i", "--interactive", action="store_true", help="standard input to the container")
    x.add_argument("-t", "--tty", action="store_true", help="a terminal of the container's own")
    x.add_argument("--init", action="store_true", help="a minimal init as PID 1: passes signals on, reaps")
    _process_arguments(x)
    x.add_argument("--hostname")
    x.add_argument("--net", choices=("host", "none"), default="host")
    x.add_argument("--lower", action="append", metavar="DIR", help="plain lower dirs instead of an image (top first)")
    x.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="[SRC:]DEST[:ro]",
        help="a host directory (absolute SRC), a named volume (SRC a name) or an anonymous one (no SRC)",
    )
    x.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="type=bind|volume|tmpfs,...",
        help="source=, target=, readonly, volume-nocopy, tmpfs-size=, tmpfs-mode=",
    )
    x.add_argument(
        "--tmpfs", action="append", default=[], metavar="DEST[:OPTIONS]", help="a tmpfs (noexec,nosuid,nodev)"
    )
    x.add_argument("-m", "--memory", metavar="BYTES", help="a memory limit (b, k, m, g), through the host's cgroups")
    x.add_argument("--pids-limit", type=int, metavar="N", help="at most N processes (0 or -1: no limit)")
    x.add_argument("--cpus", metavar="N", help="at most N CPUs' time (0.5: half of one)")
    x.add_argument("--read-only", action="store_true", help="the rootfs read-only (its volumes and /dev as they are)")
    x.add_argument("--cap-add", action="append", default=[], metavar="CAP", help="keep a capability (or ALL)")
    x.add_argument("--cap-drop", action="append", default=[], metavar="CAP", help="drop a capability (or ALL)")
    x.add_argument(
        "--privileged",
        action="store_true",
        help="no confinement: every capability, no seccomp, /proc and /sys unmasked",
    )
    x.add_argument("--debug", action="store_true")
    x.add_argument("args", nargs=argparse.REMAINDER, metavar="IMAGE [CMD ...]")

    b = sub.add_parser(
        "bundle",
        help="an OCI runtime bundle (for runc) whose rootfs is a container's mount",
        usage="layerfs bundle [--root DIR] [-e K[=V]] [--env-file FILE] [-w DIR] [-u USER[:GROUP]] "
        "[--entrypoint CMD] CONTAINER DIR [-- CMD ARGS...]",
    )
    _process_arguments(b)
    b.add_argument("name", metavar="CONTAINER")
    b.add_argument("directory", metavar="DIR")
    b.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    b.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    b.add_argument("--debug", action="store_true")

    images.add_parsers(sub, _ROOT_HELP)
    volumes.add_parsers(sub, _ROOT_HELP)
    build.add_parsers(sub, _ROOT_HELP)
    lifecycle.add_parsers(sub, _ROOT_HELP)
    snapshotter.add_parsers(sub)
    for command, help_text, argument in (
        ("rmi", "remove an image no container uses (its layers stay until gc)", "name"),
        ("inspect", "an image or container of the store, as JSON", "name"),
        ("layers", "the store's layers and what uses each", None),
        ("gc", "remove the layers no image or container uses", None),
        ("ps", "the store's containers in docker's columns (running ones unless -a)", None),
    ):
        p = sub.add_parser(command, help=help_text)
        if argument:
            p.add_argument(argument)
        p.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
        p.add_argument("--debug", action="store_true")
        if command == "ps":
            p.add_argument("-a", "--all", action="store_true", help="stopped containers too")
            p.add_argument("-q", "--quiet", action="store_true", help="their ids only")

    e = sub.add_parser(
        "example", help="import a small layered busybox image, run a command in it, show its diff, commit it"
    )
    e.add_argument("--dir", help="build in DIR and keep it (default: a temporary directory, removed after)")
    e.add_argument("--debug", action="store_true")
    return parser


def _process_arguments(p: argparse.ArgumentParser) -> None:
    """What a container's process is, beside the image's config (run's and bundle's)."""
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]", help="K alone: the host's value")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE", help="K=V or K lines, # comments")
    p.add_argument("-w", "--workdir", metavar="DIR", help="the command's working directory (made if missing)")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="a name or number (the container's /etc/passwd)")
    p.add_argument("--entrypoint", metavar="CMD", help="instead of the image's Entrypoint (and Cmd); '' clears it")


def _container_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    p.add_argument("--upperdir", help="the upper layer of an unmounted container")
    p.add_argument("--lowerdir", help="its lower layers, leftmost on top")
    p.add_argument("--workdir", help="its work directory (where layerfs keeps its change index)")
    p.add_argument(
        "--all",
        action="store_true",
        help="also files copied up that ended identical to the lower ones (content, mode, owner, xattrs)",
    )
    p.add_argument("--debug", action="store_true")


def _container(args: argparse.Namespace, *, path_argument: bool):
    """The container the diff or export arguments name, and the path the diff is limited to."""
    from .. import container

    if args.upperdir is not None:
        if args.lowerdir is None:
            raise UsageError("--upperdir needs --lowerdir")
        if path_argument and args.path is not None:
            raise UsageError("give either a mount point or --upperdir, not both")
        return container.of_dirs(args.lowerdir, args.upperdir, args.workdir), (
            args.target or "/"
        ) if path_argument else "/"
    if args.target is None:
        raise UsageError(f"{args.command} of what? give a mount point, or --upperdir and --lowerdir")
    from ..store import root_from

    return container.of_name_or_mount(args.target, root_from(args.root)), (args.path or "/") if path_argument else "/"


def _store(args: argparse.Namespace) -> Store:
    from ..store import Store, root_from

    return Store(root_from(args.root))


def _advice(e: LayerfsError) -> str:
    """What to do about a store's error, in this command line's words (the store says what is wrong)."""
    from ..store import ContainerMounted, ImageInUse, NoSuchImage

    for kind, advice in (
        (NoSuchImage, "layerfs images lists them"),
        (ImageInUse, "layerfs rm first"),
        (ContainerMounted, "layerfs umount it first"),
    ):
        if isinstance(e, kind):
            return f" ({advice})"
    return ""


def main(argv: list[str] | None = None) -> int:
    try:
        return _command(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        if not _stdout_closed_by_reader():
            raise
        return _quiet_end()


def _command(arguments: list[str]) -> int:
    try:
        arguments = dispatch.command_line(arguments, COMMANDS)
        command = arguments[0] if arguments and arguments[0] in COMMANDS else None
        args = _parser(command).parse_args(arguments)
    except UsageError as e:
        print(f"layerfs: {e}", file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    if debug:  # (else what logs sets logging up: the daemons; a cached build loads no logging)
        log_to_stderr(debug=True)
    try:
        code = _run(args)
        sys.stdout.flush()  # (a closed pipe is found here, not in an error at the interpreter's exit)
        return code
    except LayerfsError as e:
        if debug:
            _log_details()
        print(f"layerfs: {e}{_advice(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed_by_reader():
            raise  # (no error: main ends quietly)
        if debug:
            _log_details()
        where = f"{e.filename}: " if e.filename else ""
        print(f"layerfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130


def _log_details() -> None:
    """(--debug) The traceback of the error being handled."""
    import logging

    logging.exception("details")


def _stdout_closed_by_reader() -> bool:
    """Whether standard output is a pipe nobody reads any more (a write end polls as an error then)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _quiet_end() -> int:
    """Standard output's reader has gone (``layerfs inspect X | head -1``): end quietly, with the status
    of a command SIGPIPE ended, as cat's is in the same place."""
    # Python's advice: what is still buffered for the closed pipe goes nowhere, not into an error at
    # the interpreter's exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


@contextlib.contextmanager
def _output(path: str):
    """Standard output, or a file written beside its final name and moved there once complete."""
    from ..store.archives import atomic_file

    if path == "-":
        yield sys.stdout.buffer
        return
    with atomic_file(path) as out:
        yield out


# What reads or writes files with a container's owners: a plain user's runs in their user namespace
# (usernamespace.py). Containers need it; the others take it where the user has subordinate ids. (rm
# takes it once its containers are stopped: cli/lifecycle.py.)
_WITH_CONTAINER_OWNERS = frozenset("run start create diff commit export build import load pull rmi gc volume".split())


def _run(args: argparse.Namespace) -> int:
    if args.command in _WITH_CONTAINER_OWNERS and os.geteuid() != 0:  # (root needs none: none imported)
        from .. import usernamespace

        usernamespace.enter_as_needed(required=args.command in ("run", "start"))
    if args.command == "mount":
        from ..fs import mount, options

        if not args.options and args.mountpoint:  # a container of the store
            record = _store(args).containers.get(args.mountpoint)
            if record is None:
                raise UsageError(f"{args.mountpoint}: no such container (or give -o lowerdir=...)")
            args.options = [options.for_dirs(record["lowers"], record["upper"], record["work"])]
            args.mountpoint = args.container_mountpoint or record["merged"]
            # (kernel overlayfs and fuse-overlayfs mount over anything, and containers-storage relies on it
            # for -o; a container of the store over a directory's own files is a mistake)
            if os.path.isdir(args.mountpoint) and os.listdir(args.mountpoint):
                raise UsageError(f"{args.mountpoint}: mount point is not empty")
        elif args.container_mountpoint:
            raise UsageError(f"{args.container_mountpoint}: one mount point only")
        config = options.parse(args.options, args.mountpoint)
        for warning in config.warnings:
            print(f"layerfs: warning: {warning}", file=sys.stderr)
        return mount.mount(config, foreground=args.foreground, debug=args.debug)
    if args.command == "umount":
        from ..fs import mount

        mount.umount(args.mountpoint, lazy=args.lazy)
        return 0
    if args.command == "stats":
        from ..fs import mount

        report = mount.stats(args.mountpoint)
        sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else mount.render_stats(report))
        return 0
    if args.command == "diff":
        from .. import container

        target, under = _container(args, path_argument=True)
        found = container.container_changes(target, under=under, unchanged_copies=args.all)
        sys.stdout.write(container.render(found, as_json=args.json))
        return 0
    if args.command == "export":
        from .. import container
        from ..oci.layertar import write_layer
        from ..progress import on_terminal

        target, _ = _container(args, path_argument=False)
        found, upper = container.layer_changes(target, unchanged_copies=args.all)
        clamp = None if args.clamp_mtime is None else int(args.clamp_mtime * 1_000_000_000)
        with _output(args.output) as out, on_terminal() as progress:
            digests = write_layer(out, upper, found, compress=args.gzip, mtime_clamp_ns=clamp, progress=progress)
        where = sys.stderr if args.output == "-" else sys.stdout
        print(f"diff_id {digests.diff_id}\ndigest  {digests.digest}\nsize    {digests.size}", file=where)
        return 0
    if args.command == "commit":
        from .. import container
        from ..progress import on_terminal

        target, _ = _container(args, path_argument=False)
        store = _store(args)
        base = None
        if args.image:
            record = store.containers.get(args.target) if args.target else None
            if record is None:
                raise UsageError("a new image needs a container of the store to start from: layerfs commit C IMAGE")
            base = record["image"]
        found, upper = container.layer_changes(target, unchanged_copies=args.all)
        with on_terminal() as progress:
            committed = store.commit(
                upper, found, share=args.share, progress=progress, image=(args.image, base) if base else None
            )
        print(f"{committed.path}\ndiff_id {committed.diff_id}{'' if committed.new else ' (in the store already)'}")
        if base:
            print(f"image {store.images.key(args.image)}")
        return 0
    if args.command == "create":
        record = _store(args).create(args.name, args.image)
        print(record["name"])
        return 0
    if args.command == "run":
        from ..runtime import run

        return run.main(args)
    if args.command == "bundle":
        from ..runtime import bundle

        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        rootfs = bundle.write(_store(args), args.name, args.directory, command, args)
        print(f"{os.path.join(args.directory, 'config.json')}\n{rootfs} (layerfs umount it when done)")
        return 0
    if args.command in ("rmi", "inspect", "layers", "gc", "ps"):
        store = _store(args)
        if args.command == "rmi":
            store.remove_image(args.name)
        elif args.command == "inspect":
            # (a name with a slash is no container's: an image's full name)
            record = ("/" not in args.name and store.containers.get(args.name)) or store.images.find(args.name)
            if record is None:
                raise UsageError(f"{args.name}: no such image or container")
            print(json.dumps(record, indent=1, sort_keys=True))
        elif args.command == "ps":
            from . import ps

            sys.stdout.write(ps.render(store, everything=args.all, quiet=args.quiet))
        elif args.command == "layers":
            for diff_id, users in sorted(store.layer_users().items()):
                print(f"{diff_id}  {', '.join(users) or '(unused)'}")
        else:
            for diff_id in store.gc():
                print(f"removed {diff_id}")
        return 0
    if args.command in images.COMMANDS:
        return images.run(args)
    if args.command in volumes.COMMANDS:
        return volumes.run(args)
    if args.command in build.COMMANDS:
        return build.run(args)
    if args.command in lifecycle.COMMANDS or args.command == "rm":
        return lifecycle.run(args)
    if args.command in snapshotter.COMMANDS:
        return snapshotter.run(args)
    if args.command == "example":
        from .. import example

        return example.main(args.dir)
    _parser().print_help(sys.stderr)
    return 2
