"""The kernel's FUSE protocol as ``include/uapi/linux/fuse.h`` defines it (7.45 here): numbers and layouts.

Only what layerfs speaks is named. Every message is native-endian and 64-bit aligned; the layouts are
``struct.Struct``s so a request is parsed with one ``unpack_from`` and a reply built with one ``pack``.
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 45  # what layerfs was written against; the kernel may offer less, and then rules
ROOT_ID = 1

# -- opcodes
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50
TMPFILE = 51
STATX = 52

OPCODE_NAMES = {
    value: name.lower()
    for name, value in list(globals().items())
    if name.isupper() and isinstance(value, int) and name not in ("KERNEL_MAJOR", "KERNEL_MINOR", "ROOT_ID")
}

# -- INIT flags (flags, and flags2 shifted down by 32 when INIT_EXT is set)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

INIT_FLAG_NAMES = {
    ASYNC_READ: "async_read",
    ATOMIC_O_TRUNC: "atomic_o_trunc",
    BIG_WRITES: "big_writes",
    DONT_MASK: "dont_mask",
    DO_READDIRPLUS: "readdirplus",
    READDIRPLUS_AUTO: "readdirplus_auto",
    WRITEBACK_CACHE: "writeback_cache",
    PARALLEL_DIROPS: "parallel_dirops",
    MAX_PAGES: "max_pages",
    CACHE_SYMLINKS: "cache_symlinks",
    HANDLE_KILLPRIV_V2: "handle_killpriv_v2",
    PASSTHROUGH: "passthrough",
}

# -- open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

# -- SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# -- with HANDLE_KILLPRIV_V2: the caller lacks CAP_FSETID, so the server clears setuid/setgid
WRITE_KILL_SUIDGID = 1 << 2  # in write_flags
OPEN_KILL_SUIDGID = 1 << 0  # in open_flags of OPEN and CREATE

GETATTR_FH = 1 << 0

# -- notifications (sent with unique 0, the code in the error field)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6

# -- /dev/fuse ioctls
DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)

# -- layouts
in_header = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
out_header = struct.Struct("=IiQ")  # len, error, unique
init_in = struct.Struct("=IIIII")  # major, minor, max_readahead, flags, flags2
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran,
# max_pages, map_alignment, flags2, max_stack_depth, request_timeout, 11 x unused
init_out = struct.Struct("=IIIIHHIIHHIIH22x")
# ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
attr = struct.Struct("=QQQQQQIIIIIIIIII")
entry_out = struct.Struct("=QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then attr
attr_out = struct.Struct("=QII")  # attr_valid, attr_valid_nsec, dummy; then attr
getattr_in = struct.Struct("=IIQ")  # getattr_flags, dummy, fh
# valid, pad, fh, size, lock_owner, atime, mtime, ctime, *nsec, mode, _, uid, gid, _
setattr_in = struct.Struct("=IIQQQQQQIIIIIIII")
forget_in = struct.Struct("=Q")
batch_forget_in = struct.Struct("=II")
forget_one = struct.Struct("=QQ")
mknod_in = struct.Struct("=IIII")  # mode, rdev, umask, pad
mkdir_in = struct.Struct("=II")  # mode, umask
rename_in = struct.Struct("=Q")  # newdir
rename2_in = struct.Struct("=QII")  # newdir, flags, pad
link_in = struct.Struct("=Q")  # oldnodeid
open_in = struct.Struct("=II")  # flags, open_flags
create_in = struct.Struct("=IIII")  # flags, mode, umask, open_flags
open_out = struct.Struct("=QIi")  # fh, open_flags, backing_id
release_in = struct.Struct("=QIIQ")  # fh, flags, release_flags, lock_owner
read_in = struct.Struct("=QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, pad
write_in = struct.Struct("=QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, pad
write_out = struct.Struct("=II")  # size, pad
statfs_out = struct.Struct("=QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize (+pad, spare)
fsync_in = struct.Struct("=QII")  # fh, fsync_flags, pad
setxattr_in = struct.Struct("=II")  # size, flags
getxattr_in = struct.Struct("=II")  # size, pad
getxattr_out = struct.Struct("=II")  # size, pad
interrupt_in = struct.Struct("=Q")
dirent = struct.Struct("=QQII")  # ino, off, namelen, type; then the name, padded to 8
lseek_in = struct.Struct("=QQII")  # fh, offset, whence, pad
lseek_out = struct.Struct("=Q")
fallocate_in = struct.Struct("=QQQII")  # fh, offset, length, mode, pad
notify_inval_inode = struct.Struct("=Qqq")  # ino, off, len
notify_inval_entry = struct.Struct("=QII")  # parent, namelen, flags
notify_delete = struct.Struct("=QQII")  # parent, child, namelen, pad
backing_map = struct.Struct("=iIQ")  # fd, flags, padding

ENTRY_OUT_SIZE = entry_out.size + attr.size
