"""layerfs.oci.tarstream: the unpacker's own tar reader, side by side with tarfile on the same inputs.

Tars from tarfile (PAX, GNU and ustar forms, hypothesis's names, owners, times and records) and from GNU
tar (each of its formats, over a tree with long names, links, devices and xattrs) must read as tarfile
reads them, entry for entry, data included. Cut anywhere, a tar gives the entries before the cut, then
ends where Go's archive/tar takes it as whole or raises ``Damaged``; damaged anywhere, it gives the entries
before the damage, and no error but ``Damaged``. (How the unpacker takes what it reads, and what it
refuses, is test_unpack's and test_fuzz's.)
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.oci import tarstream

_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)
_TYPES = {
    tarfile.REGTYPE: tarstream.REG,
    tarfile.AREGTYPE: tarstream.REG,
    tarfile.CONTTYPE: tarstream.REG,
    tarfile.DIRTYPE: tarstream.DIR,
    tarfile.SYMTYPE: tarstream.SYM,
    tarfile.LNKTYPE: tarstream.LNK,
    tarfile.CHRTYPE: tarstream.CHR,
    tarfile.BLKTYPE: tarstream.BLK,
    tarfile.FIFOTYPE: tarstream.FIFO,
}


def read_all(data: bytes, piece: int = 1 << 20) -> list[tuple]:
    """Each entry of ``data`` as tarstream reads it, its data read ``piece`` bytes at a time at most."""
    source = io.BytesIO(data)
    reader = tarstream.TarReader(lambda n: source.read(min(n, piece)))
    out = []
    while (h := reader.next()) is not None:
        content = b"".join(reader.data()) if h.type == tarstream.REG else None
        out.append((h.name, h.type, h.linkname, h.size, h.mode, h.uid, h.gid, h.mtime, h.dev, h.pax, content))
    return out


def tarfile_read(data: bytes) -> list[tuple]:
    """The same, as tarfile reads it. The mtime is the entry's own header's (the block before its data):
    tarstream leaves a PAX mtime record to the caller, where tarfile makes a float of it."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        for info in tar:
            kind = _TYPES.get(info.type, info.type)
            content = tar.extractfile(info).read() if kind == tarstream.REG else None  # type: ignore[union-attr]
            mtime = tarfile.nti(data[info.offset_data - 512 + 136 : info.offset_data - 512 + 148])
            devices = (info.devmajor, info.devminor)
            fields = (info.name, kind, info.linkname, info.size, info.mode, info.uid, info.gid, mtime, devices)
            out.append((*fields, info.pax_headers, content))
    return out


# -- tars from tarfile ----------------------------------------------------------------------------------

_NAMES = st.lists(
    st.sampled_from(["a", "b", "é", os.fsdecode(b"caf\xe9"), "n" * 99, "n" * 101, "p" * 160, "sp ace", "x=y"]),
    min_size=1,
    max_size=4,
).map("/".join)
_PAX = st.dictionaries(
    st.sampled_from(["SCHILY.xattr.user.k", "SCHILY.xattr.security.capability", "comment", "mtime", "atime"]),
    st.text(max_size=12).filter(lambda v: "\n" not in v) | st.just("1700000000.123456789"),
    max_size=3,
)


@st.composite
def tars(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    big = fmt != tarfile.USTAR_FORMAT  # (ustar has room for neither long names nor big numbers)
    global_pax = draw(st.dictionaries(st.just("comment"), st.text(max_size=5))) if fmt == tarfile.PAX_FORMAT else {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax, errors="surrogateescape") as tar:
        for _ in range(draw(st.integers(1, 6))):
            name = draw(_NAMES if big else _NAMES.filter(lambda n: len(n.encode("utf-8", "surrogateescape")) < 100))
            info = tarfile.TarInfo(name)
            # (not v7's NUL type: tarfile reads it by the header's own name, where GNU and Go tar take the long
            # name its records give; test_an_old_style_type_is_read_by_the_name_its_records_give)
            info.type = draw(st.sampled_from(sorted(set(_TYPES) - {tarfile.AREGTYPE})))
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(_NAMES if big else st.just("t"))
            info.mode = draw(st.integers(0, 0o7777))
            ids = st.integers(0, 2**32 + 5) if big else st.integers(0, 2**21 - 1)
            info.uid, info.gid = draw(ids), draw(ids)
            info.mtime = draw(st.integers(-(2**34), 2**35) if big else st.integers(0, 2**33 - 1))
            if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = draw(_PAX)
            content = draw(st.binary(max_size=1500)) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else b""
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@_SETTINGS
@given(data=tars(), piece=st.sampled_from([1, 7, 512, 1 << 20]))
def test_tarfiles_tars_read_as_tarfile_reads_them(data: bytes, piece: int) -> None:
    assert read_all(data, piece) == tarfile_read(data)


def test_an_old_style_type_is_read_by_the_name_its_records_give() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("d/", "n" * 99 + "/f", "f"):
            info = tarfile.TarInfo(name)
            info.type, info.size = tarfile.AREGTYPE, 0 if name == "d/" else 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert [(e[0], e[1], e[10]) for e in read_all(buf.getvalue())] == [
        ("d", tarstream.DIR, None),
        ("n" * 99 + "/f", tarstream.REG, b"x"),
        ("f", tarstream.REG, b"x"),
    ]


def test_a_global_pax_record_applies_to_every_entry_after_it() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "all"}) as tar:
        tar.addfile(tarfile.TarInfo("a"))
        info = tarfile.TarInfo("b")
        info.pax_headers = {"comment": "mine"}
        tar.addfile(info)
    assert [(e[0], e[9]) for e in read_all(buf.getvalue())] == [("a", {"comment": "all"}), ("b", {"comment": "mine"})]


def _record(type_: bytes, data: bytes) -> bytes:
    info = tarfile.TarInfo("././@Record")
    info.type, info.size = type_, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def _pax(**records: str) -> bytes:
    """PAX records, each ``LENGTH KEY=VALUE\\n`` with LENGTH counting its own digits too."""
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def test_of_several_records_of_a_kind_the_last_counts() -> None:
    data = (
        _record(tarfile.GNUTYPE_LONGNAME, b"first")
        + _record(tarfile.GNUTYPE_LONGNAME, b"second")
        + _record(tarfile.XHDTYPE, _pax(comment="one", uid="7"))
        + _record(tarfile.XHDTYPE, _pax(comment="two"))
        + tarfile.TarInfo("short").tobuf(tarfile.USTAR_FORMAT)
        + bytes(1024)
    )
    [entry] = read_all(data)
    assert (entry[0], entry[5], entry[9]) == ("second", 0, {"comment": "two"})


def test_global_records_over_a_mebibyte_in_all_are_refused() -> None:
    half = _record(tarfile.XGLTYPE, _pax(comment="x" * (600 << 10)))
    data = half + half + tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    assert (
        read_or_damaged(data)[1]
        == "damaged tar header at byte 0 (PAX global records over the 1048576 bytes allowed in all)"
    )


# -- tars from GNU tar ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Long names and link targets, a hard link, devices, a fifo, xattrs, big owners, an old time."""
    root = tmp_path_factory.mktemp("tree")
    deep = root / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"long\n" * 300)
    (root / "file").write_bytes(os.urandom(5000))
    os.link(root / "file", root / "hard")
    os.symlink("x" * 150, root / "sym")
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(root / "file", 3_000_000, 70000)
    os.setxattr(root / "file", "user.k", b"v\xff")
    os.utime(root / "file", ns=(1, -5_000_000_123))
    return root


@pytest.mark.parametrize("fmt", ["posix", "gnu", "ustar", "v7", "oldgnu"])
def test_gnu_tars_read_as_tarfile_reads_them(tree: Path, fmt: str) -> None:
    # ustar and v7 cannot hold some of the tree (long names, big owners): GNU tar leaves that out, warning
    args = ["tar", "-C", str(tree), "-c", "-f", "-", f"--format={fmt}", "--sort=name", "--numeric-owner"]
    if fmt == "posix":
        args += ["--xattrs", "--xattrs-include=*"]
    data = subprocess.run([*args, "."], capture_output=True).stdout
    entries = read_all(data)
    assert len(entries) >= 3 and entries == tarfile_read(data)


def test_a_sparse_file_is_marked_sparse(tmp_path: Path) -> None:
    with open(tmp_path / "holes", "wb") as f:
        f.truncate(1 << 22)
        f.write(b"data")
    for fmt in ("gnu", "posix"):
        data = subprocess.run(
            ["tar", "-C", str(tmp_path), "-c", "-f", "-", "-S", f"--format={fmt}", "holes"],
            capture_output=True,
            check=True,
        ).stdout
        reader = tarstream.TarReader(io.BytesIO(data).read)
        entry = reader.next()
        assert entry is not None and entry.sparse, fmt


# -- cut and damaged tars -------------------------------------------------------------------------------


def _sample() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate([0, 700, 512, 3]):
            info = tarfile.TarInfo(f"f{i}" + "n" * 100 * (i % 2))
            info.size = size
            info.pax_headers = {"SCHILY.xattr.user.i": str(i)}
            tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


SAMPLE = _sample()


def read_or_damaged(data: bytes) -> tuple[list[tuple], str | None]:
    """The entries read before the end or the damage, and the damage."""
    source = io.BytesIO(data)
    reader = tarstream.TarReader(source.read)
    out: list[tuple] = []
    try:
        while (h := reader.next()) is not None:
            out.append((h.name, h.size, b"".join(reader.data()) if h.type == tarstream.REG else None))
    except tarstream.Damaged as e:
        return out, str(e)
    return out, None


def _extents() -> list[tuple[int, int, int]]:
    """Each entry of SAMPLE: where its first record starts, where its data ends, where the next starts."""
    with tarfile.open(fileobj=io.BytesIO(SAMPLE)) as tar:
        members = tar.getmembers()
    last = members[-1]
    starts = [m.offset for m in members] + [last.offset_data + last.size + -last.size % 512]  # (the end blocks')
    return [(m.offset, m.offset_data + m.size, starts[i + 1]) for i, m in enumerate(members)]


def test_a_tar_cut_anywhere_is_damaged_or_ends_where_go_ends_it() -> None:
    whole, damage = read_or_damaged(SAMPLE)
    assert damage is None and len(whole) == 4
    extents = _extents()
    for cut in range(1, len(SAMPLE)):
        entries, damage = read_or_damaged(SAMPLE[:cut])
        done = sum(1 for _, data_end, _ in extents if data_end <= cut)
        # whole after an entry's data, in its padding, at the next entry's start; or after the first end block
        ends = any(data_end <= cut <= following for _, data_end, following in extents) or cut >= extents[-1][2] + 512
        assert (entries, damage is None) == (whole[:done], ends), cut
    assert read_or_damaged(b"")[1] == "it is empty"
    assert read_or_damaged(SAMPLE[:100])[1] == "the tar ends inside a header (truncated)"


@_SETTINGS
@given(at=st.integers(0, len(SAMPLE) - 1), byte=st.integers(0, 255))
def test_a_damaged_byte_gives_the_entries_before_it(at: int, byte: int) -> None:
    data = bytearray(SAMPLE)
    data[at] = byte
    entries, _ = read_or_damaged(bytes(data))  # (any error but Damaged fails the test)
    before = sum(1 for _, _, following in _extents() if following <= at)
    assert entries[:before] == read_or_damaged(SAMPLE)[0][:before]


@settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=2048))
def test_garbage_is_no_entries(garbage: bytes) -> None:
    entries, damage = read_or_damaged(garbage)
    assert entries == [] and (damage is not None or garbage[:512] == bytes(512))


def test_a_header_record_over_a_mebibyte_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big")
        info.pax_headers = {"SCHILY.xattr.user.big": "x" * (1 << 20)}
        tar.addfile(info)
    assert (
        read_or_damaged(buf.getvalue())[1]
        == "damaged tar header at byte 0 (a 1048607-byte header record, over the 1048576 allowed)"
    )


@pytest.mark.parametrize(
    "record, why",
    [
        (b"9 a=bcd\n", "a damaged PAX record at byte 0 of its 8"),  # the length past the end
        (b"6 a=b\n6 c=d\nx", "a damaged PAX record at byte 12 of its 13"),
        (b"5 =b\n", "a damaged PAX record at byte 0 of its 5"),
        (b"6 ab \n", "a damaged PAX record at byte 0 of its 6"),
        (b"0 a=b\n", "a damaged PAX record at byte 0 of its 6"),
        # no length: taken as -1, this went back to the start, forever (a hostile tar hung the reader)
        (b"abcdefghijklmnopqrstuvwxyz=1\n", "a damaged PAX record at byte 0 of its 29"),
        (b"6 a=b\nabcdefghijklmnopqrstuvwxyz=1\n", "a damaged PAX record at byte 6 of its 35"),
        (b"8 uid=x\n", "its PAX uid record 'x' is not a number"),
        (b"11 size=-1\n", "its PAX size record '-1' is not a number"),
    ],
)
def test_a_damaged_pax_record_is_refused(record: bytes, why: str) -> None:
    def looping(*_) -> None:
        raise AssertionError("the reader loops")

    signal.signal(signal.SIGALRM, looping)
    signal.alarm(10)  # (a reader that loops fails the test, not the suite)
    try:
        _assert_refused(record, why)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _assert_refused(record: bytes, why: str) -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(record)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    data = header + record + bytes(-len(record) % 512) + tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    assert read_or_damaged(data) == ([], f"damaged tar header at byte 0 ({why})")
