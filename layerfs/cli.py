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

COMMANDS = ("mount", "umount", "example")


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
    if args.command == "example":
        from . import example

        return example.main(args.dir)
    _parser().print_help(sys.stderr)
    return 2
