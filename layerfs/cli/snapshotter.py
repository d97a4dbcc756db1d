"""The snapshotter command: layerfs as containerd's proxy snapshotter."""

from __future__ import annotations

import argparse

from .dispatch import Commands

COMMANDS = ("snapshotter",)
_ADDRESS = "/run/layerfs/snapshotter.sock"
_ROOT = "/var/lib/layerfs/snapshotter"


def add_parsers(sub: Commands) -> None:
    p = sub.add_parser(
        "snapshotter",
        help="serve containerd's snapshots API on a unix socket (a proxy snapshotter plugin)",
        usage=f"layerfs snapshotter [--address SOCKET] [--root DIR] [--mount-helper]  (defaults: {_ADDRESS}, {_ROOT})",
    )
    p.add_argument("--address", default=_ADDRESS, metavar="SOCKET", help="the unix socket containerd is told of")
    p.add_argument("--root", default=_ROOT, metavar="DIR", help="where the snapshots and their records are")
    p.add_argument(
        "--mount-helper",
        action="store_true",
        help="hand containerd fuse3.layerfs mounts, which it mounts with mount.fuse3 (a daemon per mount, started"
        " by containerd), instead of bind mounts of the unions the snapshotter serves",
    )
    p.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..snapshotter.service import serve

    serve(args.address, args.root, helper_mounts=args.mount_helper)
    return 0
