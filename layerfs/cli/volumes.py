"""``layerfs volume ls|create|rm|inspect|prune``: the store's volumes, as ``docker volume`` shows them."""

from __future__ import annotations

import argparse
import json
import sys

from .dispatch import Commands

COMMANDS = ("volume",)


def add_parsers(sub: Commands, root_help: str) -> None:
    volume = sub.add_parser("volume", help="the store's named and anonymous volumes (ls, create, rm, inspect, prune)")
    actions = volume.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--root", metavar="DIR", help=root_help)
        p.add_argument("--debug", action="store_true")
        return p

    action("ls", "list them (DRIVER, VOLUME NAME)").add_argument(
        "-q", "--quiet", action="store_true", help="their names only"
    )
    action("create", "make a named volume (a new anonymous one without a name)").add_argument("name", nargs="?")
    action("rm", "remove volumes no container has").add_argument("names", nargs="+", metavar="NAME")
    action("inspect", "volumes as JSON").add_argument("names", nargs="+", metavar="NAME")
    action("prune", "remove the anonymous volumes no container has").add_argument(
        "-a", "--all", action="store_true", help="the named ones too"
    )


def run(args: argparse.Namespace) -> int:
    import secrets

    from ..errors import LayerfsError
    from ..store import Store, root_from
    from .tables import table

    store = Store(root_from(args.root))
    if args.action == "ls":
        names = store.volumes.names()
        sys.stdout.write(
            "".join(f"{n}\n" for n in names)
            if args.quiet
            else table(["DRIVER", "VOLUME NAME"], [["local", n] for n in names])
        )
    elif args.action == "create":
        print(store.volume(args.name or secrets.token_hex(32))[0])  # (docker names it so; it is no anonymous one)
    elif args.action == "rm":
        for name in args.names:
            store.remove_volume(name)
            print(name)
    elif args.action == "inspect":
        found = [store.volumes.get(name) for name in args.names]
        missing = [name for name, volume in zip(args.names, found, strict=True) if volume is None]
        if missing:
            raise LayerfsError(f"no such volume: {missing[0]}")
        print(json.dumps(found, indent=4))
    else:
        removed = store.prune_volumes(named_too=args.all)
        print("".join(f"{name}\n" for name in removed) + f"{len(removed)} volumes removed")
    return 0
