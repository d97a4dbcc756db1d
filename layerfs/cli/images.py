"""The image commands: import/load, save, images, tag, history, and the registry's pull, push, login, logout."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import LayerfsError, UsageError
from .dispatch import Commands

COMMANDS = ("import", "load", "save", "images", "tag", "history", "pull", "push", "login", "logout")
_PREFIXES = ("oci", "oci-archive", "docker-archive", "rootfs")
_SAVE_FORMATS = {"oci": "oci", "oci-dir": "oci", "oci-archive": "oci-archive", "docker-archive": "docker-archive"}


def _tls(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: true or false")
    return text.lower() in ("true", "1")


def add_parsers(sub: Commands, root_help: str) -> None:
    def parser(name: str, help_text: str, usage: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, usage=usage)
        p.add_argument("--root", metavar="DIR", help=root_help)
        p.add_argument("--debug", action="store_true")
        return p

    def tls(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tls-verify",
            type=_tls,
            nargs="?",
            const=True,
            default=True,
            metavar="BOOL",
            help="check the registry's certificate (false: also plain http, as podman does)",
        )

    i = parser(
        "import",
        "import an image into the store: an OCI layout or archive, a docker archive, a rootfs tar",
        "layerfs import [--root DIR] [oci:|oci-archive:|docker-archive:|rootfs:]FILE[:TAG] [NAME[:TAG]]",
    )
    i.add_argument(
        "source",
        metavar="SOURCE",
        help="a file or directory (what it is is found out), or "
        "oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], rootfs:FILE.tar",
    )
    i.add_argument("name", nargs="?", help="the name to give it (default: the name in the archive, else the file's)")
    i = parser(
        "load",
        "import an image file (podman load): what it is is found out",
        "layerfs load [--root DIR] -i FILE [NAME[:TAG]]",
    )
    i.add_argument("-i", "--input", dest="source", required=True, metavar="FILE")
    i.add_argument("name", nargs="?")

    v = parser(
        "save",
        "write an image of the store with its own bytes: OCI layout, OCI archive or docker archive",
        "layerfs save [--root DIR] [--format docker-archive|oci-archive|oci] IMAGE (-o DEST | DEST)",
    )
    v.add_argument("name", metavar="IMAGE")
    v.add_argument(
        "destination",
        nargs="?",
        metavar="DEST",
        help="a path, or oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE",
    )
    v.add_argument("-o", "--output", metavar="DEST")
    v.add_argument(
        "--format",
        choices=sorted(_SAVE_FORMATS),
        default="docker-archive",
        help="for a DEST without a prefix (default docker-archive, as docker save and podman save)",
    )

    g = parser("images", "list the store's images", "layerfs images [--root DIR] [-q] [--lowerdir IMAGE]")
    g.add_argument("--lowerdir", metavar="IMAGE", help="print the lowerdir= list that mounts IMAGE")
    g.add_argument("-q", "--quiet", action="store_true", help="the images' ids only")

    t = parser("tag", "give an image another name", "layerfs tag [--root DIR] IMAGE NAME[:TAG]")
    t.add_argument("name", metavar="IMAGE")
    t.add_argument("new", metavar="NAME[:TAG]")

    h = parser("history", "an image's history, as docker history shows it", "layerfs history [--root DIR] IMAGE")
    h.add_argument("name", metavar="IMAGE")
    h.add_argument("--no-trunc", action="store_true", help="the commands whole")

    p = parser(
        "pull",
        "pull an image from a registry into the store",
        "layerfs pull [--root DIR] [--tls-verify=false] [--platform OS/ARCH] REF",
    )
    p.add_argument("reference", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform image (default: this host's)")
    tls(p)

    u = parser(
        "push",
        "push an image of the store to a registry, its bytes unchanged",
        "layerfs push [--root DIR] [--tls-verify=false] IMAGE [REF]",
    )
    u.add_argument("name", metavar="IMAGE")
    u.add_argument("reference", nargs="?", metavar="REF", help="where to (default: the image's own name)")
    tls(u)

    n = parser(
        "login",
        "check credentials against a registry and keep them (where podman keeps its own)",
        "layerfs login [-u USER] [-p PASSWORD | --password-stdin] [--tls-verify=false] REGISTRY",
    )
    n.add_argument("registry", metavar="REGISTRY")
    n.add_argument("-u", "--username")
    n.add_argument("-p", "--password")
    n.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    tls(n)
    o = parser("logout", "forget the credentials kept for a registry", "layerfs logout REGISTRY")
    o.add_argument("registry", metavar="REGISTRY")


def run(args: argparse.Namespace) -> int:
    from ..progress import on_terminal
    from ..store import Store, root_from

    if args.command in ("login", "logout"):
        return _login(args) if args.command == "login" else _logout(args)
    store = Store(root_from(args.root))
    if args.command in ("import", "load"):
        kind, where, tag = _source(args.source)
        with on_terminal() as progress:
            name, record = store.import_image(kind, where, tag, args.name, progress=progress)
        print(f"{name}\n{len(record['layers'])} layers, config {record['config_digest']}")
    elif args.command == "save":
        kind, dest, tag = _destination(args)
        print(store.save(args.name, kind, dest, tag))
    elif args.command == "images":
        if args.lowerdir:
            print(":".join(store.images.lowerdirs(args.lowerdir)))
            return 0
        sys.stdout.write(_images(store, quiet=args.quiet))
    elif args.command == "tag":
        print(store.tag(args.name, args.new))
    elif args.command == "history":
        sys.stdout.write(_history(store, args.name, truncate=not args.no_trunc))
    elif args.command == "pull":
        with on_terminal() as progress:
            name, record = store.pull(
                args.reference, platform=args.platform, tls_verify=args.tls_verify, progress=progress
            )
        print(f"Digest: {record['manifest']}\n{name}")
    elif args.command == "push":
        with on_terminal() as progress:
            pushed = store.push(args.name, args.reference, tls_verify=args.tls_verify, progress=progress)
        print(
            f"Digest: {pushed.manifest_digest}\nblobs: {len(pushed.uploaded)} uploaded, {len(pushed.mounted)} "
            f"mounted, {len(pushed.present)} there already"
        )
    return 0


def _split_tag(reference: str) -> tuple[str, str | None]:
    """``DIR:TAG`` -> (DIR, TAG); a colon inside the directory's path is not a tag."""
    where, colon, tag = reference.rpartition(":")
    if colon and where and "/" not in tag:
        return where, tag
    return reference, None


def _source(source: str) -> tuple[str, str, str | None]:
    """What to import: (kind, path, tag), from a prefix or, without one, from what the file is."""
    from ..store.images import kind_of

    kind, colon, reference = source.partition(":")
    if colon and kind in _PREFIXES:
        if kind == "rootfs":
            return kind, reference, None
        if kind == "docker-archive":
            archive, _, name = reference.partition(":")
            return kind, archive, name or None
        return (kind, *_split_tag(reference))
    if not os.path.exists(source):
        where, tag = _split_tag(source)
        if os.path.isdir(where):
            return "oci", where, tag
        raise UsageError(f"{source}: no such file or directory")
    return kind_of(source), source, None


def _destination(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """Where ``save`` writes: (format, path, tag)."""
    dest = args.output or args.destination
    if not dest or (args.output and args.destination):
        raise UsageError("save it where? give DEST or -o DEST (one of them)")
    kind, colon, reference = dest.partition(":")
    if colon and kind in _SAVE_FORMATS:
        return (
            (_SAVE_FORMATS[kind], *_split_tag(reference))
            if kind != "docker-archive"
            else ("docker-archive", reference, None)
        )
    return _SAVE_FORMATS[args.format], dest, None


def _login(args: argparse.Namespace) -> int:
    from ..distribution.auth import Credentials, store_login
    from ..distribution.client import RegistryClient

    registry = args.registry.split("://", 1)[-1].split("/", 1)[0]
    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass("Password: ") if args.password is None else args.password
    if not username or not password:
        raise UsageError("a login needs a user name and a password")
    credentials = Credentials(username, password)
    with RegistryClient(registry, credentials, tls_verify=args.tls_verify) as client:
        client.request("GET", "/v2/", scope="", what="login")
    store_login(registry, credentials)
    print("Login Succeeded!")
    return 0


def _logout(args: argparse.Namespace) -> int:
    from ..distribution.auth import forget_login, login_file

    registry = args.registry.split("://", 1)[-1].split("/", 1)[0]
    if not forget_login(registry):
        raise LayerfsError(f"not logged in to {registry} (in {login_file()})")
    print(f"Removed login credentials for {registry}")
    return 0


def _images(store, *, quiet: bool) -> str:  # noqa: ANN001 (a Store: imported lazily)
    """docker images' table (the repository by its full name, as podman shows it), or the ids alone."""
    from ..distribution.reference import parse_reference
    from .tables import ago, human_size, table, tree_size

    sizes: dict[str, int] = {}  # (a layer's size once, however many images share it)
    rows = []
    for name, image in sorted(store.images.all().items()):
        ref = parse_reference(name)
        for diff_id in image["layers"]:
            if diff_id not in sizes:
                sizes[diff_id] = tree_size(store.layers.path(diff_id))
        rows.append(
            [
                ref.name,
                ref.tag or "<none>",
                image["config_digest"].removeprefix("sha256:")[:12],
                ago(image["config"].get("created")),
                human_size(sum(sizes[d] for d in image["layers"])),
            ]
        )
    if quiet:
        return "".join(f"{row[2]}\n" for row in rows)
    return table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows)


def _history(store, name: str, *, truncate: bool) -> str:  # noqa: ANN001 (a Store: imported lazily)
    """docker history's table: newest first, the image's id on the top row, each layer's size."""
    from .tables import ago, human_size, table, tree_size

    record = store.images.record(name)
    history = record["config"].get("history") or [{} for _ in record["layers"]]
    sizes = [tree_size(store.layers.path(d)) for d in record["layers"]]
    rows = []
    for entry in history:
        size = 0 if entry.get("empty_layer") or not sizes else sizes.pop(0)
        created_by = " ".join(str(entry.get("created_by", "")).split())
        if truncate and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        rows.append(
            ["<missing>", ago(entry.get("created")), created_by, human_size(size), str(entry.get("comment", ""))]
        )
    rows.reverse()
    if rows:
        rows[0][0] = record["config_digest"].removeprefix("sha256:")[:12]
    return table(["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"], rows)
