"""System calls Python's os module lacks, in one place: openat2, renameat2 exchange, listxattrat, FICLONE,
fallocate, mount, umount2, file handles (name_to_handle_at, open_by_handle_at), a filesystem's UUID, and what
a container's start needs (unshare, pivot_root, a parent-death signal) and its confinement (capability sets,
no_new_privs). The only module that calls libc directly."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

# (the C library the interpreter runs on, by name: find_library would run ldconfig, at every command's start)
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
MNT_DETACH = 2
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# glibc has no pivot_root(2): it is reached by number, which differs by architecture.
_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "s390x": 217,
    "i686": 217,
    "armv7l": 218,
}

_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int

_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
# (All five arguments always passed: some options want the unused ones zero.)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_pivot_root = _libc["syscall"]  # (a function object of its own: openat2's below has other argument types)
_pivot_root.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
_pivot_root.restype = ctypes.c_int

_libc.name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_libc.name_to_handle_at.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int
_MAX_HANDLE_SZ = 128
_AT_EMPTY_PATH = 0x1000
_FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})

_SYS_OPENAT2 = 437  # the same number on every architecture (the syscall came after the tables merged)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE_IN_ROOT = 0x10
_OPEN_FLAGS = 0
for _name in (
    "O_ACCMODE",
    "O_APPEND",
    "O_TRUNC",
    "O_NONBLOCK",
    "O_DSYNC",
    "O_SYNC",
    "O_DIRECT",
    "O_NOATIME",
    "O_LARGEFILE",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "O_CLOEXEC",
    "O_PATH",
    "O_CREAT",
    "O_EXCL",
    "O_ASYNC",
    "O_TMPFILE",
    "O_NOCTTY",
):
    _OPEN_FLAGS |= getattr(os, _name, 0)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2 = _libc["syscall"]
_openat2.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_openat2.restype = ctypes.c_int
_hows: dict[tuple[int, int], _OpenHow] = {}


def _raise_errno(path: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


def _rename2(a: str, b: str, flags: int, a_dir_fd: int, b_dir_fd: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", a)
    if _renameat2(a_dir_fd, os.fsencode(a), b_dir_fd, os.fsencode(b), flags) != 0:
        _raise_errno(a)


def exchange(a: str, b: str, *, a_dir_fd: int = AT_FDCWD, b_dir_fd: int = AT_FDCWD) -> None:
    """Atomically swap the entries at ``a`` and ``b`` (renameat2 RENAME_EXCHANGE); both must exist."""
    _rename2(a, b, RENAME_EXCHANGE, a_dir_fd, b_dir_fd)


def rename_whiteout(a: str, b: str, *, a_dir_fd: int = AT_FDCWD, b_dir_fd: int = AT_FDCWD) -> None:
    """Rename ``a`` to ``b`` and leave an overlay whiteout at ``a`` in the same step (needs CAP_MKNOD)."""
    _rename2(a, b, RENAME_WHITEOUT, a_dir_fd, b_dir_fd)


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Share the data extents of ``src_fd`` with ``dst_fd`` (reflink). False where the filesystem can't."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF):
            return False
        raise


def openat2(dir_fd: int, path: str, how: _OpenHow) -> int:
    """openat2(2) with ``how`` (from ``open_how``); ENOSYS where the kernel has none (before 5.6)."""
    fd = _openat2(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.addressof(how), ctypes.sizeof(how))
    if fd < 0:
        _raise_errno(path)
    return fd


_SYS_LISTXATTRAT = 465  # (Linux 6.13; the same number on every architecture)
_AT_SYMLINK_NOFOLLOW = 0x100
_listxattrat = _libc["syscall"]
_listxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t]
_listxattrat.restype = ctypes.c_long


def xattr_names(name: str, *, dir_fd: int) -> list[str]:
    """The xattr names of the entry ``name`` in ``dir_fd``, not followed, by listxattrat(2) (ENOSYS
    before Linux 6.13). Their size is asked first: most entries have none, and that is one call."""
    path = os.fsencode(name)
    size = _listxattrat(_SYS_LISTXATTRAT, dir_fd, path, _AT_SYMLINK_NOFOLLOW, None, 0)
    if size > 0:
        buffer = ctypes.create_string_buffer(size)
        size = _listxattrat(_SYS_LISTXATTRAT, dir_fd, path, _AT_SYMLINK_NOFOLLOW, buffer, size)  # (ERANGE: grew)
        if size > 0:
            return [os.fsdecode(n) for n in buffer.raw[:size].split(b"\0")[:-1]]
    if size < 0:
        _raise_errno(name)
    return []


def open_how(flags: int, mode: int) -> _OpenHow:
    """The openat2 arguments for an open below a directory that follows no symlink (RESOLVE_BENEATH |
    RESOLVE_NO_SYMLINKS), built once per (flags, mode): opens are a hot path. Only open(2)'s own flags go
    through: openat2 refuses flags it does not know, where openat ignores them, and FUSE hands on the
    kernel's own file flags (FMODE_EXEC among them)."""
    flags = (flags & _OPEN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
    how = _hows.get((flags, mode))
    if how is None:
        creating = flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0))
        how = _hows[flags, mode] = _OpenHow(
            flags, mode if creating else 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
        )
    return how


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """Open ``path`` as a process chrooted to ``root_fd`` would (RESOLVE_IN_ROOT: its symlinks and ``..``
    stay inside), as runc resolves a mount's destination in a container's rootfs."""
    return openat2(root_fd, path, _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS))


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ),
    ]


def file_handle(path: str, *, dir_fd: int) -> tuple[int, bytes]:
    """The filesystem's handle of ``path`` (not followed; "" for ``dir_fd`` itself): its type and bytes."""
    handle = _FileHandle(_MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if (
        _libc.name_to_handle_at(
            dir_fd, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0 if path else _AT_EMPTY_PATH
        )
        != 0
    ):
        _raise_errno(path)
    return handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes])


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open the file ``handle`` names on the filesystem of ``mount_fd`` (needs CAP_DAC_READ_SEARCH)."""
    if len(handle) > _MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle too long")
    fh = _FileHandle(len(handle), handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        _raise_errno("(file handle)")
    return fd


def filesystem_uuid(fd: int) -> bytes:
    """The UUID of the filesystem holding ``fd`` (16 bytes; zeros where it has none to tell)."""
    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf, True)
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
            raise
        return bytes(16)
    return bytes(buf[1 : 1 + min(buf[0], 16)]).ljust(16, b"\0")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate has none: no punching holes)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise_errno("(fallocate)")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if (
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
        != 0
    ):
        _raise_errno(target)


def umount(path: str, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
        _raise_errno(path)


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare came with Python 3.12)."""
    if _libc.unshare(flags) != 0:
        _raise_errno("unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2): join the namespace open at ``fd`` (os.setns came with Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        _raise_errno("setns")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root on {os.uname().machine} is not known to layerfs", new_root)
    if _pivot_root(number, os.fsencode(new_root), os.fsencode(put_old)) != 0:
        _raise_errno(new_root)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        _raise_errno("prctl")


def set_death_signal(signal: int) -> None:
    """Have the kernel send ``signal`` to this process when its parent ends (PR_SET_PDEATHSIG)."""
    _prctl(_PR_SET_PDEATHSIG, signal)


def set_no_new_privs() -> None:
    """From here on, exec never gains privileges (setuid bits, file capabilities): PR_SET_NO_NEW_PRIVS."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def drop_bounding_capability(number: int) -> None:
    """Take capability ``number`` out of the bounding set: no exec can give it back (PR_CAPBSET_DROP)."""
    _prctl(_PR_CAPBSET_DROP, number)


def clear_ambient_capabilities() -> None:
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


def set_capabilities(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of this thread's three sets, each a mask of capability numbers (bit N: capability N)."""
    data = (_CapData * 2)(
        *(
            _CapData(
                (effective >> shift) & 0xFFFFFFFF,
                (permitted >> shift) & 0xFFFFFFFF,
                (inheritable >> shift) & 0xFFFFFFFF,
            )
            for shift in (0, 32)
        )
    )
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        _raise_errno("capset")
