"""The commands of a container's life: logs, start, stop, kill, wait, exec and rm (runtime/lifecycle.py)."""

from __future__ import annotations

import argparse
import sys

from .dispatch import Commands

# (and rm, which was there before them; cleanup is the rootfs daemon's, unlisted, as podman's container cleanup)
COMMANDS = ("logs", "start", "stop", "kill", "wait", "exec", "cleanup")


_USAGES = {
    "logs": (
        "what a detached container wrote",
        "layerfs logs [-f] [-t] [-n N] [--since TIME] [--until TIME] CONTAINER",
    ),
    "start": ("run a container that has ended again (the same upper)", "layerfs start [-a] CONTAINER"),
    "stop": ("the image's StopSignal (else SIGTERM), SIGKILL after a while", "layerfs stop [-t N] CONTAINER..."),
    "kill": ("signal a container's PID 1 (default SIGKILL)", "layerfs kill [-s SIGNAL] CONTAINER..."),
    "wait": ("wait until a container ends; print its exit code", "layerfs wait CONTAINER..."),
    "exec": (
        "run a command in a running container",
        "layerfs exec [-i] [-t] [-u USER[:GROUP]] [-e K[=V]] [-w DIR] CONTAINER CMD [ARGS...]",
    ),
    "rm": ("remove a container and its changes", "layerfs rm [-f] CONTAINER..."),
}


def add_parsers(sub: Commands, root_help: str) -> None:
    p = {name: sub.add_parser(name, help=help_text, usage=usage) for name, (help_text, usage) in _USAGES.items()}
    # (no help: unlisted)
    p["cleanup"] = sub.add_parser("cleanup", usage="layerfs cleanup CONTAINER (run by its rootfs's daemon)")
    for each in p.values():
        each.add_argument("--root", metavar="DIR", help=root_help)
        each.add_argument("--debug", action="store_true")
    p["logs"].add_argument("-f", "--follow", action="store_true", help="and what it writes, until it ends")
    p["logs"].add_argument("-t", "--timestamps", action="store_true", help="each line after its time")
    p["logs"].add_argument("-n", "--tail", default="all", metavar="N", help="the last N lines (default all)")
    times = "2026-12-08T04:45:00Z, a Unix time, or a duration before now (10m)"
    p["logs"].add_argument("--since", metavar="TIME", help=f"the lines written from TIME: {times}")
    p["logs"].add_argument("--until", metavar="TIME", help="the lines written up to TIME")
    p["start"].add_argument("-a", "--attach", action="store_true", help="in the foreground, its output here")
    p["stop"].add_argument("-t", "--time", type=float, metavar="N", help="seconds before SIGKILL (default 10)")
    p["kill"].add_argument("-s", "--signal", default="KILL", metavar="SIGNAL", help="a name (TERM, SIGTERM) or number")
    p["rm"].add_argument("-f", "--force", action="store_true", help="a running one too (killed first)")
    p["rm"].add_argument("-v", "--volumes", action="store_true", help="its anonymous volumes too")
    for name in ("logs", "start", "exec", "cleanup"):
        p[name].add_argument("name", metavar="CONTAINER")
    for name in ("stop", "kill", "wait", "rm"):
        p[name].add_argument("names", nargs="+", metavar="CONTAINER")
    x = p["exec"]
    x.add_argument("-i", "--interactive", action="store_true", help="standard input to the command")
    x.add_argument("-t", "--tty", action="store_true", help="a terminal of the container's own")
    x.add_argument("-u", "--user", metavar="USER[:GROUP]", help="default: the container's user")
    x.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]", help="K alone: the host's value")
    x.add_argument("-w", "--workdir", metavar="DIR", help="default: the container's working directory")
    x.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")


def run(args: argparse.Namespace) -> int:
    from .. import usernamespace
    from ..errors import UsageError
    from ..runtime import exec_into, lifecycle, logs
    from ..runtime import run as running
    from ..store import Store, root_from

    store = Store(root_from(args.root))
    if args.command == "logs":
        logs.show(store, args.name, _log_options(args), sys.stdout.buffer, sys.stderr.buffer)
    elif args.command == "start":
        return lifecycle.start(store, args.name, args.attach, running.run_stored)
    elif args.command == "cleanup":
        lifecycle.refresh(store, args.name)
    elif args.command == "exec":
        if not args.cmd:
            raise UsageError("exec what? give a CONTAINER and a command")
        return exec_into.main(store, args.name, args)
    elif args.command == "rm":
        if args.force:  # (first: a plain user may signal their containers, root of another namespace may not)
            for name in args.names:
                lifecycle.stop(store, name, 0)
        usernamespace.enter_as_needed(required=False)  # (their files have the containers' owners)
        for name in args.names:
            lifecycle.remove(store, name, args.force, args.volumes)
            print(name)
    else:
        signum = lifecycle.parse_signal(args.signal) if args.command == "kill" else 0
        for name in args.names:
            if args.command == "stop":
                lifecycle.stop(store, name, args.time)
            elif args.command == "kill":
                lifecycle.kill(store, name, signum)
            print(lifecycle.wait(store, name) if args.command == "wait" else name)
    return 0


def _log_options(args: argparse.Namespace):  # (a runtime.logs.Options: imported when logs runs)
    from ..runtime.logs import Options, parse_lines, parse_time

    since = None if args.since is None else parse_time(args.since, "--since")
    until = None if args.until is None else parse_time(args.until, "--until")
    return Options(args.timestamps, parse_lines(args.tail), since, until, args.follow)
