"""A container's volumes, as docker's ``-v``, ``--mount`` and ``--tmpfs`` say them: what they are (parse,
before anything is made), made ready on the host (prepare: named and anonymous volumes made in the store
and filled from the image, a missing ``-v`` host directory made, mount points made in the rootfs), and
mounted in the container's mount namespace by the shim (mount_all: after the rootfs and the runtime's own
mounts, before pivot_root, as runc orders it).

A destination is resolved inside the rootfs as a chrooted process would see it (RESOLVE_IN_ROOT, as
runc's securejoin does): an image's symlink cannot send a mount, or a mount point made for it, to the
host. What is in a volume is never the container's change; the container's record lists its volumes
(docker inspect's ``Mounts``), so that diff, export and commit leave their destinations out, and the
mount points made for them are the runtime's paths.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import subprocess
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

from .. import syscalls
from ..errors import LayerfsError, UsageError
from ..store.volumes import checked_name
from ..syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC
from .confinement import remount

if TYPE_CHECKING:
    from ..store import Store

BIND, VOLUME, TMPFS = "bind", "volume", "tmpfs"
_TMPFS_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}  # docker's defaults
_TMPFS_UNFLAGS = {"suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC}
_VOLUME_MODES = ("ro", "rw", "z", "Z", "nocopy")


@dataclass(frozen=True)
class Mount:
    kind: str  # BIND, VOLUME or TMPFS
    target: str  # in the container, absolute
    source: str = ""  # a bind's host path; a volume's name ("" for a new anonymous one, until prepared)
    readonly: bool = False
    copy: bool = True  # a volume: filled from the image's content at target while empty (docker's nocopy)
    make_source: bool = False  # a bind: its host directory made if missing (-v does, --mount refuses)
    flags: int = 0  # a tmpfs's mount flags
    data: str = ""  # a tmpfs's options (size=, mode=)


def parse(volume_flags: list[str], mount_flags: list[str], tmpfs_flags: list[str]) -> list[Mount]:
    """The mounts ``-v``, ``--mount`` and ``--tmpfs`` ask for, in the order they will be mounted (a
    destination before those below it); UsageError (docker's words) for one that cannot be."""
    mounts = [_volume_flag(f) for f in volume_flags] + [_mount_flag(f) for f in mount_flags]
    mounts += [_tmpfs_flag(f) for f in tmpfs_flags]
    seen = set()
    for m in mounts:
        if m.target in seen:
            raise UsageError(f"duplicate mount point: {m.target}")
        seen.add(m.target)
    return sorted(mounts, key=lambda m: m.target.count("/") if m.target != "/" else 0)


def _target(path: str, spec: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"invalid mount config in {spec!r}: invalid mount path: {path!r} mount path must be absolute")
    path = posixpath.normpath(path)
    if path in ("/", "//"):
        raise UsageError(f"invalid specification {spec!r}: destination can't be '/'")
    return path


def _volume_flag(spec: str) -> Mount:
    """``-v [SOURCE:]DEST[:MODE]``: a bind for an absolute SOURCE, else a named volume; no SOURCE, an
    anonymous volume."""
    parts = spec.split(":")
    if len(parts) == 1:
        parts = ["", parts[0], ""]
    if len(parts) == 2 and all(m in _VOLUME_MODES for m in parts[1].split(",")):
        raise UsageError(f"invalid volume specification: {spec!r} (an anonymous volume takes no mode)")
    if len(parts) == 2:
        parts.append("")
    if len(parts) != 3 or not parts[1]:
        raise UsageError(f"invalid volume specification: {spec!r}")
    source, target, mode = parts
    modes = [m for m in mode.split(",") if m]
    for m in modes:
        if m not in _VOLUME_MODES:
            raise UsageError(f"invalid mode: {m} (in {spec!r})")
    readonly = "ro" in modes
    if source.startswith("/"):
        return Mount(BIND, _target(target, spec), posixpath.normpath(source), readonly, make_source=True)
    return Mount(VOLUME, _target(target, spec), _volume_name(source), readonly, copy="nocopy" not in modes)


def _volume_name(name: str) -> str:
    """``name`` if it may name a volume ("" for an anonymous one); UsageError otherwise."""
    try:
        return checked_name(name) if name else name
    except LayerfsError as e:
        raise UsageError(str(e)) from None


def _mount_flag(spec: str) -> Mount:
    """``--mount type=bind|volume|tmpfs,source=...,target=...[,readonly][,volume-nocopy][,tmpfs-size=N]
    [,tmpfs-mode=OCTAL]``."""
    fields: dict[str, str] = {}
    for item in spec.split(","):
        key, equals, value = item.partition("=")
        key = {"src": "source", "destination": "target", "dst": "target", "ro": "readonly"}.get(key, key)
        if key not in ("type", "source", "target", "readonly", "volume-nocopy", "tmpfs-size", "tmpfs-mode"):
            raise UsageError(f"unexpected key {key!r} in {spec!r}")
        fields[key] = value if equals else "true"
    kind, source = fields.get("type", VOLUME), fields.get("source", "")
    if "target" not in fields:
        raise UsageError(f"target is required (in {spec!r})")
    target = _target(fields["target"], spec)
    readonly = _truth(fields.get("readonly", "false"), spec)
    if kind == BIND:
        if not source.startswith("/"):
            raise UsageError(f'invalid mount config for type "bind": invalid mount path: {source!r} (in {spec!r})')
        if not os.path.exists(source):
            raise UsageError(f'invalid mount config for type "bind": bind source path does not exist: {source}')
        return Mount(BIND, target, posixpath.normpath(source), readonly)
    if kind == VOLUME:
        copy = not _truth(fields.get("volume-nocopy", "false"), spec)
        return Mount(VOLUME, target, _volume_name(source), readonly, copy=copy)
    if kind == TMPFS:
        if source:
            raise UsageError(f'invalid mount config for type "tmpfs": source must not be specified (in {spec!r})')
        data = [f"size={fields['tmpfs-size']}"] if "tmpfs-size" in fields else []
        if "tmpfs-mode" in fields:
            try:
                data.append(f"mode={int(fields['tmpfs-mode'], 8):o}")
            except ValueError:
                raise UsageError(f"invalid tmpfs-mode {fields['tmpfs-mode']!r} (in {spec!r})") from None
        return Mount(TMPFS, target, readonly=readonly, flags=MS_NOSUID | MS_NODEV | MS_NOEXEC, data=",".join(data))
    raise UsageError(f"invalid mount type {kind!r} (in {spec!r}): bind, volume or tmpfs")


def _truth(text: str, spec: str) -> bool:
    if text.lower() not in ("true", "1", "false", "0"):
        raise UsageError(f"invalid value {text!r} (in {spec!r}): true or false")
    return text.lower() in ("true", "1")


def _tmpfs_flag(spec: str) -> Mount:
    """``--tmpfs DEST[:OPTIONS]``: mount flags (ro, noexec, exec, ...) and tmpfs's own options (size=,
    mode=), nosuid, nodev and noexec unless said otherwise, as docker mounts one."""
    target, _, options = spec.partition(":")
    flags, readonly, data = MS_NOSUID | MS_NODEV | MS_NOEXEC, False, []
    for option in (o for o in options.split(",") if o):
        if option in ("ro", "rw"):
            readonly = option == "ro"
        elif option in _TMPFS_FLAGS:
            flags |= _TMPFS_FLAGS[option]
        elif option in _TMPFS_UNFLAGS:
            flags &= ~_TMPFS_UNFLAGS[option]
        elif "=" in option:
            data.append(option)
        else:
            raise UsageError(f"invalid tmpfs option {option!r} (in {spec!r})")
    return Mount(TMPFS, _target(target, spec), readonly=readonly, flags=flags, data=",".join(data))


class Prepared(NamedTuple):
    mounts: list[Mount]  # with every source a host path
    made: list[str]  # container paths made to mount on (the runtime's, not the container's changes)
    described: list[dict]  # as docker inspect's Mounts


def prepare(rootfs: str, mounts: list[Mount], store: Store | None) -> Prepared:
    """(The rootfs mounted, on the host.) Volumes made in ``store`` where missing and, while empty, filled
    with what the image has at their destination (docker's copy-up; not with nocopy); a ``-v`` host
    directory made where missing; each destination made in the rootfs where missing (a directory, or an
    empty file for a bind of a file)."""
    ready, made, described = [], [], []
    for m in mounts:
        entry: dict = {"Type": m.kind, "Destination": m.target, "RW": not m.readonly}
        if m.kind == VOLUME:
            if store is None:
                raise LayerfsError("volumes need a store")  # (run makes one whenever a volume is asked for)
            name, _ = store.volume(m.source or None)
            m = replace(m, source=store.volumes.data(name))
            if m.copy and not os.listdir(m.source):
                _fill(m.source, rootfs, m.target)
            entry["Name"] = name
        elif m.kind == BIND and m.make_source and not os.path.exists(m.source):
            os.makedirs(m.source, 0o755)  # as docker's -v does (--mount refuses)
        entry["Source"] = m.source
        made += make_target(rootfs, m.target, directory=m.kind != BIND or os.path.isdir(m.source))
        ready.append(m)
        described.append(entry)
    return Prepared(ready, made, described)


def _fill(data: str, rootfs: str, target: str) -> None:
    """Copy the image's directory at ``target`` (if it has one) into the empty volume ``data``, owners,
    modes, times, xattrs and links kept, the directory's own attributes too."""
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = syscalls.open_in_root(root, target, os.O_PATH | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return
    finally:
        os.close(root)
    try:
        copied = subprocess.run(
            ["cp", "-a", "--", f"/proc/self/fd/{fd}/.", data], pass_fds=(fd,), capture_output=True, text=True
        )
    finally:
        os.close(fd)
    if copied.returncode != 0:
        raise LayerfsError(f"volume at {target}: copying the image's content: {copied.stderr.strip()}")


def make_target(rootfs: str, target: str, *, directory: bool) -> list[str]:
    """Make ``target`` in ``rootfs`` where missing, resolved inside it, with the directories it needs (a
    symlink to what is missing made as where it points, inside the rootfs, as runc does); the times of a
    directory that gets a new entry put back (so it is not the container's change). Returns the
    container paths made."""
    made: list[str] = []
    for _ in range(40):  # (as many symlinks as the kernel follows in one path)
        target = _make_path(rootfs, target, directory, made)
        if not target:
            return made
    raise LayerfsError(f"mount point {target}: too many levels of symbolic links")


def _make_path(rootfs: str, target: str, directory: bool, made: list[str]) -> str:
    """Make what is missing of ``target``, adding it to ``made``; "" when done, or the path to make
    instead when a missing part is a symlink."""
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parent = os.dup(root)
    path = ""
    names = target.strip("/").split("/")
    try:
        for n, name in enumerate(names):
            path += "/" + name
            try:
                fd = syscalls.open_in_root(root, path, os.O_PATH)
            except FileNotFoundError:
                with contextlib.suppress(OSError):  # (a symlink to what is not there: make that instead)
                    link = os.readlink(name, dir_fd=parent)
                    return posixpath.normpath(posixpath.join(posixpath.dirname(path), link, *names[n + 1 :]))
                times = os.fstat(parent)
                if n == len(names) - 1 and not directory:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=parent))
                else:
                    os.mkdir(name, 0o755, dir_fd=parent)
                os.utime(f"/proc/self/fd/{parent}", ns=(times.st_atime_ns, times.st_mtime_ns))
                made.append(path)
                fd = syscalls.open_in_root(root, path, os.O_PATH)
            os.close(parent)
            parent = fd
    except OSError as e:
        raise LayerfsError(f"mount point {target}: {path}: {e.strerror}") from None
    finally:
        os.close(parent)
        os.close(root)
    return ""


def mount_all(rootfs: str, mounts: list[Mount]) -> None:
    """(In the container's mount namespace, before pivot_root.) Each mount on its destination, resolved
    inside ``rootfs``: binds recursive, read-only ones remounted so."""
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for m in mounts:
            try:
                _mount_one(root, m)
            except OSError as e:
                raise OSError(e.errno, e.strerror, m.target) from None
    finally:
        os.close(root)


def _mount_one(root: int, m: Mount) -> None:
    fd = syscalls.open_in_root(root, m.target, os.O_PATH)
    try:
        if m.kind == TMPFS:
            syscalls.mount("tmpfs", f"/proc/self/fd/{fd}", "tmpfs", m.flags | (MS_RDONLY if m.readonly else 0), m.data)
            return
        syscalls.mount(m.source, f"/proc/self/fd/{fd}", None, MS_BIND | MS_REC)
    finally:
        os.close(fd)
    if m.readonly:
        top = syscalls.open_in_root(root, m.target, os.O_PATH)  # (now the mount's root)
        try:
            remount(f"/proc/self/fd/{top}", MS_RDONLY)
        finally:
            os.close(top)
