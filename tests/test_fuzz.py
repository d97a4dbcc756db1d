"""Fuzzing the parsers that read untrusted input: layer tars (``oci.unpack.unpack_layer``), OCI image
layouts and ``docker save`` archives (``oci.layout.read_image``, ``read_docker_save``), and mount options
(``options.parse``).

The property is the same for each: the input is accepted correctly, or refused with a one-line
LayerfsError (UsageError for options); any other exception is a bug. The strategies build inputs close
to valid ones, so that the checks deep inside each parser are reached, and break them in one place or
several: hostile names and links, forged overlay xattrs, damaged bytes, JSON of the wrong shape, digests
that name nothing or lead out.

- Layers are unpacked in a fresh sandbox per example: the destination next to sentinel files, a
  directory and a symlink, which the layer's symlinks, hard links and ``..`` names aim at. Afterwards
  everything in the sandbox outside the destination must be as it was (names, types, modes, owners,
  contents, xattrs); a refused layer must leave the destination empty with its own metadata back, and an
  accepted one must have made exactly what its entries say, nothing written through a symlink it made:
  the tree is held against a model computed from the generated entries.
- Images are read from directories written per example; an accepted one must name only blobs inside
  the layout (files inside the archive), and diff_ids that are sha256 digests, since the store makes a
  path of each.
- Options are parsed against real directories; an accepted MountConfig must name existing directories.

Each target must accept a share of its inputs (``MIN_ACCEPTED``), or it would test its refusals alone.

Bound: each test has a fixed ``max_examples``; the whole file takes about 25 s on a slow 2-core machine.
``LAYERFS_FUZZ_SCALE=N`` multiplies the counts for a longer run by hand. ``derandomize=True`` and no
example database: the examples follow from each test's source alone, so every CI run tries the same
inputs and a failure in CI fails the same way on a laptop, instead of depending on a random seed or on a
database CI does not keep. New inputs come with changes to the strategies, or a larger scale.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layerfs.errors import LayerfsError, UsageError
from layerfs.fs.options import MountConfig, parse
from layerfs.oci.layout import Image, read_docker_save, read_image
from layerfs.oci.unpack import unpack_layer

_SCALE = int(os.environ.get("LAYERFS_FUZZ_SCALE", "1"))


# Inputs accepted and refused, by fuzz target: a target that refused nearly everything would have tested
# its refusals alone (test_every_target_had_inputs_accepted, last in the file).
OUTCOMES: collections.defaultdict[str, collections.Counter] = collections.defaultdict(collections.Counter)
# About half the shares the strategies give today (layer entries 0.43, damaged layer bytes 0.073, compressed
# layers 0.185, OCI layouts 0.114, docker archives 0.368, mount options 0.66; the same on every machine: the
# examples are derandomized and the sandbox's paths, inside the tars, have a fixed length): a change that
# makes a target refuse most inputs fails here.
MIN_ACCEPTED = {
    "layer entries": 0.2,
    "damaged layer bytes": 0.035,
    "compressed layers": 0.09,
    "OCI layouts": 0.05,
    "docker archives": 0.18,
    "mount options": 0.33,
}


def fuzz(max_examples: int) -> settings:
    # too_slow / data_too_large: the examples do real file system work and some tars are big on purpose.
    return settings(
        max_examples=max_examples * _SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def rarely(draw: st.DrawFn, odds: int) -> bool:
    """True about one time in ``odds``. The smallest draw is False: hypothesis starts from small draws and
    shrinks towards them, so its first inputs are the usual ones and a failing one keeps only the hazards
    it needs."""
    return draw(st.integers(0, odds - 1)) == odds - 1


def mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy, odds: int = 6) -> st.SearchStrategy:
    """``usual``, and about one time in ``odds`` ``unusual``: with hazards everywhere nearly every input
    would be refused at its first one, and the checks further in never reached."""
    return st.integers(0, odds - 1).flatmap(lambda n: unusual if n == odds - 1 else usual)


def one_line(error: Exception) -> None:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text, f"not one line: {text!r}"


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """The directory each example makes its own sandbox in: module-scoped, as hypothesis runs many
    examples per test and a function-scoped tmp_path would be shared by all of them. Its path has the
    same length on every run (pytest's numbered directories grow from pytest-99 to pytest-100): the
    sandbox's paths are inside the generated tars, and damage at a given offset must hit the same field
    every time for the examples, and the shares they are accepted in, to be the same everywhere."""
    path = Path(tempfile.mkdtemp(prefix="layerfs-fuzz-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- layer tars -----------------------------------------------------------------------------------------

OUT = "@OUT@"  # in a generated link target: the sandbox's sentinel directory, outside the destination

_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
# PAX records that change what tarfile makes of the entry (its name, size, owner, layout), so that the
# model of the unpacked tree no longer holds: a layer with one is checked for safety only.
_RAW_PAX = (
    "path",
    "linkpath",
    "size",
    "uid",
    "gid",
    "hdrcharset",
    "GNU.sparse.major",
    "GNU.sparse.minor",
    "GNU.sparse.name",
    "GNU.sparse.realsize",
    "GNU.sparse.size",
    "GNU.sparse.map",
    "GNU.sparse.numblocks",
    "GNU.sparse.offset",
    "GNU.sparse.numbytes",
)


class Entry(NamedTuple):
    kind: str  # a key of _TYPES
    name: str
    link: str = ""  # symlink or hard-link target
    data: bytes = b""
    mode: int = 0o644
    owner: tuple[int, int] = (0, 0)
    mtime: int = 0
    dev: tuple[int, int] = (0, 0)
    pax: tuple[tuple[str, str], ...] = ()


# Few names, so that entries collide: a symlink ``etc`` then a file ``etc/secret``, a whiteout of a
# directory the layer has, a hard link to a name replaced since...
_USUAL = st.sampled_from(["a", "b", "etc", "secret"])
_CALM_NAMES = st.builds(
    lambda parents, last: "/".join([*parents, last]),
    st.lists(_USUAL, max_size=2),
    mostly(_USUAL, st.sampled_from([".wh.a", ".wh.secret", ".wh..wh..opq"]), odds=8),
)
_COMPONENTS = mostly(
    _USUAL,
    st.sampled_from(
        [
            ".",
            "..",
            "",
            ".wh.a",
            ".wh.secret",
            ".wh..wh..opq",
            ".wh.",
            ".wh...",
            ".wh..wh.plnk",
            ".wh..opq",
            "é",
            os.fsdecode(b"caf\xe9"),
            "new\nline",
            "n" * 255,
            "n" * 256,
        ]
    ),
    odds=4,
)
_PREFIXES = mostly(st.just(""), st.sampled_from(["/", "./", "../", "//"]))
_NAMES = mostly(
    st.builds(lambda prefix, parts: prefix + "/".join(parts), _PREFIXES, st.lists(_COMPONENTS, min_size=1, max_size=3)),
    st.sampled_from(["d/" * 2050 + "f", "z" * 5000, "./", "/", ""]),
    odds=20,
)
_LINKS = mostly(
    _NAMES,
    st.sampled_from(
        [
            OUT,
            OUT + "/secret",
            OUT + "/sub",
            "../outside",
            "../outside/secret",
            "..",
            "../..",
            "/",
            "/etc/passwd",
            "a/../../outside/secret",
        ]
    ),
    odds=3,
)
_XATTRS = st.sampled_from(
    [
        "user.k",
        "trusted.k",
        "trusted.overlay.opaque",
        "trusted.overlay.redirect",
        "trusted.overlay.metacopy",
        "user.overlay.opaque",
        "user.fuseoverlayfs.x",
        "security.capability",
        "bogus",
        "",
    ]
)
_PAX_VALUES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["1.5", "-1.000000001", "1e3", "1.", "0", "-0", "99999999999999999999", "4294967296", "0,0,1,1"]),
)
_PAX = st.lists(
    st.one_of(
        st.tuples(_XATTRS.map(lambda attr: "SCHILY.xattr." + attr), st.text(max_size=8)),
        st.tuples(st.sampled_from(("mtime", "atime", "comment")), _PAX_VALUES),
        st.tuples(st.sampled_from(_RAW_PAX), _PAX_VALUES),
    ),
    max_size=3,
).map(tuple)
_IDS = st.sampled_from([0, 1000, 65534, 2**21 + 1, 2**32 - 1, 2**32 + 7])


@st.composite
def entries(draw: st.DrawFn, earlier: list[str], calm: bool) -> Entry:
    """An entry; a hard link mostly to a name of the ``earlier`` entries, as a valid one would be. A
    ``calm`` one has a plain name, owner and no PAX records (its links may still aim anywhere)."""
    kind = draw(
        mostly(st.sampled_from(["file", "dir", "symlink", "hardlink"]), st.sampled_from(["chr", "blk", "fifo"]))
    )
    link = ""
    if kind == "symlink" or kind == "hardlink" and not earlier:
        link = draw(_LINKS)
    elif kind == "hardlink":
        link = draw(mostly(st.sampled_from(earlier), _LINKS, odds=3))
    dev = draw(st.sampled_from([(0, 0), (1, 3), (8, 0), (4095, 255)])) if kind in ("chr", "blk") else (0, 0)
    ids = st.sampled_from([0, 1000]) if calm else _IDS
    return Entry(
        kind,
        draw(_CALM_NAMES if calm else _NAMES),
        link,
        draw(st.binary(max_size=40)) if kind == "file" else b"",
        draw(st.integers(0, 0o7777)),
        (draw(ids), draw(ids)),
        draw(st.integers(-(2**33), 2**34)),
        dev,
        () if calm else draw(_PAX),
    )


@st.composite
def layers(draw: st.DrawFn) -> list[Entry]:
    """Up to 8 entries, most of them calm: a hazard in every entry would have nearly every layer refused
    at its first one."""
    layer: list[Entry] = []
    for _ in range(draw(st.integers(1, 8))):
        layer.append(draw(entries([e.name for e in layer], calm=not rarely(draw, 5))))
    return layer


_LAYERS = layers()
_FORMATS = st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])


def build_tar(layer: list[Entry], fmt: int, outside: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for e in layer:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.linkname = e.link.replace(OUT, outside)
            info.mode, (info.uid, info.gid), info.mtime = e.mode, e.owner, e.mtime
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.pax)
            info.size = len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def header_blocks(tar: bytes) -> list[int]:
    """Offsets of the 512-byte header blocks of a tar ``build_tar`` wrote (PAX and GNU records' own too),
    found by the size fields: tarfile may not read it back (a PAX record it cannot take)."""
    offsets, at = [], 0
    while tar[at : at + tarfile.BLOCKSIZE].strip(b"\0"):
        offsets.append(at)
        size = tarfile.nti(tar[at + 124 : at + 136])
        at += tarfile.BLOCKSIZE * (1 + -(-size // tarfile.BLOCKSIZE))
    return offsets


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple]:
    """Byte-level damage, applied by ``mutate``: mostly inside header blocks, whose checksum is then made
    right again now and then, so that tarfile takes the damaged fields for real ones."""
    return draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.just("header"),
                    st.integers(0, 50),
                    st.integers(0, 511),
                    st.binary(min_size=1, max_size=12),
                    st.booleans(),
                ),
                st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
                st.tuples(st.just("truncate"), st.integers(0, 2**20)),
                st.tuples(st.just("append"), st.binary(max_size=1100)),
            ),
            min_size=1,
            max_size=4,
        )
    )


def mutate(data: bytes, damage: list[tuple], headers: list[int]) -> bytes:
    out = bytearray(data)
    for kind, *args in damage:
        whole = [h for h in headers if h + tarfile.BLOCKSIZE <= len(out)]  # a truncation may have cut some
        if kind == "header" and whole:
            block, at, new, fix_checksum = args
            start = whole[block % len(whole)]
            new = new[: tarfile.BLOCKSIZE - at]  # overwritten in place: the blocks stay aligned
            out[start + at : start + at + len(new)] = new
            if fix_checksum:
                header = out[start : start + tarfile.BLOCKSIZE]
                out[start + 148 : start + 156] = b"%06o\0 " % tarfile.calc_chksums(bytes(header))[0]
        elif kind == "flip" and out:
            at, bit = args
            out[at % len(out)] ^= 1 << bit
        elif kind == "truncate":
            del out[args[0] % (len(out) + 1) :]
        elif kind == "append":
            out += args[0]
    return bytes(out)


def compress(data: bytes, how: str | None, split: int) -> bytes:
    """``data`` plain, gzip or zstd; cut at ``split`` into two members (frames) when it falls inside."""
    pieces = [data[:split], data[split:]] if 0 < split < len(data) else [data]
    if how == "gzip":
        return b"".join(gzip.compress(p, mtime=0) for p in pieces)
    if how == "zstd":
        return b"".join(zstandard.ZstdCompressor().compress(p) for p in pieces)
    return data


class Sandbox(NamedTuple):
    root: str
    outside: str  # the sentinel directory the layer's links aim at
    target: str  # the destination, empty


def make_sandbox(base: Path) -> Sandbox:
    root = tempfile.mkdtemp(dir=base)
    outside = os.path.join(root, "outside")
    os.mkdir(outside)
    for path, data, mode in (
        (os.path.join(outside, "secret"), b"secret\n", 0o640),
        (os.path.join(root, "victim"), b"victim\n", 0o600),
    ):
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
    os.setxattr(os.path.join(outside, "secret"), "user.sentinel", b"1")
    os.mkdir(os.path.join(outside, "sub"), 0o700)
    os.symlink("secret", os.path.join(outside, "link"))
    target = os.path.join(root, "target")
    os.mkdir(target, 0o751)
    os.setxattr(target, "user.keep", b"1")
    return Sandbox(root, outside, target)


def entry_state(path: str) -> tuple:
    """What a sentinel is: type, mode, owner, size, mtime, xattrs, and its content or link target."""
    st_ = os.lstat(path)
    if stat.S_ISLNK(st_.st_mode):
        content: bytes | str | None = os.readlink(path)
    elif stat.S_ISREG(st_.st_mode):
        with open(path, "rb") as f:
            content = f.read()
    else:
        content = None
    xattrs = {} if stat.S_ISLNK(st_.st_mode) else {a: os.getxattr(path, a) for a in os.listxattr(path)}
    return st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size, st_.st_mtime_ns, st_.st_rdev, xattrs, content


def outside_state(box: Sandbox) -> dict[str, tuple]:
    """Everything in the sandbox but the destination's content and its own metadata, which a layer's
    root entry sets."""
    state = {".": entry_state(box.root)}
    for parent, dirs, files in os.walk(box.root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if path != box.target:
                state[os.path.relpath(path, box.root)] = entry_state(path)
        dirs[:] = [d for d in dirs if os.path.join(parent, d) != box.target]
    return state


def own_state(path: str) -> tuple:
    """The destination's own metadata, which a refused layer must give back (atime aside: unpack reads it)."""
    st_ = os.lstat(path)
    return st_.st_mode, st_.st_uid, st_.st_gid, st_.st_mtime_ns, {a: os.getxattr(path, a) for a in os.listxattr(path)}


def norm(name: str) -> tuple[str, ...] | None:
    """A name's components below the layer's root as unpack takes them; None if it climbs out."""
    out: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not out:
                return None
            out.pop()
        elif part not in ("", "."):
            out.append(part)
    return tuple(out)


def _replaces_below(e: Entry) -> bool:
    """Whether ``e`` removes a directory in its place, with what it holds (a whiteout marks it opaque)."""
    return e.kind not in ("dir", "chr") or e.kind == "chr" and e.dev != (0, 0)


def check_tree(layer: list[Entry], target: str, outside: str) -> None:
    """The unpacked tree holds what the entries say and nothing else: every path a name of the layer
    (or a directory above one, or the whiteout a ``.wh.`` name makes), each entry that no later one
    removed there with its kind, content, mode or link target."""
    allowed: set[tuple[str, ...]] = set()
    last: dict[tuple[str, ...], int] = {}  # the last entry at each path that is not a whiteout
    placed: list[tuple[str, ...]] = []
    for i, e in enumerate(layer):
        parts = norm(e.name)
        assert parts is not None, f"{e.name!r} climbs out of the layer, and was taken"
        placed.append(parts)
        allowed.update(parts[:n] for n in range(len(parts) + 1))
        if parts and parts[-1].startswith(".wh."):
            if parts[-1] != ".wh..wh..opq":
                allowed.add(parts[:-1] + (parts[-1][len(".wh.") :],))
            continue
        if not (e.kind == "chr" and e.dev == (0, 0)):
            last[parts] = i
    found = set()
    for parent, dirs, files in os.walk(target):
        for name in dirs + files:
            found.add(tuple(os.path.relpath(os.path.join(parent, name), target).split("/")))
    assert found <= allowed, f"entries no name of the layer explains: {sorted(found - allowed)}"
    for parts, i in last.items():
        if not parts or any(
            len(placed[j]) < len(parts) and parts[: len(placed[j])] == placed[j] and _replaces_below(layer[j])
            for j in range(i + 1, len(layer))
        ):
            continue
        e, path = layer[i], os.path.join(target, *parts)
        st_ = os.lstat(path)
        kinds = {
            "file": stat.S_ISREG,
            "dir": stat.S_ISDIR,
            "symlink": stat.S_ISLNK,
            "chr": stat.S_ISCHR,
            "blk": stat.S_ISBLK,
            "fifo": stat.S_ISFIFO,
            "hardlink": lambda m: not stat.S_ISDIR(m),
        }
        assert kinds[e.kind](st_.st_mode), f"{parts}: {stat.filemode(st_.st_mode)}, not a {e.kind}"
        if e.kind == "file":
            assert Path(path).read_bytes() == e.data, f"{parts}: not the entry's content"
        if e.kind in ("file", "dir", "chr", "blk", "fifo"):
            assert stat.S_IMODE(st_.st_mode) == e.mode, f"{parts}: mode {st_.st_mode:o}, not {e.mode:o}"
        if e.kind == "symlink":
            assert os.readlink(path) == e.link.replace(OUT, outside)
        if e.kind in ("chr", "blk"):
            assert st_.st_rdev == os.makedev(*e.dev)


def check_unpack(
    target: str, base: Path, make: Callable[[Sandbox], tuple[bytes, bytes | None]], *, layer: list[Entry] | None = None
) -> None:
    """Unpack the layer ``make`` builds for a fresh sandbox (with the tar inside it, if known). It must be
    refused with one line and leave the destination as it was, or be taken, with the tar's diff_id and,
    given the ``layer`` it was made of, the tree the model says. Nothing outside the destination changes."""
    box = make_sandbox(base)
    try:
        data, tar = make(box)
        before, own = outside_state(box), own_state(box.target)
        steps: list[tuple[int, int | None]] = []
        try:
            result = unpack_layer(
                io.BytesIO(data), box.target, progress=lambda done, total: steps.append((done, total))
            )
        except LayerfsError as e:
            one_line(e)
            OUTCOMES[target]["refused"] += 1
            assert os.listdir(box.target) == [], "a refused layer left entries behind"
            assert own_state(box.target) == own, "a refused layer left the destination's metadata changed"
        else:
            OUTCOMES[target]["accepted"] += 1
            if tar is not None:
                assert (result.diff_id, result.size) == (sha256(tar), len(tar))
            if layer is not None:
                check_tree(layer, box.target, box.outside)
        assert outside_state(box) == before, "the layer changed something outside the destination"
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(steps)), f"progress went back: {steps}"
        assert all(total is None or done <= total for done, total in steps), f"progress past the total: {steps}"
    finally:
        shutil.rmtree(box.root)


@pytest.mark.root  # the layers have owners and devices: chown and mknod
@fuzz(400)
@given(layer=_LAYERS, fmt=_FORMATS)
@example(layer=[Entry("symlink", "etc", OUT), Entry("file", "etc/secret", data=b"x")], fmt=tarfile.PAX_FORMAT)
@example(layer=[Entry("symlink", "a", "../outside"), Entry("hardlink", "h", "a/secret")], fmt=tarfile.PAX_FORMAT)
@example(layer=[Entry("symlink", "a", OUT), Entry("file", "a/.wh.secret")], fmt=tarfile.GNU_FORMAT)
@example(layer=[Entry("file", "f", pax=(("SCHILY.xattr.trusted.overlay.opaque", "y"),))], fmt=tarfile.PAX_FORMAT)
def test_layer_entries(base: Path, layer: list[Entry], fmt: int) -> None:
    def make(box: Sandbox) -> tuple[bytes, bytes]:
        tar = build_tar(layer, fmt, box.outside)
        return tar, tar

    modelled = not any(key in _RAW_PAX for e in layer for key, _ in e.pax)
    check_unpack("layer entries", base, make, layer=layer if modelled else None)


@pytest.mark.root
@fuzz(300)
@given(layer=_LAYERS, fmt=_FORMATS, damage=mutations())
def test_damaged_layer_bytes(base: Path, layer: list[Entry], fmt: int, damage: list[tuple]) -> None:
    def make(box: Sandbox) -> tuple[bytes, bytes]:
        tar = build_tar(layer, fmt, box.outside)
        damaged_tar = mutate(tar, damage, header_blocks(tar))
        return damaged_tar, damaged_tar

    check_unpack("damaged layer bytes", base, make)


@pytest.mark.root
@pytest.mark.parametrize(
    "layer, message",
    [
        # was "No such file or directory": the link replaced the directory its target was in
        ([Entry("file", "b/x", data=b"x"), Entry("hardlink", "b", "b/x")], "its hard-link target 'b/x' is below it"),
        # was "... after entry X: invalid literal for int()": tarfile's ValueError, on the header after X's
        (
            [Entry("file", "f", pax=(("GNU.sparse.size", "1.5"),))],
            "cannot unpack layer entry 'f': it is a sparse file (tar --sparse), which a layer does not hold",
        ),
        ([Entry("file", "f", pax=(("uid", "1.5"),))], "damaged tar header at byte 0 (its PAX uid record '1.5' is"),
    ],
)
def test_refusals_say_why(base: Path, layer: list[Entry], message: str) -> None:
    box = make_sandbox(base)
    try:
        with pytest.raises(LayerfsError, match=re.escape(message)):
            unpack_layer(io.BytesIO(build_tar(layer, tarfile.PAX_FORMAT, box.outside)), box.target)
    finally:
        shutil.rmtree(box.root)


@pytest.mark.root
@fuzz(200)
@given(
    layer=_LAYERS,
    how=st.sampled_from([None, "gzip", "zstd"]),
    split=st.integers(0, 4096),
    before=st.none() | mutations(),
    after=st.none() | mutations(),
)
def test_compressed_layers(
    base: Path, layer: list[Entry], how: str | None, split: int, before: list[tuple] | None, after: list[tuple] | None
) -> None:
    """Damage to the tar inside the compression, or to the compressed bytes; what the layer's diff_id
    must be is known only for the first."""

    def make(box: Sandbox) -> tuple[bytes, bytes | None]:
        tar = build_tar(layer, tarfile.PAX_FORMAT, box.outside)
        if before is not None:
            tar = mutate(tar, before, header_blocks(tar))
        wrapped = compress(tar, how, split)
        return (wrapped, tar) if after is None else (mutate(wrapped, after, []), None)

    check_unpack("compressed layers", base, make)


# -- image layouts and docker save archives -------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Values of a plausible type and hostile content, for any field.
_HOSTILE = st.sampled_from(
    [
        "sha256:" + "0" * 64,
        "sha256:../../../../etc",
        "sha256:",
        "sha512:" + "0" * 128,
        "sha256:" + "A" * 64,
        "../outside.json",
        "/etc/hostname",
        "link.json",
        "layer",
        "layer/../../outside.json",
        "a\0b",
        "line\nbreak",
        "",
        float("inf"),
        float("nan"),
        -1,
        2**64,
        1.5,
        True,
        [],
        {},
        [[]],
        {"": {}},
    ]
)
# Whole files that are not JSON, or JSON that parsers choke on.
_BAD_FILES = st.one_of(
    st.binary(max_size=16),
    st.sampled_from(
        [
            b"",
            b"\xff\xfe",
            b"{",
            b"[" * 100_000 + b"]" * 100_000,
            b'{"size": 1' + b"0" * 5000 + b"}",
            b"NaN",
        ]
    ),
)


@st.composite
def damaged(draw: st.DrawFn, value: object) -> object:
    """``value``, a JSON document, as it is or with a few of its parts replaced or dropped."""
    if rarely(draw, 16):
        return draw(_JSON | _HOSTILE)
    if isinstance(value, dict):
        return {k: draw(damaged(v)) for k, v in value.items() if not rarely(draw, 16)}
    if isinstance(value, list):
        return [draw(damaged(v)) for v in value]
    return value


def document(draw: st.DrawFn, value: object) -> bytes:
    """A JSON file's bytes: ``value`` damaged, now and then something that is no JSON at all."""
    if rarely(draw, 16):
        return draw(_BAD_FILES)
    return json.dumps(draw(damaged(value))).encode()


Files = dict[str, "bytes | str | None"]  # path -> content; a str is a symlink's target, None a directory


def blob(draw: st.DrawFn, files: Files, data: bytes) -> str:
    """Store ``data`` as a blob (or, now and then, not, or not under its own digest); its digest."""
    digest = sha256(data)
    fault = draw(st.sampled_from([None] * 12 + ["missing", "directory", "other"]))
    if fault != "missing":
        files["blobs/sha256/" + digest[7:]] = None if fault == "directory" else data + b" " if fault else data
    return digest


@st.composite
def oci_layouts(draw: st.DrawFn) -> Files:
    files: Files = {}
    layers = draw(st.lists(st.binary(max_size=8), max_size=3, unique=True))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(b"tar" + data) for data in layers]},
    }
    config_bytes = document(draw, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": blob(draw, files, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": blob(draw, files, data),
                "size": len(data),
            }
            for data in layers
        ],
    }
    manifest_bytes = document(draw, manifest)
    descriptor = {
        "mediaType": manifest["mediaType"],
        "digest": blob(draw, files, manifest_bytes),
        "size": len(manifest_bytes),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    others = draw(
        st.lists(
            st.sampled_from(
                [
                    {**descriptor, "annotations": {"org.opencontainers.image.ref.name": "v2"}},
                    {**descriptor, "mediaType": "application/vnd.oci.image.index.v1+json"},
                    {k: v for k, v in descriptor.items() if k != "annotations"},
                ]
            ),
            max_size=2,
        )
    )
    files["index.json"] = document(draw, {"schemaVersion": 2, "manifests": [descriptor, *others]})
    files["oci-layout"] = document(draw, {"imageLayoutVersion": "1.0.0"})
    if rarely(draw, 10):
        files[draw(st.sampled_from(["index.json", "oci-layout"]))] = draw(st.sampled_from([None, "../outside.json"]))
    return files


@st.composite
def docker_archives(draw: st.DrawFn) -> Files:
    files: Files = {"link.json": "../outside.json", "layer": None}
    layers = draw(st.lists(st.binary(max_size=8), max_size=3, unique=True))
    names = []
    for number, data in enumerate(layers):
        files[f"l{number}/layer.tar"] = data
        names.append(f"l{number}/layer.tar")
    config = document(
        draw,
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(data) for data in layers]},
        },
    )
    config_name = sha256(config)[7:] + ".json"
    if not rarely(draw, 10):  # else missing
        files[config_name] = config + b" " if rarely(draw, 10) else config
    files["manifest.json"] = document(
        draw, [{"Config": config_name, "RepoTags": ["repo/name:latest"], "Layers": names}]
    )
    return files


def config_of(diff_ids: list[str]) -> bytes:
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    return json.dumps(config).encode()


def oci_image(config: bytes) -> Files:
    """A layout of one image, ``config`` over one layer (the regression examples change a part)."""
    files: Files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}

    def put(data: bytes) -> str:
        files["blobs/sha256/" + sha256(data)[7:]] = data
        return sha256(data)

    manifest = json.dumps({"config": {"digest": put(config)}, "layers": [{"digest": put(b"layer"), "size": 5}]})
    files["index.json"] = json.dumps({"manifests": [{"digest": put(manifest.encode())}]}).encode()
    return files


def docker_image(config: bytes, config_name: str | None = None) -> Files:
    """A ``docker save`` archive of one image, ``config`` over one layer."""
    name = config_name or sha256(config)[7:] + ".json"
    return {
        name: config,
        "l0/layer.tar": b"layer",
        "manifest.json": json.dumps(
            [{"Config": name, "RepoTags": ["repo/name:latest"], "Layers": ["l0/layer.tar"]}]
        ).encode(),
    }


_VALID = config_of([sha256(b"tar")])
_UP_AND_OUT = config_of(["sha256:../../../../usr"])  # the store would take /usr for the layer's directory


def write_files(root: str, files: Files) -> None:
    for path, content in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if content is None:
            os.makedirs(full, exist_ok=True)
        elif isinstance(content, str):
            os.symlink(content, full)
        else:
            with open(full, "wb") as f:
                f.write(content)


def read_from(target: str, base: Path, files: Files, read: Callable[[str], Image], inside: str) -> None:
    """``read`` the directory ``files`` make, written in a fresh sandbox next to a valid config outside
    it: refused with one line, or an image that is well formed, every file it names a file below
    ``inside`` (a path relative to the directory)."""
    sandbox = tempfile.mkdtemp(dir=base)
    try:
        with open(os.path.join(sandbox, "outside.json"), "w") as f:
            json.dump({"rootfs": {"type": "layers", "diff_ids": []}}, f)
        root = os.path.join(sandbox, "root")
        os.mkdir(root)
        write_files(root, files)
        try:
            image = read(root)
        except LayerfsError as e:
            one_line(e)
            OUTCOMES[target]["refused"] += 1
            return
        OUTCOMES[target]["accepted"] += 1
        assert DIGEST.fullmatch(image.manifest_digest) and DIGEST.fullmatch(image.config_digest)
        assert isinstance(image.config, dict)
        for layer in image.layers:
            assert os.path.realpath(layer.path).startswith(os.path.realpath(os.path.join(root, inside)) + "/")
            assert layer.digest is None or DIGEST.fullmatch(layer.digest), layer.digest
            assert DIGEST.fullmatch(layer.diff_id), f"diff_id {layer.diff_id!r}: the store makes a path of it"
            assert type(layer.size) is int and layer.size >= 0 and isinstance(layer.media_type, str), layer
            assert layer.digest is not None or os.path.isfile(layer.path), layer
    finally:
        shutil.rmtree(sandbox)


@fuzz(400)
@given(
    files=oci_layouts(),
    tag=mostly(st.sampled_from([None, "latest"]), st.sampled_from(["v2", "none"]) | st.text(max_size=4)),
)
@example(files=oci_image(_UP_AND_OUT), tag=None)
@example(files={**oci_image(_VALID), "index.json": b"[" * 100_000}, tag=None)  # RecursionError in json
@example(files={**oci_image(_VALID), "oci-layout": None}, tag=None)
@example(files={**oci_image(_VALID), "blobs/sha256/" + sha256(_VALID)[7:]: None}, tag=None)
@example(files={**oci_image(_VALID), "index.json": b'{"manifests": [{"digest": "sha256:0"}, 1]}'}, tag=None)
def test_oci_layouts(base: Path, files: Files, tag: str | None) -> None:
    read_from("OCI layouts", base, files, lambda root: read_image(root, tag), "blobs/sha256")


@fuzz(300)
@given(
    files=docker_archives(),
    name=mostly(st.sampled_from([None, "repo/name:latest", "name:latest"]), st.just("latest") | st.text(max_size=4)),
)
@example(files=docker_image(_UP_AND_OUT), name=None)
@example(files=docker_image(b"[" * 100_000, "config.json"), name=None)
@example(files={**docker_image(_VALID), "manifest.json": b'[{"Config": "a\\u0000b", "Layers": []}]'}, name=None)
@example(files={**docker_image(_VALID), "manifest.json": b'[{"Config": 1.5, "RepoTags": "name"}]'}, name="name")
def test_docker_archives(base: Path, files: Files, name: str | None) -> None:
    read_from("docker archives", base, files, lambda root: read_docker_save(root, name), ".")


# -- mount options --------------------------------------------------------------------------------------

D = "@D@"  # in generated options: the directory the test's directories are in

_LOWERS = st.sampled_from([f"{D}/l1", f"{D}/l2", f"{D}/odd\\:\\,\\\\dir", f"{D}/new\nline"])
_PATHS = mostly(
    st.sampled_from([f"{D}/up", f"{D}/wk"]) | _LOWERS,
    st.sampled_from(
        [
            f"{D}/up/inner",
            f"{D}/file",
            f"{D}/missing",
            f"{D}/odd:,\\dir",
            "",
            "l1",
            "/",
            "\0",
            f"{D}/l1\\",
            "\udcff",
        ]
    ),
    odds=4,
)
_NUMBERS = mostly(
    st.sampled_from(["0", "1", "1000", "65534", "100000"]),
    st.sampled_from(
        [
            "4194304",
            "4294967295",
            "4294967296",
            "-1",
            "",
            "x",
            "²",
            "١٢",
            "１２",
            "1" * 5000,
            "0x10",
            " 1",
            "1.0",
            "\n",
        ]
    ),
    odds=4,
)
_MAPPINGS = mostly(
    st.sampled_from(["0:100000:65536", ":0:1000:1:1:100000:65535", "0:0:1"]),
    st.lists(_NUMBERS, max_size=7).map(":".join),
    odds=3,
)
_EXTRAS = st.one_of(
    st.builds("{}={}".format, st.sampled_from(["uidmapping", "gidmapping"]), _MAPPINGS),
    st.builds(
        "{}={}".format,
        st.sampled_from(["squash_to_uid", "squash_to_gid", "x-layerfs-owner", "fsync", "xattr_permissions"]),
        _NUMBERS,
    ),
    st.sampled_from(["ro", "volatile", "squash_to_root", "static_nlink", "noatime", "fsname=x", "", "=", "\\"]),
    st.text(alphabet=",=:\\ab\n", max_size=8),
)


@st.composite
def mount_options(draw: st.DrawFn) -> list[str]:
    """``-o`` strings: mostly a lowerdir, half the time an upper and a work dir, a few more options; all
    split into one to three strings."""
    items = (
        []
        if rarely(draw, 10)
        else ["lowerdir=" + ":".join(draw(st.lists(mostly(_LOWERS, _PATHS), min_size=1, max_size=3)))]
    )
    if draw(st.booleans()):
        items.append("upperdir=" + draw(mostly(st.just(f"{D}/up"), _PATHS)))
        items.append("workdir=" + draw(mostly(st.just(f"{D}/wk"), _PATHS)))
    items += draw(st.lists(_EXTRAS, max_size=4))
    cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=2)))
    return [",".join(items[a:b]) for a, b in itertools.pairwise([0, *cuts, len(items)])]


@pytest.fixture(scope="module")
def option_dirs(base: Path) -> Path:
    where = base / "options"
    for name in ("l1", "l2", "up/inner", "wk", "mnt", "odd:,\\dir", "new\nline"):
        (where / name).mkdir(parents=True)
    (where / "file").write_text("")
    return where


@fuzz(800)
@given(
    strings=mount_options(),
    mountpoint=mostly(
        st.just(f"{D}/mnt"), st.sampled_from([f"{D}/missing", f"{D}/file", None, "", "\0", f"{D}/new\nline"])
    ),
)
@example(strings=[f"lowerdir={D}/l1,x-layerfs-owner=²"], mountpoint=f"{D}/mnt")
@example(strings=[f"lowerdir={D}/l1,uidmapping=0:1:{'1' * 5000}"], mountpoint=f"{D}/mnt")
@example(strings=[f"lowerdir={D}/missing\nline"], mountpoint=f"{D}/mnt")
@example(strings=[f"lowerdir={D}/l1,x-layerfs-owner=0"], mountpoint=f"{D}/mnt")
@example(strings=[f"lowerdir={D}/l1"], mountpoint="")
def test_mount_options(option_dirs: Path, strings: list[str], mountpoint: str | None) -> None:
    strings = [s.replace(D, str(option_dirs)) for s in strings]
    try:
        config = parse(strings, None if mountpoint is None else mountpoint.replace(D, str(option_dirs)))
    except UsageError as e:
        one_line(e)
        OUTCOMES["mount options"]["refused"] += 1
        return
    OUTCOMES["mount options"]["accepted"] += 1
    assert mountpoint, "no mount point, and yet a MountConfig"
    assert isinstance(config, MountConfig) and config.lowers
    assert all(os.path.isabs(d) and os.path.isdir(d) for d in [config.mountpoint, *config.lowers])
    assert (config.upper is None) == (config.work is None) == config.readonly
    assert config.owner is None or 0 < config.owner < 1 << 22, "x-layerfs-owner: not a process id"
    for idmap in config.owners:
        assert idmap.squash is None or 0 <= idmap.squash < 1 << 32
        assert all(0 <= r.stored and 0 <= r.shown and 0 < r.length for r in idmap.ranges)
    assert all("\n" not in w for w in config.warnings), config.warnings


def test_every_target_had_inputs_accepted() -> None:
    """Each fuzz target that ran (all of them, when the file runs whole) took a share of its inputs:
    the checks on accepted inputs ran, not only the refusals."""
    shares = {target: c["accepted"] / (c["accepted"] + c["refused"]) for target, c in OUTCOMES.items()}
    print("accepted shares:", {t: round(v, 3) for t, v in sorted(shares.items())})
    low = {t: v for t, v in shares.items() if v < MIN_ACCEPTED[t]}
    assert not low, f"targets that accepted too few of their inputs: {low} (at least {MIN_ACCEPTED})"
