"""What a container runs, by docker's rules: the image's config and ``layerfs run``'s flags made into the
command line, the environment, the user and the working directory.

A user is looked up in the container's own ``/etc/passwd`` and ``/etc/group`` (runc's rules: a name must
be there, a number need not be; the groups naming the user are its supplementary groups), so the lookup
runs inside the container, after pivot_root, where those files are the image's and nothing of the host's
is in reach.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..core import confined
from ..core.layer import Layer
from ..core.lookup import Resolver
from ..errors import LayerfsError, UsageError
from . import DEFAULT_PATH


def argv(config: dict, command: list[str], entrypoint: str | None = None) -> list[str]:
    """Entrypoint + Cmd. A command replaces the image's Cmd; ``--entrypoint`` replaces its Entrypoint and
    drops its Cmd ("" clears the Entrypoint)."""
    if entrypoint is None:
        first, default = config.get("Entrypoint") or [], config.get("Cmd") or []
    else:
        first, default = [entrypoint] if entrypoint else [], []
    words = first + (command or default)
    if not words:
        raise UsageError("no command given, and the image names none")
    return words


def environment(config: dict, flags: list[str], env_files: list[str], hostname: str) -> dict[str, str]:
    """The image's Env, then the env files', then ``-e``'s (``K`` alone: the host's value, if it has one);
    PATH if none names it, HOSTNAME unless one is given. (HOME depends on the user: see with_home.)"""
    env = {"HOSTNAME": hostname}
    env.update(_assignment(e) for e in config.get("Env") or [])
    for path in env_files:
        env.update(_host_valued(_env_file_lines(path)))
    env.update(_host_valued(flags))
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _assignment(entry: str) -> tuple[str, str]:
    key, _, value = entry.partition("=")
    return key, value


def _host_valued(entries: list[str]) -> dict[str, str]:
    """``K=V`` as given; ``K`` alone takes the host's value, and is left out if the host has none (docker)."""
    env = {}
    for entry in entries:
        if "=" in entry:
            key, value = _assignment(entry)
            env[key] = value
        elif entry in os.environ:
            env[entry] = os.environ[entry]
    return env


def _env_file_lines(path: str) -> list[str]:
    """docker's --env-file: a ``K=V`` or ``K`` a line; blank lines and ``#`` comments skipped."""
    try:
        with open(path) as f:
            lines = [line.lstrip().rstrip("\n") for line in f]
    except OSError as e:
        raise LayerfsError(f"--env-file {path}: {e.strerror}") from None
    return [line for line in lines if line and not line.startswith("#")]


def workdir(config: dict, flag: str | None) -> str:
    """``-w``, else the image's WorkingDir, else ``/``; an absolute path, as docker wants it."""
    path = flag or config.get("WorkingDir") or "/"
    if not os.path.isabs(path):
        raise UsageError(f"the working directory {path!r} is invalid: it needs to be an absolute path")
    return path


@dataclass
class User:
    uid: int
    gid: int
    groups: list[int]  # the supplementary groups: its own group and, unless a group is given, those naming it
    home: str


def find_user(spec: str, passwd: str = "/etc/passwd", group: str = "/etc/group") -> User:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` ("" is root) as runc finds it in the files given."""
    user_part, _, group_part = spec.partition(":")
    # name, password, uid, gid, gecos, home, shell (a line not of that form is passed over, as runc does)
    users = [u for u in _entries(passwd) if len(u) > 5 and u[2].isdigit() and u[3].isdigit()]
    if user_part.isdigit() or not user_part:
        uid = int(user_part or 0)
        entry = next((u for u in users if int(u[2]) == uid), None)
    else:
        entry = next((u for u in users if u[0] == user_part), None)
        if entry is None:
            raise LayerfsError(f"unable to find user {user_part}: no matching entries in passwd file")
        uid = int(entry[2])
    gid = int(entry[3]) if entry else 0
    home = entry[5] if entry else "/"
    groups = [g for g in _entries(group) if len(g) > 3 and g[2].isdigit()]  # name, password, gid, members
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            named = next((g for g in groups if g[0] == group_part), None)
            if named is None:
                raise LayerfsError(f"unable to find group {group_part}: no matching entries in group file")
            gid = int(named[2])
        return User(uid, gid, [gid], home)
    member_of = [int(g[2]) for g in groups if entry and entry[0] in g[3].split(",")]
    return User(uid, gid, sorted({gid, *member_of}), home)


def find_user_in_layers(spec: str, upper: str | None, lowers: list[str]) -> User:
    """``find_user`` in the /etc/passwd and /etc/group the layers show (``upper`` over ``lowers``), read
    through the union without a mount: to check a user before a container is made, and for a bundle, whose
    runtime wants the ids. A file the layers lack (or that is a symlink) counts as empty."""
    layers = ([Layer(upper, writable=True)] if upper else []) + [Layer(p, writable=False) for p in lowers]
    resolver = Resolver(layers)
    with _opened(resolver, "/etc/passwd") as passwd, _opened(resolver, "/etc/group") as group:
        return find_user(spec, passwd, group)


@contextlib.contextmanager
def _opened(resolver: Resolver, path: str) -> Iterator[str]:
    """A path that reads the file the union shows at ``path`` (``/dev/null`` where there is none)."""
    try:
        entry = resolver.lookup(path)
        fd = None if entry is None else confined.open_beneath(entry.rel, os.O_RDONLY, dir_fd=entry.layer.fd)
    except OSError:
        fd = None
    if fd is None:
        yield os.devnull
        return
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _entries(path: str) -> list[list[str]]:
    """A colon-separated file's lines split (none if it is missing, as for runc)."""
    try:
        with open(path) as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def make_workdir(path: str, user: User) -> None:
    """Make the working directory where it is missing, owned by the user (the parents it needs, by root),
    as Podman makes an image's WorkingDir."""
    if not os.path.lexists(path):
        os.makedirs(path, 0o755)
        os.chown(path, user.uid, user.gid)
