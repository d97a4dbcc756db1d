"""``layerfs build``: an image from a Dockerfile (layerfs/build/)."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .dispatch import Commands

COMMANDS = ("build",)


def add_parsers(sub: Commands, root_help: str) -> None:
    b = sub.add_parser(
        "build",
        help="build an image from a Dockerfile, a layer per step, steps built before taken from the cache",
        usage="layerfs build [--root DIR] [-t NAME[:TAG]]... [-f Dockerfile] [--build-arg K=V]... "
        "[--target STAGE] [--no-cache] [--platform OS/ARCH] [--network none|host] CONTEXT",
    )
    b.add_argument("context", metavar="CONTEXT", help="the directory COPY and ADD take their files from")
    b.add_argument("-t", "--tag", dest="tags", action="append", default=[], metavar="NAME[:TAG]")
    b.add_argument(
        "-f", "--file", dest="dockerfile", metavar="FILE", help="the Dockerfile (default CONTEXT/Dockerfile)"
    )
    b.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="a value for an ARG")
    b.add_argument("--target", metavar="STAGE", help="build this stage (and what it needs), not the last")
    b.add_argument("--no-cache", action="store_true", help="build every step, even one built before")
    b.add_argument("--platform", metavar="OS/ARCH", help="the platform of images FROM pulls")
    b.add_argument("--network", choices=("none", "host"), default="none", help="RUN's network (default none)")
    b.add_argument("--root", metavar="DIR", help=root_help)
    b.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..build.builder import Builder, Options
    from ..store import Store, root_from

    build_args = {}
    for entry in args.build_arg:
        name, equals, value = entry.partition("=")
        if not name:
            raise UsageError(f"--build-arg {entry}: K=V expected")
        build_args[name] = value if equals else ""
    options = Options(
        args.context,
        args.dockerfile,
        args.tags,
        build_args,
        args.target,
        args.no_cache,
        args.platform,
        network=args.network == "host",
    )
    Builder(Store(root_from(args.root)), options).build()
    return 0
