"""The ``layerfs`` command.

It also answers fuse-overlayfs's calling convention, ``layerfs [-f] [-d] -o OPTIONS MOUNTPOINT`` and
``layerfs --version``, which is how containers-storage runs a ``mount_program``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import LayerfsError, UsageError

COMMANDS = ("mount", "umount", "diff", "example")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerfs", description="A layered copy-on-write filesystem for containers.")
    parser.add_argument("--version", action="version", version=f"layerfs version {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount lower layers under an upper layer",
                       usage="layerfs mount [-f] [--debug] -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="lowerdir=DIR[:DIR...] (leftmost on top), upperdir=DIR, workdir=DIR, volatile, ro")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", "--debug", action="store_true", help="log every operation (implies nothing else)")
    m.add_argument("mountpoint", nargs="?")

    u = sub.add_parser("umount", help="unmount a layerfs mount (a dead one too)")
    u.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")
    u.add_argument("mountpoint")
    u.add_argument("--debug", action="store_true")

    d = sub.add_parser("diff", help="list a container's changes (A added, C changed, D deleted), as docker diff does",
                       usage="layerfs diff [--json] [--all] MOUNTPOINT [PATH]\n"
                             "       layerfs diff [--json] [--all] --upperdir U --lowerdir L1:L2 [--workdir W] [PATH]")
    d.add_argument("target", nargs="?", metavar="MOUNTPOINT", help="a running layerfs mount")
    d.add_argument("path", nargs="?", metavar="PATH", help="only this path and what is below it")
    d.add_argument("--upperdir", help="the upper layer of an unmounted container")
    d.add_argument("--lowerdir", help="its lower layers, leftmost on top")
    d.add_argument("--workdir", help="its work directory (where layerfs keeps its change index)")
    d.add_argument("--json", action="store_true", help='[{"Path": ..., "Kind": 0|1|2}], as Docker\'s API')
    d.add_argument("--all", action="store_true",
                   help="also files copied up that ended identical to the lower ones (content, mode, owner, xattrs)")
    d.add_argument("--debug", action="store_true")

    e = sub.add_parser("example", help="build a small layered busybox rootfs, run a command in it, show its changes")
    e.add_argument("--dir", help="build in DIR and keep it (default: a temporary directory, removed after)")
    e.add_argument("--debug", action="store_true")
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """fuse-overlayfs form: no command word, options first."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        return ["mount"] + argv
    return argv


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_normalise(list(sys.argv[1:] if argv is None else argv)))
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="layerfs: %(message)s")
    try:
        return _run(args)
    except LayerfsError as e:
        if debug:
            logging.exception("details")
        print(f"layerfs: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:
        if debug:
            logging.exception("details")
        where = f"{e.filename}: " if e.filename else ""
        print(f"layerfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "mount":
        from . import mount, options

        config = options.parse(args.options, args.mountpoint)
        for warning in config.warnings:
            print(f"layerfs: warning: {warning}", file=sys.stderr)
        return mount.mount(config, foreground=args.foreground, debug=args.debug)
    if args.command == "umount":
        from . import mount

        mount.umount(args.mountpoint, lazy=args.lazy)
        return 0
    if args.command == "diff":
        from . import diff

        if args.upperdir is not None:
            if args.lowerdir is None:
                raise UsageError("--upperdir needs --lowerdir")
            if args.path is not None:
                raise UsageError("give either a mount point or --upperdir, not both")
            container, under = diff.of_dirs(args.lowerdir, args.upperdir, args.workdir), args.target or "/"
        elif args.target is None:
            raise UsageError("diff of what? give a mount point, or --upperdir and --lowerdir")
        else:
            container, under = diff.of_mount(args.target), args.path or "/"
        found = diff.container_changes(container, under=under, unchanged_copies=args.all)
        sys.stdout.write(diff.render(found, as_json=args.json))
        return 0
    if args.command == "example":
        from . import example

        return example.main(args.dir)
    _parser().print_help(sys.stderr)
    return 2
