"""A container's changes written as an OCI image layer: a tar stream, gzip-compressed if asked.

``write_layer(out, upper, changes(upper, lowers))`` turns the ``docker diff`` view of an upper directory
into the layer that, applied over the lowers' image by any OCI tool, gives the container's merged tree.
The tar follows the image-spec's layer rules, which differ from what is stored in the upper directory:

- a deletion is an empty regular file ``.wh.NAME`` beside the deleted name, written before its siblings
  (some extractors apply entries strictly in order); an opaque upper directory is its directory entry
  followed at once by ``DIR/.wh..wh..opq``. The upper's own markers (0/0 character devices, ``.wh.*``
  files, opaque xattrs) are bookkeeping of the overlay format and never travel as themselves.
- A file with several names in this layer is stored once; its other names are hard-link entries to the
  first name written, so the extracted layer keeps the link.
- Owners are numeric (empty user and group names: the image's /etc/passwd, not the host's, gives them a
  meaning); mode bits keep setuid, setgid and sticky; mtimes keep nanoseconds in PAX records; xattrs go in
  PAX ``SCHILY.xattr.*`` records, except overlay's and layerfs's private ones. Sockets are left out: they
  belong to a running process, and tar cannot hold them.
- Names are stored as bytes: a name that is not UTF-8 travels unchanged (PAX ``hdrcharset=BINARY``).

Deterministic: the same upper directory and changes give the same bytes, so a rebuilt layer has the same
digest and registries and caches can share it. Entries come in path order, as ``changes`` lists them
(whiteouts moved before their siblings), no atime or ctime is stored, PAX records are in a fixed order,
whiteout files carry no time at all, ``mtime_clamp_ns`` caps every mtime (for SOURCE_DATE_EPOCH-style
builds), and the gzip header has neither a time nor a name.

Everything is read relative to descriptors of the upper's real directories, opened one component at a
time without following symlinks, and no entry is followed: a symlink in the upper that points outside is
written as a symlink, and an upper directory swapped for a symlink during the export stops it with an error
instead of leading it out of the upper directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple, cast

from ..core import confined, whiteout, xattr
from ..core.changes import DELETED, Change
from ..errors import LayerfsError

_CHUNK = 1 << 20  # bytes read from a file at a time: one progress step
_CAPABILITY = "security.capability"
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: never hang on a fifo
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # the path, or a directory on it, is not what it was

_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFREG: tarfile.REGTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
}


class LayerDigests(NamedTuple):
    """How an image refers to the layer just written."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar: the image config's rootfs.diff_ids entry
    digest: str  # "sha256:<hex>" of the bytes written: the manifest's layer descriptor, the blob's name
    size: int  # bytes written: the descriptor's size


ProgressFn = Callable[[int, int], None]


def write_layer(out: BinaryIO, upper: str, changes: Iterable[Change], *, compress: bool = False,
                mtime_clamp_ns: int | None = None, progress: ProgressFn | None = None) -> LayerDigests:
    """Write the OCI layer for ``changes`` (from ``layerfs.core.changes.changes``) of ``upper`` to ``out``.

    Entries are read from ``upper`` as they are now. Both digests are computed as the bytes go by, so the
    layer is never held in memory nor read back. ``progress(done, total)`` follows the file data written
    (``total`` from an lstat of every entry before the first byte). A change whose path is no longer in
    ``upper`` raises LayerfsError, as does a failure to read the upper or to write ``out``; ``out`` then
    holds an unfinished layer for the caller to discard.
    """
    with _Upper(upper) as tree:
        items = [item for change in changes if (item := tree.classify(change)) is not None]
        items.sort(key=_order)
        meter = _Progress(progress, _data_size(items))
        stream = _Stream(out, compress)
        # (a writing TarFile calls write and tell alone, which is all the stream has)
        tar = tarfile.TarFile(fileobj=cast(BinaryIO, stream), mode="w", format=tarfile.PAX_FORMAT,
                              encoding="utf-8", errors="surrogateescape", copybufsize=_CHUNK)
        writer = _Writer(tar, tree, mtime_clamp_ns, meter)
        meter.report()
        if tree.root_opaque():
            writer.marker(whiteout.OPAQUE_MARKER)
        for item in items:
            writer.write(item)
        tar.close()  # the end-of-archive blocks; ``stream`` itself stays open for the gzip trailer
        return stream.finish()


# -- first pass: what each change is -----------------------------------------------------------------


class _Item(NamedTuple):
    """One change, as the first pass found it in the upper directory."""

    path: str  # in the container: "/etc/passwd"
    st: os.stat_result | None  # None: a deletion, written as a whiteout file
    opaque: bool = False  # a directory that hides what the lowers have at its path
    source: tuple[str, str] | None = None  # in a lower layer (below a redirected directory): Change.source
    data: tuple[str, str] | None = None  # a metadata-only copy's data, in a lower layer: Change.data


def _order(item: _Item) -> list[tuple[int, str]]:
    """Sort key: path order, component by component as ``changes`` sorts, a whiteout before its siblings."""
    parts = item.path[1:].split("/")
    return [(1, p) for p in parts[:-1]] + [(0 if item.st is None else 1, parts[-1])]


def _data_size(items: list[_Item]) -> int:
    """Bytes of file data the layer will carry: each regular file once, however many names it has."""
    sizes = {(it.st.st_dev, it.st.st_ino): it.st.st_size for it in items
             if it.st is not None and stat.S_ISREG(it.st.st_mode)}
    return sum(sizes.values())


class _Upper:
    """The upper directory, reached one real directory at a time so that no access follows a symlink
    (``confined.DirChain``: entries come parents first and mostly in tree order, so only the components
    that differ from the previous entry's are opened)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        try:
            self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LayerfsError(f"upper directory {self.root}: {e.strerror}") from e
        self._chain = confined.DirChain(self.fd)
        self._lowers: dict[str, int] = {}  # root -> descriptor of the lower layers sources are read from

    def __enter__(self) -> _Upper:
        return self

    def __exit__(self, *exc: object) -> None:
        self._chain.release()
        for fd in self._lowers.values():
            os.close(fd)
        self._lowers.clear()
        os.close(self.fd)

    def gone(self, path: str) -> LayerfsError:
        return LayerfsError(f"cannot export {path}: it is no longer in the upper directory {self.root}")

    def failed(self, path: str, e: OSError) -> LayerfsError:
        if e.errno in _GONE:
            return self.gone(path)
        return LayerfsError(f"cannot export {path}: {e.strerror}")

    def parent(self, path: str) -> int:
        """A descriptor of the real directory holding ``path`` (a container path, not ``/``)."""
        try:
            return self._chain.get(path[1:].split("/")[:-1])
        except OSError as e:
            raise self.failed(path, e) from e

    @contextlib.contextmanager
    def directory_of(self, item: _Item) -> Iterator[tuple[int, str]]:
        """The real directory holding ``item`` and its name there: in the upper, or in the lower layer a
        source names (opened beneath that layer's root, without following a symlink on the way)."""
        if item.source is None:
            yield self.parent(item.path), os.path.basename(item.path)
            return
        head, _, name = item.source[1].rpartition("/")
        fd = self._open_lower(item.path, item.source[0], head or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def open_data(self, item: _Item) -> int:
        """The data of the metadata-only copy ``item``, opened in the lower layer that holds it."""
        if item.data is None:
            raise ValueError(f"{item.path} is no metadata-only copy")
        root, real = item.data
        return self._open_lower(item.path, root, real, _FILE_FLAGS)

    def _open_lower(self, path: str, root: str, real: str, flags: int) -> int:
        """``real`` of the lower layer at ``root`` opened beneath it, for the change at ``path``."""
        try:
            layer = self._lowers.get(root)
            if layer is None:
                layer = self._lowers[root] = os.open(root, _DIR_FLAGS)
            return confined.open_beneath(real[1:] or ".", flags, dir_fd=layer)
        except OSError as e:
            raise LayerfsError(f"cannot export {path} from {root}{real}: {e.strerror}") from e

    def root_opaque(self) -> bool:
        """An opaque upper root hides every lower entry; no change stands for it, so it is asked here."""
        return whiteout.is_opaque_dir(".", dir_fd=self.fd)

    def classify(self, change: Change) -> _Item | None:
        """What ``change`` is in the upper now; None for what a layer does not carry."""
        path = change.path
        name = os.path.basename(path)
        if path == "/" or whiteout.is_marker_name(name):
            return None  # the root has no entry; markers are never written as themselves
        if change.source is not None:  # still in a lower layer, below a redirected directory
            item = _Item(path, None, source=change.source, data=change.data)
            with self.directory_of(item) as (parent, real_name):
                try:
                    st = os.lstat(real_name, dir_fd=parent)
                except OSError as e:
                    raise self.failed(path, e) from e
            return None if stat.S_ISSOCK(st.st_mode) else item._replace(st=st)
        parent = self.parent(path)
        try:
            st = os.lstat(name, dir_fd=parent)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise self.failed(path, e) from e
            if change.kind == DELETED and self._has_oci_whiteout(parent, name, path):
                return _Item(path, None)
            raise self.gone(path) from e
        if whiteout.is_whiteout_stat(st):
            return _Item(path, None)
        if stat.S_ISSOCK(st.st_mode):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return _Item(path, st, data=change.data)
        # A directory reported deleted yet present was replaced: the lowers' content under it is gone.
        try:
            opaque = change.kind == DELETED or whiteout.is_opaque_dir(name, dir_fd=parent)
        except OSError as e:
            raise self.failed(path, e) from e
        return _Item(path, st, opaque)

    def _has_oci_whiteout(self, parent: int, name: str, path: str) -> bool:
        try:
            os.lstat(whiteout.oci_whiteout_name(name), dir_fd=parent)
            return True
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENAMETOOLONG):  # too long a name has no ".wh." twin
                return False
            raise self.failed(path, e) from e


# -- second pass: the tar entries --------------------------------------------------------------------


class _Writer:
    """Turns items into tar entries, reading each from the upper when it is written."""

    def __init__(self, tar: tarfile.TarFile, tree: _Upper, clamp_ns: int | None, meter: _Progress) -> None:
        self.tar = tar
        self.tree = tree
        self.clamp_ns = clamp_ns
        self.meter = meter
        self.first_name: dict[tuple[int, int], str] = {}  # (dev, ino) of a multi-link file -> its tar name

    def add(self, info: tarfile.TarInfo, data: _FileData | None = None) -> None:
        self.tar.addfile(info, data)
        # TarFile remembers every member for reading back; a writer never needs them, a big layer
        # would hold them all in memory.
        self.tar.members.clear()  # type: ignore[attr-defined]  # (not in typeshed's TarFile)

    def marker(self, name: str) -> None:
        """An OCI marker file (whiteout or opaque): empty, owned by root, mode and time 0."""
        info = tarfile.TarInfo(name)
        info.mode = 0
        self.add(info)

    def write(self, item: _Item) -> None:
        path, st = item.path, item.st
        name = path[1:]
        if st is None:
            head, _, base = name.rpartition("/")
            self.marker((head + "/" if head else "") + whiteout.oci_whiteout_name(base))
            return
        with self.tree.directory_of(item) as (parent, base):
            self._write_entry(item, st, parent, base)
        if item.opaque:
            self.marker(name + "/" + whiteout.OPAQUE_MARKER)

    def _write_entry(self, item: _Item, st: os.stat_result, parent: int, base: str) -> None:
        path = item.path
        name = path[1:]
        fd = None
        try:
            if stat.S_ISREG(st.st_mode) and item.data is None:
                fd = os.open(base, _FILE_FLAGS, dir_fd=parent)
                st = os.fstat(fd)  # the header must match the data read: take both from the open file
            elif stat.S_ISREG(st.st_mode):  # a metadata-only copy: its header from it, its data from below
                fd = self.tree.open_data(item)
            if stat.S_IFMT(st.st_mode) not in _TYPES or (fd is not None and not stat.S_ISREG(st.st_mode)):
                raise LayerfsError(f"cannot export {path}: it changed type during the export")
            info = self._header(name, st)
            link = self._hard_link(name, st)
            if link is not None:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, link, 0
                self.add(info)
                return
            info.pax_headers = {**info.pax_headers, **self._xattrs(base, parent, path)}
            if info.type == tarfile.SYMTYPE:
                info.linkname = os.readlink(base, dir_fd=parent)
            if fd is not None:
                info.size = st.st_size
                self.add(info, _FileData(fd, path, st.st_size, self.meter, self.tree))
            else:
                self.add(info)
        except OSError as e:
            raise self.tree.failed(path, e) from e
        finally:
            if fd is not None:
                os.close(fd)

    def _header(self, name: str, st: os.stat_result) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = _TYPES[stat.S_IFMT(st.st_mode)]
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        mtime_ns = st.st_mtime_ns if self.clamp_ns is None else min(st.st_mtime_ns, self.clamp_ns)
        info.mtime = mtime_ns // 10**9
        if mtime_ns % 10**9:
            # First in the PAX records, before the xattrs: a fixed order keeps the bytes reproducible.
            info.pax_headers = {"mtime": _pax_time(mtime_ns)}
        return info

    def _hard_link(self, name: str, st: os.stat_result) -> str | None:
        """The tar name this inode was first written under, if it was; remembers it otherwise."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
            return None
        key = (st.st_dev, st.st_ino)
        first = self.first_name.get(key)
        if first is None:
            self.first_name[key] = name
        return first

    def _xattrs(self, base: str, parent: int, path: str) -> dict[str, str]:
        """PAX records of the entry's own xattrs, sorted by name; values as bytes (surrogate-escaped).
        Of the security namespace only file capabilities travel: a label such as ``security.selinux``
        belongs to this host's policy, and umoci leaves it out too."""
        try:
            names = xattr.names(base, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return {}
            raise
        records = {}
        for attr in sorted(names):
            if whiteout.is_private_xattr(attr) or attr.startswith("security.") and attr != _CAPABILITY:
                continue
            try:
                value = xattr.get(base, attr, dir_fd=parent)
            except OSError as e:
                if e.errno == errno.ENODATA:  # removed since it was listed
                    continue
                raise
            try:
                attr.encode("utf-8")
            except UnicodeEncodeError:
                raise LayerfsError(f"cannot export {path}: xattr name {attr!r} is not UTF-8, "
                                   "which a PAX record cannot hold") from None
            records["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
        return records


def _pax_time(ns: int) -> str:
    """A PAX time record's value: seconds with up to nine decimals, exact (no float on the way)."""
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    seconds, fraction = divmod(ns, 10**9)
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0").rstrip(".")


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        self.report()

    def report(self) -> None:
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


class _FileData:
    """A regular file's data as tarfile reads it: exactly the size in its header, or an error."""

    def __init__(self, fd: int, path: str, size: int, meter: _Progress, tree: _Upper) -> None:
        self.fd = fd
        self.path = path
        self.left = size
        self.meter = meter
        self.tree = tree

    def read(self, n: int = -1, /) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        chunks = []
        got = 0
        while got < n:
            try:
                chunk = os.read(self.fd, n - got)
            except OSError as e:
                raise self.tree.failed(self.path, e) from e
            if not chunk:
                raise LayerfsError(f"cannot export {self.path}: it shrank during the export")
            chunks.append(chunk)
            got += len(chunk)
        self.left -= got
        self.meter.advance(got)
        return b"".join(chunks)


class _Stream:
    """Where tarfile writes: hashed as the uncompressed tar, compressed if asked, hashed and counted again
    as it goes to ``out``. gzip by zlib's own wrapper: its header has no time and no name."""

    def __init__(self, out: BinaryIO, compress: bool) -> None:
        self.out = out
        self.tar_sha = hashlib.sha256()
        self.tar_size = 0
        # wbits 16 + MAX_WBITS: a gzip member rather than a bare zlib stream.
        self.zip = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 16 + zlib.MAX_WBITS) \
            if compress else None
        self.out_sha = hashlib.sha256() if compress else self.tar_sha
        self.size = 0

    def write(self, data: bytes) -> int:
        self.tar_sha.update(data)
        self.tar_size += len(data)
        self._emit(self.zip.compress(data) if self.zip is not None else data)
        return len(data)

    def tell(self) -> int:
        return self.tar_size

    def finish(self) -> LayerDigests:
        if self.zip is not None:
            self._emit(self.zip.flush())
        try:
            self.out.flush()
        except OSError as e:
            raise LayerfsError(f"cannot write the layer: {e.strerror}") from e
        return LayerDigests("sha256:" + self.tar_sha.hexdigest(), "sha256:" + self.out_sha.hexdigest(), self.size)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.zip is not None:
            self.out_sha.update(data)
        self.size += len(data)
        view = memoryview(data)
        try:
            while view:
                n = self.out.write(view)
                if n is None or n >= len(view):
                    break
                view = view[n:]  # a raw stream may take part of it
        except OSError as e:
            raise LayerfsError(f"cannot write the layer: {e.strerror}") from e
