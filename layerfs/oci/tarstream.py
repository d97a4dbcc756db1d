"""A tar read as a stream: each entry's header, then its data in pieces, nothing held but the chunk at hand.

What ``unpack`` needs from a layer tar, parsed strictly. (tarfile took half of an import's CPU time: a
TarInfo, a dozen method calls and several copies of every block, for each of a root filesystem's tens of
thousands of entries.) It reads the entries tarfile reads (tests/test_tarstream.py holds the two side by
side), in these forms:

- ustar, its name prefix included; v7 (an old-style directory is a regular file whose name ends in ``/``).
- GNU: long names and link targets (``L``, ``K`` records), base-256 numbers (big owners, sizes, times).
- PAX: ``x`` records for the entry that follows, ``g`` ones for every entry from there on. ``path``,
  ``linkpath``, ``size``, ``uid`` and ``gid`` replace the header's fields (and a GNU long name); every
  record is kept in ``Header.pax`` for the caller (times, xattrs). Of several records of a kind before an
  entry, the last counts (as in Go's archive/tar: a chain of them takes no more memory than one).
- Sparse files (GNU tar's ``--sparse``: type ``S``, or PAX ``GNU.sparse.*`` records) are marked
  ``sparse``, for the caller to refuse: their data and what follows them are not read right.

A tar ends at a zero block, or where the stream ends instead of a header, or in the padding after an
entry's data (Go's archive/tar, which docker, containerd, podman and umoci read layers with, takes such a
tar as whole: ``umoci insert`` writes them). Anything else is ``Damaged``, where tarfile would give way
or stop without a word: a bad checksum or number, a damaged PAX record, a header record without the
entry it is for or over 1 MiB (Go's limit; global records over 1 MiB in all), a stream that ends inside a
header or an entry's data.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator

BLOCK = 512
RECORD_MAX = 1 << 20  # largest PAX or GNU long-name record taken
_CHUNK = 1 << 20  # the largest piece of an entry's data asked of the source at a time

# Entry types (a regular file's other spellings, v7's NUL and the contiguous file, are read as REG)
REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_OTHER_REG = (b"\0", b"7")
_SPARSE = b"S"
_LONG_NAME, _LONG_LINK = b"L", b"K"
_PAX, _PAX_GLOBAL, _PAX_SOLARIS = b"x", b"g", b"X"
_RECORDS = (_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _PAX_SOLARIS)
_NO_DATA = (LNK, SYM, CHR, BLK, DIR, FIFO)  # their size field is not taken: no data follows them
_PAX_NUMBERS = frozenset(("size", "uid", "gid"))  # PAX records that replace a header's number
# GNU tar's records of a sparse file (formats 0.0, 0.1 and 1.0)
_PAX_SPARSE = frozenset(
    f"GNU.sparse.{key}"
    for key in ("major", "minor", "name", "realsize", "size", "map", "numblocks", "offset", "numbytes")
)

# name, mode, uid, gid, size, mtime, checksum, type, linkname, (magic, version, uname, gname), devmajor,
# devminor, prefix
_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s72x8s8s155s12x")
_SIGNED = struct.Struct("148b8x356b")  # (some old tars summed signed bytes for the checksum)
_ZEROS = bytes(BLOCK)


class Damaged(Exception):
    """Why the tar cannot be read further, as a clause for a one-line message."""


class Header:
    """One entry: its header with what its GNU and PAX records say."""

    __slots__ = (
        "name",
        "type",
        "linkname",
        "size",
        "mode",
        "uid",
        "gid",
        "mtime",
        "dev",
        "pax",
        "sparse",
        "offset_data",
    )

    def __init__(
        self, name: str, type_: bytes, linkname: str, numbers: tuple[int, ...], pax: dict[str, str], sparse: bool
    ) -> None:
        self.name = name
        self.type = type_  # one byte: REG, DIR... or whatever else the header says
        self.linkname = linkname
        self.size, self.mode, self.uid, self.gid, self.mtime, devmajor, devminor = numbers
        self.dev = (devmajor, devminor)
        self.pax = pax  # the PAX records that apply: the global ones, then the entry's own
        self.sparse = sparse
        self.offset_data = 0  # where its data starts in the tar


class _Records:
    """What the GNU and PAX records before an entry's header say. Of several of a kind, the last counts, as
    in Go's archive/tar: however many a tar chains, they take no more memory than one."""

    def __init__(self) -> None:
        self.seen = False
        self.long_name: str | None = None
        self.long_link: str | None = None
        self.pax: dict[str, str] = {}  # the entry's own PAX records
        self.globals: dict[str, str] = {}  # the last ``g`` record's

    def add(self, type_: bytes, record: bytes, start: int) -> None:
        self.seen = True
        if type_ == _LONG_NAME:
            self.long_name = _text(record)
        elif type_ == _LONG_LINK:
            self.long_link = _text(record)
        elif type_ == _PAX_GLOBAL:
            self.globals = _pax_records(record, start)
        else:
            self.pax = _pax_records(record, start)


class TarReader:
    """The entries of the tar that ``read(n)`` gives (up to ``n`` bytes at a time, b"" at its end).
    ``skip(n)``, where given, moves past up to ``n`` bytes without making them (how many, 0 at the end): data
    no one reads is skipped with it."""

    def __init__(self, read: Callable[[int], bytes], skip: Callable[[int], int] | None = None) -> None:
        self._read = read  # asked for what is needed and no more: an error further on comes where it is
        self._skip = skip or (lambda n: len(read(n)))
        self.offset = 0  # in the tar, of the next byte to read
        self._left = 0  # bytes of the current entry's data not yet read
        self._padding = 0  # after them, to the next block
        self._globals: dict[str, str] = {}  # PAX ``g`` records so far
        self._globals_size = 0

    def next(self) -> Header | None:
        """The next entry, after what is left of the current one's data; None at the tar's end."""
        self.skip_data()
        if self._padding:
            padding, self._padding = self._padding, 0
            if self._pass(padding) < padding:
                return None
        start = self.offset
        records = _Records()
        while True:
            block = self._take(BLOCK)
            if len(block) < BLOCK:
                if block:
                    raise Damaged("the tar ends inside a header (truncated)")
                if start == 0:
                    raise Damaged("it is empty")
                if records.seen:
                    raise Damaged("the tar ends after a header record, without the entry it is for (truncated)")
                return None
            if block == _ZEROS:
                if records.seen:
                    raise Damaged(f"damaged tar header at byte {start} (the tar's end after a header record)")
                return None
            name, type_, linkname, numbers = _parse(block, start)
            if type_ not in _RECORDS:
                break
            size = numbers[0]
            if size > RECORD_MAX:
                raise _damaged(start, f"a {size}-byte header record, over the {RECORD_MAX} allowed")
            record = self._take(size + -size % BLOCK)  # with its padding
            if len(record) < size:
                raise Damaged("the tar ends inside a header (truncated)")
            records.add(type_, record[:size], start)  # (a stream that ends in the padding: told at the next block)
            if type_ == _PAX_GLOBAL:
                self._globals_size += size
                if self._globals_size > RECORD_MAX:
                    raise _damaged(start, f"PAX global records over the {RECORD_MAX} bytes allowed in all")
                self._globals.update(records.globals)
        return self._entry(name, type_, linkname, numbers, records, start)

    def _entry(
        self, name: str, type_: bytes, linkname: str, numbers: tuple[int, ...], records: _Records, start: int
    ) -> Header:
        pax = {**self._globals, **records.pax} if self._globals else records.pax
        name = pax.get("path", name if records.long_name is None else records.long_name)
        if type_ in _OTHER_REG:  # (as Go's archive/tar: by the name the records give)
            type_ = DIR if type_ == b"\0" and name.endswith("/") else REG
        if type_ == DIR:
            name = name.rstrip("/")
        linkname = pax.get("linkpath", linkname if records.long_link is None else records.long_link)
        header = Header(name, type_, linkname, numbers, pax, type_ == _SPARSE)
        for key in _PAX_NUMBERS.intersection(pax):
            setattr(header, key, _pax_number(pax, key, start))
        header.sparse = header.sparse or not _PAX_SPARSE.isdisjoint(pax)
        header.offset_data = self.offset
        if type_ not in _NO_DATA:
            self._left = header.size
            self._padding = -header.size % BLOCK
        return header

    def data(self) -> Iterator[bytes]:
        """The current entry's data, in pieces; Damaged where the tar ends inside it."""
        while self._left:
            piece = self._read(min(self._left, _CHUNK))
            if not piece:
                raise Damaged("the tar ends inside the entry's data (truncated)")
            self._left -= len(piece)
            self.offset += len(piece)
            yield piece

    def skip_data(self) -> None:
        """What is left of the current entry's data passed over (and checked there)."""
        while self._left:
            skipped = self._skip(min(self._left, _CHUNK))
            if not skipped:
                raise Damaged("the tar ends inside the entry's data (truncated)")
            self._left -= skipped
            self.offset += skipped

    def _pass(self, n: int) -> int:
        """Move past the next ``n`` bytes of the tar (fewer where it ends first); how many."""
        passed = 0
        while passed < n and (skipped := self._skip(n - passed)):
            passed += skipped
        self.offset += passed
        return passed

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes of the tar, fewer where it ends first."""
        data = self._read(n)
        if 0 < len(data) < n:  # (a source gives what it has at hand)
            pieces = [data]
            got = len(data)
            while got < n and (more := self._read(n - got)):
                pieces.append(more)
                got += len(more)
            data = b"".join(pieces)
        self.offset += len(data)
        return data


def _parse(block: bytes, start: int) -> tuple[str, bytes, str, tuple[int, ...]]:
    """A header block's name, type, link name and numbers (size, mode, uid, gid, mtime, devmajor, devminor):
    of a GNU or PAX record's header, its size alone counts."""
    name, mode, uid, gid, size, mtime, checksum, type_, linkname, devmajor, devminor, prefix = _FIELDS.unpack(block)
    try:
        stored = _number(checksum)
        if stored != 256 + _byte_sum(block) - sum(checksum) and stored != 256 + sum(_SIGNED.unpack(block)):
            raise _not_a_header(start, "bad checksum")
        length = _number(size)
        if type_ in _RECORDS:
            numbers: tuple[int, ...] = (length,)
        else:
            dev = (_number(devmajor), _number(devminor)) if type_ in (CHR, BLK) else (0, 0)
            numbers = (length, _number(mode), _number(uid), _number(gid), _number(mtime), *dev)
    except ValueError:
        raise _not_a_header(start, "invalid header") from None
    if length < 0:
        raise _not_a_header(start, f"a size of {length}")
    if type_ in _RECORDS:
        return "", type_, "", numbers
    text = _text(name)
    if type_ != _SPARSE and prefix[0]:
        text = _text(prefix) + "/" + text
    return text, type_, _text(linkname), numbers


def _byte_sum(block: bytes) -> int:
    """The sum of a block's bytes, four times as fast as sum(): the low half of zlib's Adler-32 of 256 bytes
    is 1 + their sum, exactly (it is taken modulo 65521, which 256 bytes of 255 stay below)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _damaged(start: int, why: str) -> Damaged:
    return Damaged(f"damaged tar header at byte {start} ({why})")


def _not_a_header(start: int, why: str) -> Damaged:
    """A block that is no header: at the very start, what is read is no tar at all."""
    return Damaged(f"it is not a tar ({why})") if start == 0 else _damaged(start, why)


def _number(field: bytes) -> int:
    """A numeric field: octal digits, or GNU's base-256 (a first byte 0x80, or 0xff for a negative number)."""
    digits = field.rstrip(b"\0 ")  # (as a rule, all a field holds: digits, then a NUL or a space)
    if digits.isdigit():
        return int(digits, 8)
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        return int.from_bytes(field[1:], "big") - 256 ** (len(field) - 1)
    digits = field.split(b"\0", 1)[0].strip()
    if not digits.isdigit():  # (and not int's "0o", "_" or signs)
        if digits:
            raise ValueError(field)
        return 0
    return int(digits, 8)


def _text(field: bytes) -> str:
    """A name field up to its NUL; bytes that are not UTF-8 kept as surrogates."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, start: int) -> dict[str, str]:
    """A PAX extended header's records: ``LENGTH KEY=VALUE\\n``, LENGTH counting the whole record."""
    records = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        length = data[pos:space]
        # (no space near, -1, is no length: a record's end must be past it, never back at the start)
        end = pos + int(length) if space > pos and length.isdigit() else 0
        if end <= max(space, pos) or end > len(data) or data[end - 1] != 0x0A:
            raise _damaged(start, f"a damaged PAX record at byte {pos} of its {len(data)}")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise _damaged(start, f"a damaged PAX record at byte {pos} of its {len(data)}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _pax_number(pax: dict[str, str], key: str, start: int) -> int:
    value = pax[key]
    if not (value.isascii() and value.isdigit()):
        raise _damaged(start, f"its PAX {key} record {value!r} is not a number")
    return int(value)
