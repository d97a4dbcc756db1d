"""Where a user's things live: root's in /var/lib and /run; a plain user's (and those of root of a user
namespace, which is a plain user outside it) where rootless Podman keeps its own, the XDG base directories.

Data (the store): ``$XDG_DATA_HOME/layerfs``, else ``~/.local/share/layerfs``. Run state (the mounts'
records): ``$XDG_RUNTIME_DIR/layerfs``, else ``/run/user/UID/layerfs`` where that directory is the
user's (a login session made it), else ``layerfs-run-UID`` in the temporary directory, made 0700 and
refused unless it is the user's, as containers-storage falls back.
"""

from __future__ import annotations

import os

from .errors import LayerfsError


def is_root() -> bool:
    """Root of the machine: uid 0 in the initial user namespace, whose map is the whole identity."""
    if os.geteuid() != 0:
        return False
    with open("/proc/self/uid_map") as f:
        return f.read().split() == ["0", "0", "4294967295"]


def data_dir() -> str:
    if is_root():
        return "/var/lib/layerfs"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "layerfs")


def runtime_dir() -> str:
    if is_root():
        return "/run/layerfs"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "layerfs")
    # Named for the user's uid outside, owned by it as seen here (root of the user's own namespace sees
    # their files as its own, uid 0).
    uid, mine = _outside_uid(), os.geteuid()
    session = f"/run/user/{uid}"
    if _is_owned(session, mine):
        return os.path.join(session, "layerfs")
    import tempfile  # (only here: a fallback seldom taken)

    fallback = os.path.join(tempfile.gettempdir(), f"layerfs-run-{uid}")
    try:
        os.mkdir(fallback, 0o700)
    except FileExistsError:
        pass
    if not _is_owned(fallback, mine):
        raise LayerfsError(f"{fallback}: not yours (set XDG_RUNTIME_DIR to a directory of your own)")
    return fallback


def _outside_uid() -> int:
    """The caller's uid in the parent user namespace: the user's own, for root of a namespace they made."""
    uid = os.geteuid()
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, outside, count = map(int, line.split())
            if inside <= uid < inside + count:
                return outside + uid - inside
    return uid


def _is_owned(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_uid == uid and os.path.isdir(path) and not os.path.islink(path)
