"""An OCI image layer tar unpacked into a layer directory in overlay form, safely.

``unpack_layer(stream, dest)`` is the inverse of ``layertar.write_layer``: it reads a layer (a tar, plain or
gzip- or zstd-compressed, told apart by their magic bytes) and builds in the empty directory ``dest`` the layer as
kernel overlayfs and layerfs read a lowerdir:

- An OCI whiteout ``DIR/.wh.NAME`` becomes overlay's whiteout, a 0/0 character device ``DIR/NAME``, and
  ``DIR/.wh..wh..opq`` marks ``DIR`` opaque (``layerfs.core.whiteout`` writes both). A whiteout applies to
  the layers below only (image-spec): a name the layer both whites out and carries is the layer's entry,
  and a directory there is made opaque, in whichever order the two come. A 0/0 character device entry is
  taken for the whiteout it is in overlay form; a layer directory cannot hold it as anything else.
- Entries of every kind a layer holds: directories, regular files, symlinks, hard links, character and
  block devices, fifos; numeric owners, every mode bit (setuid, setgid, sticky), nanosecond mtimes (PAX),
  xattrs (PAX ``SCHILY.xattr.*``), file capabilities included (set after the owner, which clears them).
  A directory's mode and times are set once everything in it is made. A later entry for a path replaces
  the earlier, as tar does; a directory over a directory changes its metadata and keeps its content. A
  hard link entry's own header is not applied: the file it names has its metadata already. A directory
  the tar implies without an entry of its own is made 0755, owned by the caller. The root's own entry
  (``./``) gives ``dest`` its metadata.
- ``diff_id``, the sha256 of the uncompressed tar (all of it: end blocks and padding too), is computed as
  the bytes go by; the layer is never held or copied whole. The stream is read (and hashed) ahead in a
  thread of its own, while the calling thread parses the tar and makes the entries. (Parsing in a third
  thread cost more than it saved: the two Python threads took turns at the interpreter, 1.5x the CPU time.)
  An uncompressed tar in a file (a root filesystem import, a pulled plain layer) has each file's data
  copied by the kernel from the tar's file (``copy_file_range``), not through the interpreter; a file
  written to while it is read is refused (what was copied from it might not be what was hashed).

What a layer may not do is refused with a one-line LayerfsError naming the entry, after which ``dest`` is
empty again, with its own mode, owner, times and xattrs as they were:

- Reach outside ``dest``: a name or hard-link target whose ``..`` climbs above the root. A leading ``/``
  is taken as relative to the layer's root, as Docker, containerd, umoci and GNU tar take it: it cannot
  lead out. Names longer than PATH_MAX are refused too, as any other extractor's system calls would.
- Go through a symlink: every entry is made relative to a descriptor of its parent directory, opened one
  component at a time from ``dest`` with O_NOFOLLOW|O_DIRECTORY, so ``a -> /etc`` then ``a/passwd`` (or
  ``a -> ..`` then ``a/x``, or a whiteout or hard-link target below ``a``) stops the unpack instead of
  writing, deleting or linking anything outside. No call follows the entry it acts on either. A symlink's
  target is data, stored as it is.
- Forge overlay's bookkeeping: an xattr in overlay's or layerfs's private namespaces
  (``whiteout.is_private_xattr``: ``trusted.overlay.opaque``, ``.redirect``, ``.metacopy``...) would change
  what the layers below show, so it is refused rather than dropped. A name starting ``.wh.`` is a
  whiteout or the opaque marker, or refused (``.wh.``, ``.wh...``, AUFS's ``.wh..wh.*`` metadata, a
  ``.wh.`` name used as a directory).
- Be damaged: truncated or corrupt gzip or tar data (a tar that ends inside an entry's data, inside a
  header, or after a PAX or GNU long-name record without the entry it is for), a PAX or GNU long-name
  record over 1 MiB (Go's archive/tar limit), an entry type tar layers do not use, a sparse file. The
  tar is read by ``tarstream``, which says what it takes as whole: a tar that ends right after an
  entry's data, without the padding of its last block or the end-of-archive block, is (``umoci insert``
  writes such layers, and Go's archive/tar, which docker, containerd, podman and umoci read layers with,
  takes them as GNU tar takes a tar that ends at a block boundary without its end block).
- Ask what the machine refuses: a full disk, an owner or a device node an unprivileged caller cannot
  make (no "rootless" mapping is attempted: run as root, or in a user namespace where the layer's ids
  are mapped), an xattr the filesystem cannot hold. Whiteouts need no privilege (Linux lets anyone make
  a 0/0 device); the opaque mark falls back as ``whiteout.mark_opaque`` does, to ``user.overlay.opaque``
  (which kernel overlayfs reads only with its ``userxattr`` option) where the trusted one is refused.

``progress(done, total)`` follows the bytes read from ``stream`` (compressed ones, for a gzip layer);
``total`` is what a seekable stream holds from its position, None for a pipe.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import queue
import re
import stat
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, BinaryIO, NamedTuple, cast

import zstandard

from ..core import confined, whiteout, xattr
from ..errors import LayerfsError, printable
from . import tarstream
from .tarstream import Header

_CHUNK = 1 << 20  # bytes read from the stream, or written to a file, at a time: one progress step
_AHEAD = 8  # chunks read ahead of the parsing
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_MAX = 4096
# How copy_file_range says it cannot copy between these two files (other filesystems, kernels before 5.3)
_NO_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XATTR_RECORD = "SCHILY.xattr."
_NODES = {tarstream.CHR: stat.S_IFCHR, tarstream.BLK: stat.S_IFBLK, tarstream.FIFO: stat.S_IFIFO}
_KINDS = (tarstream.REG, tarstream.DIR, tarstream.SYM, tarstream.LNK, *_NODES)  # what a layer's entries are
_IDS = range(0, 2**32 - 1)  # (uid_t)-1 means "leave unchanged" to chown: not an owner
_PAX_TIME = re.compile(r"(-?)([0-9]+)(?:\.([0-9]*))?")


# A regular file's data in the tar: (the offset of its first byte, its size, its path in the layer).
DataRef = tuple[int, int, str]


class UnpackResult(NamedTuple):
    """What was unpacked."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar: the image config's rootfs.diff_ids entry
    entries: int  # tar entries applied: files, directories, links, whiteouts, opaque markers...
    size: int  # bytes of the uncompressed tar
    # Where each regular file's data is in the tar, in order, so the tar can be put back together from
    # the layer; None where some of its data is not in the layer (replaced by a later entry, a whiteout
    # file's).
    data: tuple[DataRef, ...] | None


ProgressFn = Callable[[int, int | None], None]


def unpack_layer(stream: BinaryIO, dest: str, *, progress: ProgressFn | None = None) -> UnpackResult:
    """Unpack the layer tar read from ``stream`` into ``dest``, an existing empty directory.

    Raises LayerfsError, with ``dest`` emptied again, when the layer is damaged or hostile or cannot be
    written; ``stream`` is then left wherever the reading stopped.
    """
    with _Dest(dest) as target:
        try:
            return _Unpacker(target, stream, progress).run()
        except BaseException as e:
            target.undo(e)
            raise


# -- reading the layer ----------------------------------------------------------------------------------


class _Reason(Exception):
    """Why the unpack stops, without the where: the caller adds which entry it was at."""


class _Raw:
    """The stream as given, read a chunk at a time, counted for ``progress``. Once ``start``ed, a thread of its
    own reads ahead (and hashes what it reads, for an uncompressed layer, whose diff_id is that of these
    bytes), so the reading, the hashing and a caller's copy of the stream (``store.blobs.Tee``) overlap the
    making of entries, whose system calls leave the interpreter free."""

    def __init__(self, stream: BinaryIO, progress: ProgressFn | None, stop: threading.Event) -> None:
        self.stream = stream
        self.progress = progress
        self.total = _remaining(stream)
        self.file = _file_at(stream)
        self.done = 0
        self.buf = b""
        self.pos = 0
        self.sha: hashlib._Hash | None = None
        self._ahead: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_AHEAD)
        self._stop = stop  # set: the unpack is over, the reading ahead ends
        self._ended = False
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, None if self.total is None else max(self.total, self.done))

    def _more(self) -> bytes:
        try:
            chunk = self.stream.read(_CHUNK)
        except OSError as e:
            raise _Reason(f"cannot read the layer: {e.strerror or e}") from e
        if chunk is None:
            raise _Reason("cannot read the layer: the stream is non-blocking and has no data")
        if chunk:
            self.done += len(chunk)
            self.report()
        return chunk

    def peek(self, n: int) -> bytes:
        """(Before ``start``.)"""
        while len(self.buf) - self.pos < n:
            chunk = self._more()
            if not chunk:
                break
            self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return self.buf[self.pos : self.pos + n]

    def start(self, *, hashed: bool) -> None:
        """Read ahead from here on; ``hashed``: hash every byte of the stream into ``sha``."""
        if hashed:
            self.sha = hashlib.sha256(self.buf)
        threading.Thread(target=self._read_ahead, daemon=True).start()

    def _read_ahead(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._more()
                if self.sha is not None:
                    self.sha.update(chunk)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # the reader's to raise, where it gets to it
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._ahead.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        if self.pos == len(self.buf):
            self.buf, self.pos = self._next_chunk(), 0
        data = self.buf[self.pos :] if n < 0 else self.buf[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Move past up to ``n`` bytes without copying them; how many, 0 at the end."""
        if self.pos == len(self.buf):
            self.buf, self.pos = self._next_chunk(), 0
        n = min(n, len(self.buf) - self.pos)
        self.pos += n
        return n

    def _next_chunk(self) -> bytes:
        if self._ended:
            return b""
        while True:
            try:
                item = self._ahead.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise _Reason("stopped") from None  # (the unpack is over: no one reads this)
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = not item
        return item


class _TarFile(NamedTuple):
    """A stream that is a regular file, whose bytes can be copied by offset."""

    fd: int
    offset: int  # where the stream stood
    written: tuple[int, int, int]  # its size, mtime and ctime then

    def changed(self) -> bool:
        """Whether the file was written to since: what was copied from it may not be what was hashed."""
        return _written(os.fstat(self.fd)) != self.written


def _written(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_at(stream: BinaryIO) -> _TarFile | None:
    """The stream as a regular file; None where it is not one."""
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return _TarFile(fd, stream.tell(), _written(st))
    except (OSError, AttributeError, ValueError):
        pass
    return None


def _remaining(stream: BinaryIO) -> int | None:
    """Bytes a seekable stream holds from where it is; None when it cannot tell (a pipe)."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return max(end - here, 0)
    except (OSError, AttributeError, ValueError):
        return None


class _Input:
    """The uncompressed tar, hashed and counted as it goes by."""

    def __init__(self, stream: BinaryIO, progress: ProgressFn | None, stop: threading.Event) -> None:
        self.raw = _Raw(stream, progress, stop)
        raw = cast(BinaryIO, self.raw)  # (it has read, all the decompressors ask of it)
        self.decompressed: IO[bytes] | gzip.GzipFile | None = None  # None: not compressed
        head = self.raw.peek(4)
        self.compression = "zstd" if head.startswith(_ZSTD_MAGIC) else "gzip" if head.startswith(_GZIP_MAGIC) else None
        if self.compression == "zstd":
            # read_across_frames: a layer may be several zstd frames one after the other, as gzip members.
            self.decompressed = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        elif self.compression == "gzip":
            self.decompressed = gzip.GzipFile(fileobj=raw, mode="rb")
        self.sha = hashlib.sha256()  # of the decompressed tar; an uncompressed one's is the raw stream's
        self._decompressed_size = 0
        self.raw.start(hashed=self.compression is None)
        # (an uncompressed tar is read from the stream's chunks straight: hashed and counted there)
        self.read: Callable[[int], bytes] = self.raw.read if self.decompressed is None else self._decompress
        self.skip: Callable[[int], int] | None = self.raw.skip if self.decompressed is None else None
        # An uncompressed tar in a file: where its bytes are, for the kernel to copy a file's data from.
        self.file = self.raw.file if self.decompressed is None else None

    def _decompress(self, n: int) -> bytes:
        assert self.decompressed is not None
        try:
            data = self.decompressed.read(n)
        except EOFError:
            raise _Reason(f"the {self.compression} data ends early (truncated)") from None
        except (zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise _Reason(f"the {self.compression} data is damaged ({e})") from None
        self.sha.update(data)
        self._decompressed_size += len(data)
        return data

    def size(self) -> int:
        """(Once drained.) Bytes of the uncompressed tar."""
        return self.raw.done if self.decompressed is None else self._decompressed_size

    def drain(self) -> None:
        """Read what follows the tar's end block (more zeros, as a rule): the diff_id covers it too, and a
        gzip stream is only known whole at its end."""
        while self.read(_CHUNK):
            pass

    def diff_id(self) -> str:
        """(Once drained.)"""
        return "sha256:" + (self.raw.sha or self.sha).hexdigest()


# -- the entries ----------------------------------------------------------------------------------------


class _Unpacker:
    def __init__(self, dest: _Dest, stream: BinaryIO, progress: ProgressFn | None) -> None:
        self.dest = dest
        self.stream = stream
        self.progress = progress
        self.tree = _Tree(dest)
        self.entries = 0
        self.current: str | None = None  # the entry being applied
        self.last: str | None = None  # the last one applied
        self.data: list[DataRef] | None = []  # (None: some data is not kept)
        self.source: _TarFile | None = None  # the tar's file, to copy files' data from

    def run(self) -> UnpackResult:
        try:
            try:
                data = self._unpack()
            finally:
                self.tree.close()
        except (_Reason, tarstream.Damaged) as e:
            raise LayerfsError(f"{self._where()}: {e}") from None
        except OSError as e:
            raise LayerfsError(f"{self._where()}: {e.strerror or e}") from e
        except (OverflowError, ValueError) as e:  # a number out of range for a system call
            raise LayerfsError(f"{self._where()}: {e}") from e
        kept = None if self.data is None or self.tree.removed else tuple(self.data)
        return UnpackResult(data.diff_id(), self.entries, data.size(), kept)

    def _where(self) -> str:
        if self.current is not None:
            return f"cannot unpack layer entry {_show(self.current)}"
        if self.last is not None:
            return f"cannot unpack the layer after entry {_show(self.last)}"
        return "cannot unpack the layer"

    def _unpack(self) -> _Input:
        stop = threading.Event()
        data = _Input(self.stream, self.progress, stop)
        try:
            tar = tarstream.TarReader(data.read, data.skip)
            self.source = data.file
            while (info := tar.next()) is not None:
                self.current = info.name
                self._entry(info, tar)
                tar.skip_data()  # (a whiteout file's, which no one wants: read whole all the same)
                self.entries += 1
                self.last, self.current = self.current, None
            data.drain()
            if data.file is not None and data.file.changed():
                raise _Reason("the tar's file changed while it was read")
        finally:
            stop.set()
        self.tree.finish()
        data.raw.report()
        return data

    def _entry(self, info: Header, tar: tarstream.TarReader) -> None:
        parts = _parts(info.name, "the name")
        if info.sparse:
            raise _Reason("it is a sparse file (tar --sparse), which a layer does not hold")
        if whiteout.WHITEOUT_PREFIX in info.name and self._marker(parts, info):
            return
        if info.type == tarstream.REG and info.size and self.data is not None:
            self.data.append((info.offset_data, info.size, "/".join(parts)))
        kind = info.type
        if kind == tarstream.CHR and info.dev == (0, 0) and parts:
            self.tree.whiteout(parts)
            return
        if kind not in _KINDS:
            raise _Reason(f"entry type {kind!r} is not one an image layer holds")
        if not parts:
            if kind != tarstream.DIR:
                raise _Reason("the layer's root can only be a directory")
            self.tree.root_dir(_Meta(info))
            return
        if kind == tarstream.LNK:
            self._hard_link(parts, info)
            return
        meta = _Meta(info)
        if kind == tarstream.SYM and "\0" in info.linkname:
            raise _Reason("the symlink target holds a NUL byte")
        parent, name = self.tree.place(parts)
        try:
            self._make(info, parent, name, parts, meta, tar)
        except FileExistsError:  # a later entry for a path replaces the earlier
            if not self.tree.clear(parent, name, parts, directory=kind == tarstream.DIR):
                self.tree.update_dir(parts, meta)  # a directory over a directory: its metadata only
                return
            self._make(info, parent, name, parts, meta, tar)

    def _make(
        self, info: Header, parent: int, name: str, parts: tuple[str, ...], meta: _Meta, tar: tarstream.TarReader
    ) -> None:
        """The entry made as ``name`` in ``parent``: FileExistsError, with nothing made, where the name is taken."""
        kind = info.type
        if kind == tarstream.REG:
            self._file(parent, name, info, meta, tar)
        elif kind == tarstream.DIR:
            self.tree.new_dir(parent, name, parts, meta)
        elif kind == tarstream.SYM:
            os.symlink(info.linkname, name, dir_fd=parent)
            meta.apply_at(parent, name, symlink=True)
        else:
            node = _NODES[kind]
            rdev = os.makedev(*info.dev) if node != stat.S_IFIFO else 0
            try:
                os.mknod(name, node | 0o600, rdev, dir_fd=parent)
            except PermissionError:
                raise _Reason("making a device node needs root (CAP_MKNOD)") from None
            meta.apply_at(parent, name)

    def _marker(self, parts: tuple[str, ...], info: Header) -> bool:
        """Whether the entry is a whiteout or the opaque marker, which is applied here. (A ``.wh.`` name as a
        directory is refused.)"""
        for i, part in enumerate(parts[:-1]):
            if whiteout.is_marker_name(part):
                raise _Reason(f"{_show('/'.join(parts[: i + 1]))} is a whiteout name, which cannot be a directory")
        if not parts or not whiteout.is_marker_name(parts[-1]):
            return False
        if info.type == tarstream.REG and info.size:
            self.data = None  # (a marker's data is not in the layer)
        name = parts[-1]
        if name == whiteout.OPAQUE_MARKER:
            self.tree.opaque(parts[:-1])
            return True
        hidden = whiteout.whited_out_name(name)
        if hidden is None or hidden in (".", "..") or whiteout.is_marker_name(hidden):
            raise _Reason("it is neither a whiteout (.wh.NAME) nor the opaque marker (.wh..wh..opq)")
        self.tree.whiteout(parts[:-1] + (hidden,))
        return True

    def _hard_link(self, parts: tuple[str, ...], info: Header) -> None:
        target = _parts(info.linkname, f"its hard-link target {_show(info.linkname)}")
        if target == parts:
            raise _Reason("it is a hard link to itself")
        if target[: len(parts)] == parts:  # the directory it replaces would take its target with it
            raise _Reason(f"its hard-link target {_show(info.linkname)} is below it")
        try:
            target_dir = self.tree.reach(target[:-1])
        except _Reason as e:
            raise _Reason(f"its hard-link target {_show(info.linkname)} cannot be reached: {e}") from None
        try:
            st = _lstat(target[-1], target_dir) if target else None
            if st is None or whiteout.is_whiteout_stat(st):
                raise _Reason(f"its hard-link target {_show(info.linkname)} is not in the layer")
            if stat.S_ISDIR(st.st_mode):
                raise _Reason(f"its hard-link target {_show(info.linkname)} is a directory")
            parent, name = self.tree.place(parts)
            try:
                os.link(target[-1], name, src_dir_fd=target_dir, dst_dir_fd=parent, follow_symlinks=False)
            except FileExistsError:
                self.tree.clear(parent, name, parts, directory=False)
                os.link(target[-1], name, src_dir_fd=target_dir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(target_dir)

    def _file(self, parent: int, name: str, info: Header, meta: _Meta, tar: tarstream.TarReader) -> None:
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            if not (info.size and self._copy_data(info, fd)):
                for piece in tar.data():
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
            meta.apply_fd(fd)
        finally:
            os.close(fd)

    def _copy_data(self, info: Header, fd: int) -> bool:
        """The entry's data copied into ``fd`` by the kernel from the tar's file, without passing through the
        interpreter (the stream still goes by: it is hashed and checked there, and a tar that ends inside the
        data is told there). False where there is no file to copy from or its filesystem refuses: the data
        then comes from the stream."""
        if self.source is None:
            return False
        src = self.source.fd
        start = self.source.offset + info.offset_data
        at, end = start, start + info.size
        while at < end:
            try:
                copied = os.copy_file_range(src, fd, end - at, at)
            except OSError as e:
                if at == start and e.errno in _NO_COPY:
                    self.source = None  # (and the same for every other file)
                    return False
                raise
            if not copied:
                break  # the file ends first: the stream, which does too, says so
            at += copied
        return True


class _Meta:
    """An entry's owner, mode, times and xattrs, checked, and applied without following it."""

    def __init__(self, info: Header) -> None:
        if info.uid not in _IDS or info.gid not in _IDS:
            raise _Reason(f"its owner {info.uid}:{info.gid} is out of range")
        self.uid, self.gid = info.uid, info.gid
        self.mode = stat.S_IMODE(info.mode)
        pax = info.pax
        mtime = _pax_time(pax, "mtime") if "mtime" in pax else info.mtime * 10**9
        self.times = (_pax_time(pax, "atime") if "atime" in pax else mtime, mtime)
        self.xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if not key.startswith(_XATTR_RECORD):
                continue
            attr = key[len(_XATTR_RECORD) :]
            if whiteout.is_private_xattr(attr):
                raise _Reason(
                    f"it carries the xattr {_show(attr)}, overlay's own bookkeeping, which a layer may not set"
                )
            if not attr or "\0" in attr:
                raise _Reason(f"it carries an xattr with an invalid name {_show(attr)}")
            self.xattrs[attr] = value.encode("utf-8", "surrogateescape")

    def _chown_failed(self, e: OSError) -> _Reason:
        return _Reason(f"cannot give it the owner {self.uid}:{self.gid}: {e.strerror} (that needs root)")

    def apply_fd(self, fd: int, *, with_mode: bool = True) -> None:
        """A regular file or directory, open: owner, then xattrs (a change of owner clears
        security.capability), then mode (setuid survives only a chown made before), then times."""
        try:
            os.chown(fd, self.uid, self.gid)
        except PermissionError as e:
            raise self._chown_failed(e) from None
        for attr, value in self.xattrs.items():
            os.setxattr(fd, attr, value)
        if with_mode:
            os.chmod(fd, self.mode)
            os.utime(fd, ns=self.times)

    def own_at(self, parent: int, name: str) -> None:
        """Owner and xattrs of ``name`` in ``parent``, which no call follows or opens."""
        try:
            os.chown(name, self.uid, self.gid, dir_fd=parent, follow_symlinks=False)
        except PermissionError as e:
            raise self._chown_failed(e) from None
        for attr, value in self.xattrs.items():
            xattr.set(name, attr, value, dir_fd=parent)

    def apply_at(self, parent: int, name: str, *, symlink: bool = False) -> None:
        """A symlink, device or fifo ``name`` in ``parent``, which no call follows or opens."""
        self.own_at(parent, name)
        if not symlink:
            # os.chmod takes no dir_fd without following; through the parent's /proc entry the kernel
            # looks ``name`` up in that directory and, with AT_SYMLINK_NOFOLLOW, does not follow it.
            os.chmod(f"/proc/self/fd/{parent}/{name}", self.mode, follow_symlinks=False)
        os.utime(name, ns=self.times, dir_fd=parent, follow_symlinks=False)


def _pax_time(pax: dict[str, str], key: str) -> int:
    """A PAX time record in ns, exactly (no float on the way)."""
    value = pax[key]
    m = _PAX_TIME.fullmatch(value)
    if m is None:
        raise _Reason(f"its PAX {key} record {value!r} is not a time")
    sign, seconds, fraction = m.groups()
    ns = int(seconds) * 10**9 + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _parts(name: str, what: str) -> tuple[str, ...]:
    """``name``'s components below the layer's root: a leading ``/``, ``.`` and empty components dropped,
    ``..`` taken back lexically (nothing is looked up); climbing above the root is refused."""
    if "\0" in name:
        raise _Reason(f"{what} holds a NUL byte")
    if ".." not in name and len(name) * 4 < _PATH_MAX:  # (as a rule: nothing to take back, short enough)
        return tuple([part for part in name.split("/") if part and part != "."])
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise _Reason(f"{what} leads out of the layer")
            out.pop()
        else:
            out.append(part)
    if len("/".join(out).encode("utf-8", "surrogateescape")) >= _PATH_MAX:
        raise _Reason(f"{what} is longer than PATH_MAX")
    return tuple(out)


# -- the layer directory --------------------------------------------------------------------------------


class _Dest:
    """The destination directory: its root's descriptor, and how to empty it again."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LayerfsError(f"cannot unpack into {path}: {e.strerror}") from e
        try:
            if os.listdir(self.root):
                raise LayerfsError(f"cannot unpack into {path}: it is not empty")
            self.st = os.fstat(self.root)
            self.xattrs = _all_xattrs(self.root)
        except BaseException as e:
            os.close(self.root)
            if isinstance(e, OSError):
                raise LayerfsError(f"cannot unpack into {path}: {e.strerror}") from e
            raise

    def __enter__(self) -> _Dest:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.root)

    def undo(self, error: BaseException) -> None:
        """Remove everything unpacked and give the root its metadata back; a failure to do so is told
        together with ``error``, what made the unpack stop."""
        try:
            for name in os.listdir(self.root):
                st = _lstat(name, self.root)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    _remove_tree(self.root, name)
                elif st is not None:
                    os.unlink(name, dir_fd=self.root)
            now = _all_xattrs(self.root)
            for attr in now.keys() - self.xattrs.keys():
                os.removexattr(self.root, attr)
            for attr, value in self.xattrs.items():
                if now.get(attr) != value:
                    os.setxattr(self.root, attr, value)
            st = os.fstat(self.root)
            if (st.st_uid, st.st_gid) != (self.st.st_uid, self.st.st_gid):
                os.chown(self.root, self.st.st_uid, self.st.st_gid)
            if st.st_mode != self.st.st_mode:
                os.chmod(self.root, stat.S_IMODE(self.st.st_mode))
            os.utime(self.root, ns=(self.st.st_atime_ns, self.st.st_mtime_ns))
        except OSError as e:
            raise LayerfsError(f"{error}; and {self.path} could not be emptied again: {e.strerror}") from error


def _all_xattrs(fd: int) -> dict[str, bytes]:
    try:
        return {attr: os.getxattr(fd, attr) for attr in os.listxattr(fd)}
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _remove_tree(parent: int, name: str) -> None:
    """Remove the directory ``name`` in ``parent`` with all it holds, never following a symlink.

    Each subdirectory is moved up into ``parent`` under a spare name before it is emptied, so the work
    needs two descriptors and no recursion however deep the tree: a layer cannot make its own removal
    run out of either.
    """
    todo = [name]
    spare = 0
    while todo:
        current = todo.pop()
        fd = os.open(current, _OPEN_DIR, dir_fd=parent)
        try:
            with os.scandir(fd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in children:
                if not is_dir:
                    os.unlink(child, dir_fd=fd)
                    continue
                while _lstat(f".layerfs-unpack-{spare}", parent) is not None:
                    spare += 1
                os.rename(child, f".layerfs-unpack-{spare}", src_dir_fd=fd, dst_dir_fd=parent)
                todo.append(f".layerfs-unpack-{spare}")
        finally:
            os.close(fd)
        os.rmdir(current, dir_fd=parent)


class _Tree:
    """The layer being built below the destination's root.

    Directories are reached one component at a time, never through a symlink (``confined.DirChain``,
    which makes the missing ones here). The descriptors from the root down to the last parent used stay
    open (a tar lists a directory's entries together, parents first), so the next parent costs the
    components that differ; an entry only ever replaces something below the last parent, never a
    directory on that chain. Directory modes and times wait in
    ``pending`` until the end. ``deleted`` holds every path the layer whites out: a directory made there
    is opaque, whatever came first.
    """

    def __init__(self, dest: _Dest) -> None:
        self.root = dest.root
        self.removed = False  # whether a later entry replaced something (and the data it had)
        self.chain = confined.DirChain(self.root, lambda fd, parts, i: self._step(fd, parts, i, create=True))
        self.pending = _Pending()
        self.deleted: set[str] = set()

    def close(self) -> None:
        self.chain.release()

    def reach(self, parts: tuple[str, ...]) -> int:
        """A new O_PATH descriptor of the existing directory ``parts``, for the caller to close."""
        fd = os.dup(self.root)
        try:
            for i in range(len(parts)):
                child = self._step(fd, parts, i, create=False)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _step(self, fd: int, parts: Sequence[str], i: int, *, create: bool) -> int:
        """The directory ``parts[i]`` in ``fd`` opened; with ``create``, made if missing (whiteouts of this
        layer give way to it)."""
        name = parts[i]
        try:
            return confined.open_dir(name, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
        shown = _show("/".join(parts[: i + 1]))
        st = _lstat(name, fd)
        if st is not None and not (create and whiteout.is_whiteout_stat(st)):
            if stat.S_ISLNK(st.st_mode):
                raise _Reason(f"{shown} is a symlink, which a layer is never written or read through")
            raise _Reason(f"{shown} is not a directory")
        if not create:
            raise _Reason(f"{shown} does not exist")
        if st is not None:
            os.unlink(name, dir_fd=fd)  # a whiteout of this layer: the directory hides the lower one too
        self._mkdir(fd, name, parts[: i + 1])
        self.pending.set(tuple(parts[: i + 1]), (0o755, None))  # implied by the tar: no metadata of its own
        return confined.open_dir(name, dir_fd=fd)

    def _mkdir(self, parent: int, name: str, parts: Sequence[str]) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)
        if "/".join(parts) in self.deleted:
            whiteout.mark_opaque(name, dir_fd=parent)

    def parent(self, parts: tuple[str, ...]) -> int:
        """The descriptor of the directory ``parts`` (made if missing), kept until another is asked for."""
        return self.chain.get(parts)

    def place(self, parts: tuple[str, ...]) -> tuple[int, str]:
        """Where an entry at ``parts`` is made: (its parent's descriptor, its name). A whiteout of the name
        by this layer in OCI form goes (the form make_whiteout falls back to where it may not make a device).
        What the name holds already is ``clear``'s, once the making finds it taken (most names are new: no
        lookup before each)."""
        fd = self.parent(parts[:-1])
        name = parts[-1]
        if self.deleted and "/".join(parts) in self.deleted:
            try:
                os.unlink(whiteout.oci_whiteout_name(name), dir_fd=fd)
            except FileNotFoundError:
                pass
        return fd, name

    def clear(self, fd: int, name: str, parts: tuple[str, ...], *, directory: bool) -> bool:
        """What a later entry at ``parts`` replaces (``name`` in ``fd``) removed; False where a directory
        comes over a directory, which stays."""
        st = _lstat(name, fd)
        if st is None:
            return True
        if stat.S_ISDIR(st.st_mode):
            if directory:
                return False
            _remove_tree(fd, name)
            self.pending.drop(parts)
        else:
            os.unlink(name, dir_fd=fd)
        self.removed = True
        return True

    def new_dir(self, parent: int, name: str, parts: tuple[str, ...], meta: _Meta) -> None:
        self._mkdir(parent, name, parts)
        meta.own_at(parent, name)  # (by name: the directory is opened when its entries come, not for this)
        self.pending.set(parts, (meta.mode, meta.times))

    def update_dir(self, parts: tuple[str, ...], meta: _Meta) -> None:
        fd = os.open(parts[-1], _OPEN_DIR, dir_fd=self.parent(parts[:-1]))
        try:
            self._restate(fd, parts, meta)
        finally:
            os.close(fd)

    def root_dir(self, meta: _Meta) -> None:
        self._restate(self.root, (), meta)

    def _restate(self, fd: int, parts: tuple[str, ...], meta: _Meta) -> None:
        """A directory's metadata replaced by a later entry's: xattrs it no longer has go (overlay's
        markers stay, they are the layer's)."""
        for attr in _all_xattrs(fd):
            if attr not in meta.xattrs and not whiteout.is_private_xattr(attr):
                os.removexattr(fd, attr)
        meta.apply_fd(fd, with_mode=False)
        self.pending.set(parts, (meta.mode, meta.times))

    def whiteout(self, parts: tuple[str, ...]) -> None:
        """Hide ``parts`` in the layers below. What this layer has there stays; a directory turns opaque."""
        fd = self.parent(parts[:-1])
        name, path = parts[-1], "/".join(parts)
        st = _lstat(name, fd)
        if st is None:
            if path not in self.deleted:  # else made already, in OCI form
                whiteout.make_whiteout(name, dir_fd=fd)
        elif stat.S_ISDIR(st.st_mode):
            whiteout.mark_opaque(name, dir_fd=fd)
        self.deleted.add(path)

    def opaque(self, parts: tuple[str, ...]) -> None:
        """Hide what the layers below have in the directory ``parts`` (made if missing)."""
        whiteout.mark_opaque(".", dir_fd=self.parent(parts))

    def finish(self) -> None:
        """Directory modes and times, children first: making entries moved the times, and a read-only mode
        set earlier would have stopped the making."""
        for parts, (mode, times) in self.pending.children_first():
            if not parts:
                fd = os.dup(self.root)
            else:
                fd = os.open(parts[-1], _OPEN_DIR, dir_fd=self.parent(parts[:-1]))
            try:
                os.chmod(fd, mode)
                if times is not None:
                    os.utime(fd, ns=times)
            finally:
                os.close(fd)


class _Pending:
    """Directory metadata waiting for the end, as a tree of names: dropping a directory a later entry
    replaced drops what waited below it, in one step."""

    def __init__(self) -> None:
        self.tree: dict = {}  # name -> subtree; the key None holds the directory's own (mode, times)

    def set(self, parts: tuple[str, ...], value: tuple[int, tuple[int, int] | None]) -> None:
        node = self.tree
        for part in parts:
            node = node.setdefault(part, {})
        node[None] = value

    def drop(self, parts: tuple[str, ...]) -> None:
        node = self.tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                return
            node = child
        node.pop(parts[-1], None)

    def children_first(self) -> Iterator[tuple[tuple[str, ...], tuple[int, tuple[int, int] | None]]]:
        stack: list[tuple[tuple[str, ...], dict, bool]] = [((), self.tree, False)]
        while stack:
            parts, node, expanded = stack.pop()
            if expanded:
                if None in node:
                    yield parts, node[None]
                continue
            stack.append((parts, node, True))
            stack.extend((parts + (name,), child, False) for name, child in node.items() if name is not None)


def _show(name: str) -> str:
    """A name for a one-line message: quoted, bytes that are not UTF-8 and control characters escaped,
    shortened when very long."""
    text = printable(name)
    if len(text) > 200:
        text = text[:120] + f"…[{len(text)} characters]"
    return f"'{text}'"
