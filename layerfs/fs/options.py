"""Mount options in overlayfs's and fuse-overlayfs's language, checked before anything is mounted.

``-o lowerdir=A:B,upperdir=U,workdir=W`` with the leftmost lower on top. A backslash escapes ``,``
``:`` and ``\\`` inside paths, as overlayfs allows. Relative paths are taken from the current directory
(containers-storage passes ``l/ABC`` with its home as the current directory). A message quotes what it
was given with control characters escaped, to stay one line whatever a path holds.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from ..core import overridestat
from ..core.idmap import AS_STORED, IdMap, Owners, Range, overflow_id
from ..errors import UsageError, printable

# Options of overlayfs and fuse-overlayfs that only tune their own implementations: accepted without a
# word, since callers (containers-storage) pass them routinely.
_QUIET = frozenset(
    {
        "rw",
        "dev",
        "suid",
        "exec",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "nodev",
        "nosuid",
        "noexec",
        "default_permissions",
        "allow_root",
        "fsync",
        "threaded",
        "noacl",
        "timeout",
        "index",
        "xino",
        "context",
        "fscontext",
        "defcontext",
        "rootcontext",
        "nfs_export",
        "uuid",
        "plugins",
        "debug",
        "max_idle_threads",
    }
)


@dataclass
class MountConfig:
    mountpoint: str
    lowers: list[str]
    upper: str | None = None
    work: str | None = None
    readonly: bool = False
    sync: bool = True  # False with overlay's "volatile" or fuse-overlayfs's "fsync=0"
    fsname: str = "layerfs"
    warnings: list[str] = field(default_factory=list)
    owner: int | None = None  # x-layerfs-owner=PID: unmount when that process is gone (layerfs run's shim)
    owners: Owners = AS_STORED  # uidmapping, gidmapping, squash_to_*
    static_nlink: bool = False  # every directory shows st_nlink 1
    passthrough: bool = True  # file data passed through to the layers by the kernel, where it allows
    log: str | None = None  # log=FILE: the daemon's warnings and unexpected errors, else syslog
    threads: int = 2  # threads=N: readers of /dev/fuse, each on a descriptor of its own
    redirect_dir: bool = True  # redirect_dir=off: a directory rename copies the tree up, as before redirects
    metacopy: bool = False  # metacopy=on: a metadata change of a lower file copies its metadata only
    userxattr: bool = False  # overlay's records as user.overlay.* (else as the work directory's probe says)
    override_stat: tuple[str, ...] = ()  # xattr_permissions=1|2: owners and modes shown as these xattrs say
    allow_other: bool = True  # other users see the mount: always for root, for a plain user when asked and allowed
    # x-layerfs-exit-command=PROGRAM:ARG...: run by the daemon when the owner's end has unmounted the mount
    # (conmon's --exit-command: the owner's cleanup, which it could not do itself)
    exit_command: list[str] = field(default_factory=list)


def split_escaped(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` where it is not escaped with a backslash; backslashes are removed."""
    parts, current, chars = [], [], iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _split_options(text: str) -> list[str]:
    """Split an option string at unescaped commas, keeping escapes for the per-path split to remove."""
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def _number(text: str, end: int) -> int | None:
    """``text`` as a decimal number below ``end``, else None. Only ASCII digits: ``str.isdigit`` also
    takes "²", which ``int`` refuses, and "１２", which it reads as 12."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20:  # int() refuses thousands of digits
        return None
    return int(text) if int(text) < end else None


def checked_directory(role: str, path: str) -> str:
    if not path:
        raise UsageError(f"{role}: empty path")
    full = os.path.abspath(path)
    if not os.path.exists(full):
        raise UsageError(f"{role} {printable(path)}: no such directory")
    if not os.path.isdir(full):
        raise UsageError(f"{role} {printable(path)}: not a directory")
    if not os.access(full, os.R_OK | os.X_OK):
        raise UsageError(f"{role} {printable(path)}: permission denied")
    return os.path.realpath(full)


def parse(option_strings: list[str], mountpoint: str | None) -> MountConfig:
    """Build a checked MountConfig from ``-o`` strings and a mount point; UsageError on any problem."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    warnings: list[str] = []
    for text in option_strings:
        for item in _split_options(text):
            key, eq, value = item.partition("=")
            if eq:
                values[key] = value
            else:
                flags.add(key)

    if not mountpoint:  # "" would be the current directory
        raise UsageError("no mount point given")
    if "lowerdir" not in values:
        raise UsageError("no lowerdir given (-o lowerdir=DIR[:DIR...])")
    lower_paths = [p for p in split_escaped(values.pop("lowerdir"), ":")]
    if any(p == "" for p in lower_paths):
        raise UsageError("lowerdir: empty path in the list")
    lowers = [checked_directory("lowerdir", p) for p in lower_paths]

    upper = work = None
    if "upperdir" in values:
        upper = checked_directory("upperdir", split_escaped(values.pop("upperdir"), ",")[0])
        if "workdir" not in values:
            raise UsageError("upperdir needs a workdir (-o workdir=DIR)")
        work = checked_directory("workdir", split_escaped(values.pop("workdir"), ",")[0])
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise UsageError(f"workdir {printable(work)} is not on the same filesystem as upperdir {printable(upper)}")
        if is_within(upper, work) or is_within(work, upper):
            raise UsageError("upperdir and workdir must be separate directories, neither inside the other")
        if not os.access(upper, os.W_OK) or not os.access(work, os.W_OK):
            raise UsageError(f"upperdir {printable(upper)}: not writable")
    elif "workdir" in values:
        values.pop("workdir")
        warnings.append("workdir ignored: there is no upperdir (read-only mount)")
    readonly = upper is None or "ro" in flags
    flags.discard("ro")
    if readonly and upper is not None:
        upper = work = None
        warnings.append("ro given: mounting read-only, upperdir ignored")

    mnt = os.path.abspath(mountpoint)
    if not os.path.isdir(mnt):
        raise UsageError(f"mount point {printable(mountpoint)}: no such directory")

    sync = True
    if "volatile" in flags:
        flags.discard("volatile")
        sync = False
    if values.get("fsync") == "0":
        sync = False
    fsname = values.pop("fsname", "layerfs")
    owner_text = values.pop("x-layerfs-owner", None)
    owner = None if owner_text is None else _number(owner_text, 1 << 22)  # PID_MAX_LIMIT
    if owner_text is not None and not owner:
        raise UsageError(f"x-layerfs-owner={printable(owner_text)}: not a process id")
    exit_text = values.pop("x-layerfs-exit-command", "")
    exit_command = split_escaped(exit_text, ":") if exit_text else []
    if exit_command and owner is None:
        raise UsageError("x-layerfs-exit-command needs an x-layerfs-owner (it runs when the owner has gone)")

    owners = _owners(values, flags)
    static_nlink = "static_nlink" in flags
    flags.discard("static_nlink")
    passthrough = "nopassthrough" not in flags
    flags.discard("nopassthrough")
    log = values.pop("log", None)
    if log is not None:
        log = os.path.abspath(log)
        # (the daemon opens it once the mount is ready: a failure then would leave a dead mount)
        if not os.access(log if os.path.exists(log) else os.path.dirname(log), os.W_OK):
            raise UsageError(f"log {printable(log)}: not writable")
    threads_text = values.pop("threads", "2")
    threads = _number(threads_text, 65)
    if not threads:
        raise UsageError(f"threads={printable(threads_text)}: not a number from 1 to 64")
    redirect_text = values.pop("redirect_dir", "on")
    if redirect_text not in ("on", "off", "follow", "nofollow"):
        raise UsageError(f"redirect_dir={printable(redirect_text)}: not one of on, off, follow, nofollow")
    redirect_dir = redirect_text == "on"  # (redirects are followed whatever it says, as overlayfs does by default)
    metacopy_text = values.pop("metacopy", "off")
    if metacopy_text not in ("on", "off"):
        raise UsageError(f"metacopy={printable(metacopy_text)}: not on or off")
    metacopy = metacopy_text == "on"
    if metacopy and not redirect_dir:
        # A renamed metadata-only copy finds its data through a redirect, as on kernel overlayfs.
        raise UsageError(f"metacopy=on needs redirect_dir=on (it is {redirect_text})")
    userxattr = "userxattr" in flags
    flags.discard("userxattr")
    allow_other = _allow_other("allow_other" in flags, warnings)
    flags.discard("allow_other")
    permissions = values.pop("xattr_permissions", "0")
    if permissions not in ("0", *overridestat.NAMES):
        raise UsageError(f"xattr_permissions={printable(permissions)}: not 0, 1 or 2")
    override_stat = overridestat.NAMES.get(permissions, ())

    for key in sorted(values):
        if key not in _QUIET:
            warnings.append(f"unknown option {printable(key)}={printable(values[key])} ignored")
    for key in sorted(flags):
        if key not in _QUIET:
            warnings.append(f"unknown option {printable(key)} ignored")
    return MountConfig(
        mnt,
        lowers,
        upper,
        work,
        readonly,
        sync,
        fsname,
        warnings,
        owner,
        owners,
        static_nlink,
        passthrough,
        log,
        threads,
        redirect_dir,
        metacopy,
        userxattr,
        override_stat,
        allow_other,
        exit_command,
    )


def _allow_other(asked: bool, warnings: list[str]) -> bool:
    """Whether the mount is open to other users: root's always (a container's processes run as many
    users); a plain user's when asked and fusermount3 allows it (``user_allow_other`` in /etc/fuse.conf)."""
    if os.geteuid() == 0:
        return True
    if not asked:
        return False
    try:
        with open("/etc/fuse.conf") as f:
            allowed = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except FileNotFoundError:
        allowed = False
    if not allowed:
        warnings.append("allow_other ignored: /etc/fuse.conf has no user_allow_other, the mount is yours alone")
    return allowed


def _owners(values: dict[str, str], flags: set[str]) -> Owners:
    """fuse-overlayfs's owner options, taken out of ``values`` and ``flags``; ``squash_to_uid`` and
    ``squash_to_gid`` take precedence over ``squash_to_root``."""
    to_root = "squash_to_root" in flags
    flags.discard("squash_to_root")

    def one(kind: str) -> IdMap:
        text, squash = values.pop(f"{kind}mapping", None), values.pop(f"squash_to_{kind}", None)
        squash_id = None if squash is None else _number(squash, 1 << 32)
        if squash is not None and squash_id is None:
            raise UsageError(f"squash_to_{kind}={printable(squash)}: not an id")
        ranges = _ranges(f"{kind}mapping", text) if text else []
        return IdMap(ranges, squash_id if squash is not None else 0 if to_root else None, overflow_id(kind))

    return Owners(one("uid"), one("gid"))


def _ranges(option: str, text: str) -> list[Range]:
    """``[:]ID:MAPPED-ID:COUNT[:ID:MAPPED-ID:COUNT...]`` (containers-storage writes a leading colon) as
    ranges; UsageError if malformed or overlapping."""
    parsed = [_number(w, 1 << 64) for w in text.split(":") if w]
    numbers = [n for n in parsed if n is not None]
    if not numbers or len(numbers) % 3 or len(numbers) != len(parsed):
        raise UsageError(f"{option}={printable(text)}: not a list of ID:MAPPED-ID:COUNT ranges")
    ranges = [Range(*numbers[i : i + 3]) for i in range(0, len(numbers), 3)]
    for side in (0, 1):
        spans = sorted((r[side], r[side] + r.length) for r in ranges)
        if any(r.length == 0 for r in ranges) or any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            raise UsageError(f"{option}={printable(text)}: a range is empty or two overlap")
        if spans[-1][1] > 1 << 32:
            raise UsageError(f"{option}={printable(text)}: ids beyond 2^32")
    return ranges


def escaped(path: object) -> str:
    """A path as ``parse`` reads it inside an option (``,``, ``:`` and ``\\`` escaped)."""
    return "".join("\\" + ch if ch in "\\,:" else ch for ch in str(path))


def for_dirs(lowers: list[str], upper: str, work: str, **extra: object) -> str:
    """The ``-o`` string that mounts ``lowers`` (top first) under ``upper``, paths escaped as ``parse``
    reads them; ``extra`` options are appended as ``key=value`` (a list's items escaped and joined with
    ``:``, as ``x-layerfs-exit-command`` takes them)."""
    text = f"lowerdir={':'.join(escaped(p) for p in lowers)},upperdir={escaped(upper)},workdir={escaped(work)}"
    return text + "".join(f",{key.replace('_', '-')}={_option_value(value)}" for key, value in extra.items())


def _option_value(value: object) -> str:
    return ":".join(escaped(item) for item in value) if isinstance(value, list) else str(value)


def is_within(child: str, parent: str) -> bool:
    """Whether path ``child`` is ``parent`` or below it."""
    return (child + "/").startswith(parent.rstrip("/") + "/")
