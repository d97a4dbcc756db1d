"""A plain user's user namespace, made as rootless Podman makes its own: root in it is the user, and ids
1 to N are the user's subordinate ids (their first range in /etc/subuid and /etc/subgid), mapped by the
setuid ``newuidmap`` and ``newgidmap`` (Debian's ``uidmap``); with a mount namespace of its own.

Root of that namespace may do to the user's files what root does to the machine's: chown them to a
container's owners, mount FUSE by mount(2), make a container's namespaces. What it writes lands on the
host with the owners the map gives: container root as the user, container uid 1000 as the first
subordinate uid + 999. So a plain user's store holds its layers and uppers with those owners, and every
command that writes or removes them (``run``, ``import``, ``commit``, ``rm``...) works in such a
namespace; each makes one with the same map.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

from . import syscalls
from .errors import LayerfsError

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"


def subordinate_range(table: str, user: pwd.struct_passwd) -> tuple[int, int] | None:
    """The user's first range in ``table`` (its lines are ``NAME-OR-ID:START:COUNT``): (start, count)."""
    try:
        with open(table) as f:
            lines = [line.strip().split(":") for line in f]
    except FileNotFoundError:
        return None
    for fields in lines:
        if len(fields) == 3 and fields[0] in (user.pw_name, str(user.pw_uid)) and fields[1].isdigit():
            if fields[2].isdigit() and int(fields[2]) > 0:
                return int(fields[1]), int(fields[2])
    return None


def has_subordinate_ids() -> bool:
    user = pwd.getpwuid(os.getuid())
    return subordinate_range(SUBUID, user) is not None and subordinate_range(SUBGID, user) is not None


def enter_as_needed(*, required: bool) -> None:
    """For a plain user (not root, nor root of a user namespace already, as in ``podman unshare``): enter a
    namespace when it is ``required`` (a container) or the user has subordinate ids (a store's files)."""
    if os.geteuid() != 0 and (required or has_subordinate_ids()):
        enter()


def enter() -> None:
    """Make the calling process (one thread only, as unshare(2) wants) root of a new user namespace
    mapped as above, in a mount namespace of its own; LayerfsError in one line if that cannot be."""
    user = pwd.getpwuid(os.getuid())
    maps = []
    for table, tool, own, option in (
        (SUBUID, "newuidmap", os.getuid(), "--add-subuids"),
        (SUBGID, "newgidmap", os.getgid(), "--add-subgids"),
    ):
        found = subordinate_range(table, user)
        if found is None:
            raise LayerfsError(
                f"a container without root needs subordinate ids: {user.pw_name} has none in {table}"
                f" (usermod {option} FROM-TO {user.pw_name})"
            )
        program = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if program is None:
            raise LayerfsError(f"{tool}: not found, which running containers without root needs (Debian's uidmap)")
        maps.append([program, "0", str(own), "1", "1", str(found[0]), str(found[1])])
    _unshare_mapped(maps)


def _unshare_mapped(maps: list[list[str]]) -> None:
    """unshare, and the maps written from outside: the setuid tools must run in the parent namespace
    (in the new one the set-user-ID bit of a file owned by an unmapped root is ignored), so a helper
    forked beforehand runs them on this process once it has unshared."""
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.close(said_read)
        code = 1
        try:
            if os.read(go_read, 1):  # (nothing: the unshare failed)
                for command in maps:
                    command.insert(1, str(parent))
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        os.write(said_write, f"{os.path.basename(command[0])}: {done.stderr.strip()}".encode())
                        break
                else:
                    code = 0
        finally:
            os._exit(code)
    os.close(go_read)
    os.close(said_write)
    unshared: OSError | None = None
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
        os.write(go_write, b"1")
    except OSError as e:
        unshared = e
    finally:
        os.close(go_write)
        with os.fdopen(said_read, "rb") as said:
            complaint = said.read().decode(errors="replace")
        status = os.waitpid(pid, 0)[1]
    if unshared is not None:
        raise LayerfsError(f"user namespace: {unshared.strerror} (unshare; are user namespaces allowed here?)")
    if complaint or os.waitstatus_to_exitcode(status) != 0:
        raise LayerfsError(f"user namespace: {complaint or 'its map could not be written'}")
