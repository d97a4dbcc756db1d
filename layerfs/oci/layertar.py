"""A container's changes written as an OCI image layer: a tar stream, gzip-compressed if asked.

``write_layer(out, upper, changes(upper, lowers))`` turns the ``docker diff`` view of an upper directory
into the layer that, applied over the lowers' image by any OCI tool, gives the container's merged tree.
What the layer holds for each change is decided in ``entries`` (whiteouts, opaque directories, what is
left out, hard links), which the store's commit follows too; this module writes those entries in the tar
form the image-spec's layer rules give them, which differs from what is stored in the upper directory:

- a deletion is an empty regular file ``.wh.NAME`` beside the deleted name, written before its siblings;
  an opaque directory is its directory entry followed at once by ``DIR/.wh..wh..opq``. The upper's own
  markers (0/0 character devices, ``.wh.*`` files, opaque xattrs) are bookkeeping of the overlay format
  and never travel as themselves.
- A file with several names in this layer is stored once; its other names are hard-link entries to the
  first name written, so the extracted layer keeps the link.
- Owners are numeric (empty user and group names: the image's /etc/passwd, not the host's, gives them a
  meaning); mode bits keep setuid, setgid and sticky; mtimes keep nanoseconds in PAX records; xattrs go in
  PAX ``SCHILY.xattr.*`` records, except overlay's and layerfs's private ones.
- Names are stored as bytes: a name that is not UTF-8 travels unchanged (PAX ``hdrcharset=BINARY``).

Deterministic: the same upper directory and changes give the same bytes, so a rebuilt layer has the same
digest and registries and caches can share it. Entries come in ``entries``' order, no atime or ctime is
stored, PAX records are in a fixed order, whiteout files carry no time at all, ``mtime_clamp_ns`` caps
every mtime (for SOURCE_DATE_EPOCH-style builds), and the gzip header has neither a time nor a name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from typing import BinaryIO, NamedTuple, cast

from ..core import whiteout, xattr
from ..core.changes import Change
from ..errors import LayerfsError
from .entries import Entry, FirstNames, Upper

_CHUNK = 1 << 20  # bytes read from a file at a time: one progress step
_CAPABILITY = "security.capability"

_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


class LayerDigests(NamedTuple):
    """How an image refers to the layer just written."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar: the image config's rootfs.diff_ids entry
    digest: str  # "sha256:<hex>" of the bytes written: the manifest's layer descriptor, the blob's name
    size: int  # bytes written: the descriptor's size


ProgressFn = Callable[[int, int], None]


def write_layer(
    out: BinaryIO,
    upper: str,
    changes: Iterable[Change],
    *,
    compress: bool = False,
    mtime_clamp_ns: int | None = None,
    progress: ProgressFn | None = None,
) -> LayerDigests:
    """Write the OCI layer for ``changes`` (from ``layerfs.core.changes.changes``) of ``upper`` to ``out``.

    Entries are read from ``upper`` as they are now. Both digests are computed as the bytes go by, so the
    layer is never held in memory nor read back. ``progress(done, total)`` follows the file data written
    (``total`` from an lstat of every entry before the first byte). A change whose path is no longer in
    ``upper`` raises LayerfsError, as does a failure to read the upper or to write ``out``; ``out`` then
    holds an unfinished layer for the caller to discard.
    """
    with Upper(upper) as tree:
        return write_entries(
            out, tree, tree.entries(changes), compress=compress, mtime_clamp_ns=mtime_clamp_ns, progress=progress
        )


def write_entries(
    out: BinaryIO,
    tree: Upper,
    found: list[Entry],
    *,
    compress: bool = False,
    mtime_clamp_ns: int | None = None,
    progress: ProgressFn | None = None,
) -> LayerDigests:
    """``write_layer`` for entries already found (``tree.entries``), as a commit that also builds a layer
    directory from the same entries writes it."""
    meter = _Progress(progress, _data_size(found))
    stream = _Stream(out, compress)
    # (a writing TarFile calls write and tell alone, which is all the stream has)
    tar = tarfile.TarFile(
        fileobj=cast(BinaryIO, stream),
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        copybufsize=_CHUNK,
    )
    writer = _Writer(tar, tree, mtime_clamp_ns, meter)
    meter.report()
    if tree.root_opaque():
        writer.marker(whiteout.OPAQUE_MARKER)
    for entry in found:
        writer.write(entry)
    tar.close()  # the end-of-archive blocks; ``stream`` itself stays open for the gzip trailer
    return stream.finish()


def _data_size(found: list[Entry]) -> int:
    """Bytes of file data the layer will carry: each regular file once, however many names it has."""
    sizes = {(e.st.st_dev, e.st.st_ino): e.st.st_size for e in found if e.st is not None and stat.S_ISREG(e.st.st_mode)}
    return sum(sizes.values())


# -- second pass: the tar entries --------------------------------------------------------------------


class _Writer:
    """Turns entries into tar entries, reading each from the upper when it is written."""

    def __init__(self, tar: tarfile.TarFile, tree: Upper, clamp_ns: int | None, meter: _Progress) -> None:
        self.tar = tar
        self.tree = tree
        self.clamp_ns = clamp_ns
        self.meter = meter
        self.first_names = FirstNames()

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

    def write(self, entry: Entry) -> None:
        path, st = entry.path, entry.st
        name = path[1:]
        if st is None:
            head, _, base = name.rpartition("/")
            self.marker((head + "/" if head else "") + whiteout.oci_whiteout_name(base))
            return
        with self.tree.directory_of(entry) as (parent, base):
            self._write_entry(entry, st, parent, base)
        if entry.opaque:
            self.marker(name + "/" + whiteout.OPAQUE_MARKER)

    def _write_entry(self, entry: Entry, st: os.stat_result, parent: int, base: str) -> None:
        path = entry.path
        name = path[1:]
        fd = None
        try:
            if stat.S_ISREG(st.st_mode):
                fd = self.tree.open_file(entry, parent, base)
                if entry.data is None:  # (a metadata-only copy: its header from it, its data from below)
                    st = os.fstat(fd)  # the header must match the data read: take both from the open file
            if stat.S_IFMT(st.st_mode) not in _TYPES or (fd is not None and not stat.S_ISREG(st.st_mode)):
                raise LayerfsError(f"cannot export {path}: it changed type during the export")
            info = self._header(name, st)
            link = self.first_names.link_target(path, st)
            if link is not None:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, link[1:], 0
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
                raise LayerfsError(
                    f"cannot export {path}: xattr name {attr!r} is not UTF-8, which a PAX record cannot hold"
                ) from None
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

    def __init__(self, fd: int, path: str, size: int, meter: _Progress, tree: Upper) -> None:
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
        self.zip = (
            zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if compress else None
        )
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
