"""layerfs.oci.unpack: OCI layer tars unpacked into overlay-form layer directories, safely.

Three sources of layers, each checked against kernel overlayfs: our own exporter (an upper directory
built by hand as kernel overlayfs leaves one, and random ones from treespec), GNU tar over a layer in OCI
form (``.wh.`` files, ``.wh..wh..opq``), and umoci's repack of a changed bundle. The unpacked directory
is mounted as a lowerdir over the same lowers the source was made against, and the merged trees must
match entry for entry; where the source is itself an overlay-form layer, the unpacked one must equal it
marker for marker.

Hostile layers are built with tarfile in the test; each must fail with a one-line LayerfsError naming
the entry, leave the destination exactly as it was (empty, its own metadata back) and leave everything
around it untouched: a sentinel directory every symlink and hard link in them points at, and the
destination's parent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from pair import USER, run_as, write
from snapshot import Snapshot, assert_same, snapshot, snapshot_upper
from treespec import generate, render, render_all

from layerfs.core import whiteout
from layerfs.core.changes import changes
from layerfs.core.whiteout import OPAQUE_XATTR_TRUSTED, OPAQUE_XATTR_USER, make_whiteout, mark_opaque
from layerfs.errors import LayerfsError
from layerfs.oci.layertar import write_layer
from layerfs.oci.unpack import UnpackResult, unpack_layer

pytestmark = pytest.mark.root  # the layers have owners and devices: chown, mknod, trusted.* xattrs
OLD_NS = 1_500_000_000_123_456_789  # 2017, with nanoseconds: kept exactly by every step
DIR_NS = 1_400_000_000_000_000_001
LATIN1 = os.fsdecode(b"caf\xe9")  # not UTF-8: a str with a surrogate escape, as os gives it
# security.capability, VFS_CAP_REVISION_2 with the effective bit: cap_net_raw+ep. A chown clears it.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def unpack(data: bytes, dest: Path, **options) -> UnpackResult:
    return unpack_layer(io.BytesIO(data), str(dest), **options)


def fresh(path: Path) -> Path:
    path.mkdir()
    return path


def without(snap: Snapshot, *paths: str) -> Snapshot:
    for p in paths:
        snap.entries.pop(p, None)
        snap.inodes.pop(p, None)
    return snap


def merged(mounts, mountpoint: Path, lowers: list[Path]) -> Snapshot:
    """What kernel overlayfs shows of ``lowers`` (top first), read-only; unmounted again at once."""
    mnt = mounts.overlay(mountpoint, lowers)
    try:
        return snapshot(mnt)
    finally:
        mounts.unmount(mnt)


def gnu_tar(src: Path) -> bytes:
    return subprocess.run(
        [
            "tar",
            "-C",
            str(src),
            "-c",
            "-f",
            "-",
            "--format=posix",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            ".",
        ],
        capture_output=True,
        check=True,
    ).stdout


# -- our exporter's layers, unpacked --------------------------------------------------------------------


@pytest.fixture
def image(layers) -> tuple[Path, Path]:
    """(upper, lower): every kind of change and entry, the upper as kernel overlayfs would leave it, with
    no marker that hides nothing (so the unpacked layer must equal the upper exactly)."""
    lower, upper = layers.dir("lower"), layers.dir("upper")
    write(lower / "etc/passwd", "root\n")
    write(lower / "etc/hosts", "localhost\n", mode=0o644)
    write(lower / "etc/motd", "hi\n")
    write(lower / "var/cache/app/one", "1\n")
    write(lower / "var/cache/app/sub/two", "2\n")
    write(lower / "var/cache/keep", "k\n")
    (lower / "var/log").mkdir(mode=0o755)
    write(lower / "opt/old/a", "a\n")
    write(lower / "opt/old/sub/b", "b\n")
    write(lower / "data/old-name", "payload\n")
    write(lower / "srv/thing", "a file that becomes a directory\n")
    write(lower / "lib/dir-to-file/x", "x\n")

    for d in ("etc", "var/cache", "var/log", "opt", "data", "srv", "lib"):
        (upper / d).mkdir(parents=True, exist_ok=True)
    p = write(upper / "etc/passwd", "root\nuser\n")  # modified
    os.utime(p, ns=(OLD_NS, OLD_NS))
    shutil.copy2(lower / "etc/hosts", upper / "etc/hosts")
    (upper / "etc/hosts").chmod(0o600)  # chmod only
    make_whiteout(str(upper / "etc/motd"))  # a lower file deleted
    os.chown(write(upper / "etc/new-file", "new\n", mode=0o640), 1000, 100)
    make_whiteout(str(upper / "var/cache/app"))  # a whole lower directory deleted
    (upper / "var/log").chmod(0o750)  # a directory's metadata alone
    os.chown(upper / "var/log", 0, 4)
    (upper / "opt/old").mkdir()  # a lower directory replaced
    mark_opaque(str(upper / "opt/old"))
    write(upper / "opt/old/new/deep", "n\n")
    shutil.copy2(lower / "data/old-name", upper / "data/new-name")  # renamed
    make_whiteout(str(upper / "data/old-name"))
    os.setxattr(upper / "data/new-name", "user.note", b"new")
    os.setxattr(upper / "data/new-name", "user.bin", b"\xff\x00binary")
    write(upper / "data/empty", b"")
    write(upper / "data/big", os.urandom(3 << 20 | 77))  # several chunks
    write(upper / "srv/thing/inside", "i\n")  # a file replaced by a directory
    write(upper / "lib/dir-to-file", "now a file\n")  # a directory replaced by a file
    tool = write(upper / "bin/tool", "#!/bin/sh\n")  # setuid, with a file capability
    os.setxattr(tool, "security.capability", CAP_NET_RAW)
    tool.chmod(0o4755)
    os.chown(write(upper / "bin/sgid", "g\n"), 0, 50)
    (upper / "bin/sgid").chmod(0o2755)
    write(upper / "links/first", "shared\n")  # three names of one file, in two directories
    os.link(upper / "links/first", upper / "links/second")
    (upper / "other").mkdir()
    os.link(upper / "links/first", upper / "other/third")
    os.symlink("../etc/passwd", upper / "links/sym")
    os.symlink("/etc/shadow", upper / "links/abs")  # out of the layer: a symlink, never followed
    os.symlink("nowhere", upper / "links/dangling")
    os.symlink("../../../../../../../../outside", upper / "links/up")
    os.lchown(upper / "links/abs", 1000, 1000)
    os.utime(upper / "links/abs", ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    (upper / "dev").mkdir()
    os.mkfifo(upper / "dev/fifo")
    os.mknod(upper / "dev/chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(upper / "dev/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(upper / "dev/sock", stat.S_IFSOCK | 0o755)  # tar cannot hold a socket: left out
    for name, mode in (("fifo", 0o620), ("chr", 0o666), ("blk", 0o660)):
        (upper / "dev" / name).chmod(mode)
    (upper / "tmp").mkdir()
    (upper / "tmp").chmod(0o1777)
    write(upper / "names" / LATIN1, "latin-1 name\n")
    write(upper / "ro/f1", "1\n")  # a read-only directory, its times set after its content
    write(upper / "ro/sub/f2", "2\n")
    for d in (upper / "ro/sub", upper / "ro"):
        d.chmod(0o555)
        os.utime(d, ns=(DIR_NS, DIR_NS))
    return upper, lower


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_an_exported_layer_unpacks_to_the_upper_it_came_from(image, compress, mounts, tmp_path):
    upper, lower = image
    out = io.BytesIO()
    digests = write_layer(out, str(upper), changes(str(upper), [str(lower)]), compress=compress)
    dest = fresh(tmp_path / "unpacked")
    result = unpack(out.getvalue(), dest)
    assert result.diff_id == digests.diff_id

    # The layer itself, marker for marker: whiteouts are 0/0 devices, opaque dirs carry the xattr.
    assert_same(
        without(snapshot_upper(upper), ".", "dev/sock"),
        without(snapshot_upper(dest), "."),
        what="the upper layer and its export unpacked",
        names=("upper", "unpacked"),
    )
    assert os.getxattr(dest / "bin/tool", "security.capability") == CAP_NET_RAW
    assert stat.S_IMODE(os.stat(dest / "bin/tool").st_mode) == 0o4755
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(dest) for name in files)

    # What kernel overlayfs shows with it as a lowerdir, against the upper in its place.
    expected = without(merged(mounts, tmp_path / "m-upper", [upper, lower]), ".", "dev/sock")
    got = without(merged(mounts, tmp_path / "m-unpacked", [dest, lower]), ".")
    assert "opt/old/a" not in got.entries and "var/cache/app" not in got.entries and "etc/motd" not in got.entries
    assert got.link_groups() == {frozenset({"links/first", "links/second", "other/third"})}
    assert_same(
        expected, got, what="kernel overlayfs over the upper and over the unpacked layer", names=("upper", "unpacked")
    )


@pytest.mark.parametrize("seed", [3, 17, 2024])
def test_random_layers_survive_export_and_unpack(seed, tmp_path, mounts):
    spec = generate(seed)
    top, *lowers = render_all(spec, tmp_path / "layers", "overlay")
    out = io.BytesIO()
    digests = write_layer(out, str(top), changes(str(top), [str(p) for p in lowers]), compress=seed % 2 == 1)
    dest = fresh(tmp_path / "unpacked")
    assert unpack(out.getvalue(), dest).diff_id == digests.diff_id
    expected = without(merged(mounts, tmp_path / "m-top", [top, *lowers]), ".")
    got = without(merged(mounts, tmp_path / "m-unpacked", [dest, *lowers]), ".")
    assert_same(expected, got, what=f"seed {seed}: the merged trees", names=("generated", "unpacked"))


# -- other tools' layers --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [5, 11])
def test_a_gnu_tar_layer_in_oci_form_unpacks_to_the_overlay_form(seed, tmp_path, mounts):
    """GNU tar over a layer written with ``.wh.`` files and ``.wh..wh..opq``, names sorted, so a marker
    often follows entries of its own directory (``.d12`` sorts before ``.wh..wh..opq``); ``./`` first."""
    spec = generate(seed)
    render(spec.layers[0], tmp_path / "oci", "oci")
    render(spec.layers[0], tmp_path / "overlay", "overlay")
    lowers = [tmp_path / f"l{i}" for i in (1, 2)]
    for layer, path in zip(spec.layers[1:], lowers, strict=True):
        render(layer, path, "overlay")
    data = gnu_tar(tmp_path / "oci")
    assert b"./.wh." in data or b"/.wh." in data
    dest = fresh(tmp_path / "unpacked")
    result = unpack(data, dest)
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()  # GNU tar's padding included
    assert result.size == len(data)
    # "." included: the root's own entry gave dest the metadata of the directory tar read.
    assert_same(
        snapshot_upper(tmp_path / "overlay"),
        snapshot_upper(dest),
        what=f"seed {seed}: the layer in overlay form and GNU tar's OCI-form layer unpacked",
        names=("overlay-form", "unpacked"),
    )
    expected = without(merged(mounts, tmp_path / "m-overlay", [tmp_path / "overlay", *lowers]), ".")
    got = without(merged(mounts, tmp_path / "m-unpacked", [dest, *lowers]), ".")
    assert_same(expected, got, what=f"seed {seed}: the merged trees", names=("overlay-form", "unpacked"))


def umoci(*args: str) -> None:
    assert shutil.which("umoci"), "umoci is missing: tools/setup installs it"
    result = subprocess.run(["umoci", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"umoci {' '.join(args)} failed:\n{result.stderr}"


def test_a_layer_umoci_repacked_unpacks_to_the_bundle(layers, tmp_path, mounts):
    """umoci computes a changed bundle's layer itself (``.wh.`` per deleted name, no opaque marker, parent
    directories left out): unpacked over the image's lower, it must show the changed bundle."""
    lower = layers.dir("lower")
    write(lower / "etc/passwd", "root\n")
    write(lower / "etc/motd", "hi\n")
    write(lower / "etc/hosts", "localhost\n", mode=0o644)
    write(lower / "var/cache/app/one", "1\n")
    write(lower / "var/cache/app/sub/two", "2\n")
    write(lower / "opt/old/a", "a\n")
    write(lower / "opt/old/sub/b", "b\n")
    write(lower / "usr/bin/tool", "#!/bin/sh\n", mode=0o755)
    os.link(lower / "usr/bin/tool", lower / "usr/bin/tool-again")
    lower_tar = tmp_path / "lower.tar"
    lower_tar.write_bytes(gnu_tar(lower))
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"
    ref = f"{layout}:t"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", ref)
    umoci("raw", "add-layer", "--image", ref, str(lower_tar))
    umoci("unpack", "--image", ref, str(bundle))

    rootfs = bundle / "rootfs"
    (rootfs / "etc/motd").unlink()
    shutil.rmtree(rootfs / "var/cache/app")
    shutil.rmtree(rootfs / "opt/old")
    write(rootfs / "opt/old/new", "n\n")
    write(rootfs / "etc/passwd", "root\nuser\n")
    whole = OLD_NS // 10**9 * 10**9  # umoci 0.4.7 writes no PAX time records: whole seconds only
    os.utime(rootfs / "etc/passwd", ns=(whole, whole))
    (rootfs / "etc/hosts").chmod(0o600)
    os.chown(rootfs / "etc/hosts", 1000, 100)
    os.setxattr(write(rootfs / "srv/new", "new\n", mode=0o640), "user.note", b"\x00\xffv")
    os.link(rootfs / "srv/new", rootfs / "srv/new-link")
    os.symlink("/etc/shadow", rootfs / "srv/abs")
    os.mkfifo(rootfs / "srv/fifo", 0o600)
    (rootfs / "usr/bin/tool").chmod(0o4755)
    umoci("repack", "--image", ref, str(bundle))

    index = json.loads((layout / "index.json").read_text())
    blob = lambda digest: layout / "blobs/sha256" / digest.split(":", 1)[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    layer = blob(manifest["layers"][-1]["digest"])
    assert layer.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(layer) as tar:
        names = tar.getnames()
    assert "etc/.wh.motd" in names and "var/cache/.wh.app" in names and "opt/old/.wh.sub" in names

    dest = fresh(tmp_path / "unpacked")
    with open(layer, "rb") as f:
        result = unpack_layer(f, str(dest))
    assert result.diff_id == config["rootfs"]["diff_ids"][-1]
    assert result.entries == len(names)
    expected = without(snapshot(rootfs), ".")
    got = without(merged(mounts, tmp_path / "m", [dest, lower]), ".")
    assert_same(
        expected, got, what="umoci's changed bundle and its layer unpacked over the lower", names=("bundle", "unpacked")
    )


# -- what the entries mean ------------------------------------------------------------------------------


Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes | None = None,
    *,
    mode: int | None = None,
    linkname: str = "",
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = OLD_NS,
    xattrs: dict[str, bytes] | None = None,
    pax: dict[str, str] | None = None,
    major: int = 0,
    minor: int = 0,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode if mode is not None else 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname, info.uid, info.gid, info.uname, info.gname = linkname, uid, gid, "", ""
    info.devmajor, info.devminor = major, minor
    info.mtime = mtime_ns // 10**9
    info.pax_headers["mtime"] = f"{mtime_ns // 10**9}.{mtime_ns % 10**9:09d}"
    for attr, value in (xattrs or {}).items():
        info.pax_headers["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
    info.pax_headers.update(pax or {})
    if data is not None:
        info.size = len(data)
    return info, data


def reg(name: str, data: bytes = b"", **kw) -> Entry:
    return entry(name, tarfile.REGTYPE, data, **kw)


def dir_(name: str, **kw) -> Entry:
    return entry(name, tarfile.DIRTYPE, **kw)


def sym(name: str, target: str, **kw) -> Entry:
    return entry(name, tarfile.SYMTYPE, linkname=target, **kw)


def link(name: str, target: str, **kw) -> Entry:
    return entry(name, tarfile.LNKTYPE, linkname=target, **kw)


def tar_of(*entries: Entry, compress: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.TarFile(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(out.getvalue()) if compress else out.getvalue()


def kind_of(path: Path) -> str:
    st = os.lstat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout"
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(stat.S_IFMT(st.st_mode), "other")


def opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR_TRUSTED) == b"y"
    except OSError:
        return False


def test_a_later_entry_replaces_the_earlier_one(tmp_path):
    dest = fresh(tmp_path / "dest")
    unpack(
        tar_of(
            reg("x", b"1"),
            dir_("x/"),
            reg("x/child", b"c"),
            reg("x", b"3"),  # file, dir with content, file
            dir_("d/", mode=0o700, uid=5, xattrs={"user.a": b"1"}),
            reg("d/keep", b"k"),
            dir_("d/", mode=0o751, uid=6, mtime_ns=DIR_NS, xattrs={"user.b": b"2"}),  # a directory over one
            reg("h1", b"old"),
            link("h2", "h1"),
            reg("h1", b"new"),  # the link keeps the file it was made to
            sym("s", "first"),
            sym("s", "second"),
            reg("f", b"file"),
            sym("f", "now a symlink"),
        ),
        dest,
    )
    assert (dest / "x").read_bytes() == b"3" and kind_of(dest / "x") == "file"
    st = os.stat(dest / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o751, 6, DIR_NS)
    assert (dest / "d/keep").read_bytes() == b"k"
    assert {a: os.getxattr(dest / "d", a) for a in os.listxattr(dest / "d")} == {"user.b": b"2"}
    assert (dest / "h1").read_bytes() == b"new" and (dest / "h2").read_bytes() == b"old"
    assert os.stat(dest / "h2").st_nlink == 1
    assert os.readlink(dest / "s") == "second" and os.readlink(dest / "f") == "now a symlink"


def test_whiteouts_apply_to_the_layers_below_only(tmp_path):
    """A name the layer both whites out and carries is the layer's; a directory there is opaque, in
    whichever order the two come; a directory implied there (by a child) too."""
    dest = fresh(tmp_path / "dest")
    result = unpack(
        tar_of(
            reg(".wh.a"),
            dir_("a/"),
            reg("a/f"),  # whiteout first
            dir_("b/"),
            reg("b/f"),
            reg(".wh.b"),  # whiteout after
            reg("c", b"c"),
            reg(".wh.c"),  # a file and its whiteout
            reg(".wh.e"),
            reg("e", b"e"),
            reg(".wh.g"),
            reg("g/x"),  # implied directory
            reg(".wh.h"),
            reg("h", b"h"),
            dir_("h/"),  # whited out, a file, then a directory: still opaque
            reg("o/.wh..wh..opq"),
            reg("o/y"),
            dir_("o/", mode=0o700),  # the marker before the directory
            entry("w", tarfile.CHRTYPE),  # overlay's whiteout as an entry: a whiteout
            reg("gone/.wh.deep"),
            reg(".wh.gone2"),
            reg("./.wh..wh..opq"),
        ),
        dest,
    )
    assert result.entries == 22
    for name in "abgho":
        assert kind_of(dest / name) == "dir" and opaque(dest / name), name
    assert (dest / "c").read_bytes() == b"c" and (dest / "e").read_bytes() == b"e"
    assert kind_of(dest / "w") == kind_of(dest / "gone2") == kind_of(dest / "gone/deep") == "whiteout"
    assert not opaque(dest / "gone") and opaque(dest)  # the root's own marker
    assert stat.S_IMODE(os.stat(dest / "o").st_mode) == 0o700
    assert sorted(os.listdir(dest)) == ["a", "b", "c", "e", "g", "gone", "gone2", "h", "o", "w"]


def test_names_metadata_and_special_files(tmp_path, arena):
    dest = arena.dest
    outside = str(arena.outside)
    unpack(
        tar_of(
            dir_(".", mode=0o750, uid=7, gid=8, mtime_ns=DIR_NS, xattrs={"user.root": b"r"}),  # the root's own entry
            reg("/abs/path", b"inside"),  # a leading "/" is the layer's root
            reg("./dot//slashes/./f", b"n"),
            reg("lex/../lexical", b"l"),
            reg("p/q/r", b"implied parents"),
            dir_("ro/", mode=0o555, mtime_ns=DIR_NS),
            reg("ro/f", b"in a read-only dir"),
            dir_("ro/sub/", mode=0o500),
            reg("tool", b"x", mode=0o4755, uid=1000, gid=1000, xattrs={"security.capability": CAP_NET_RAW}),
            dir_("shared/", mode=0o3775, gid=50),
            dir_("tmp/", mode=0o1777),
            sym("s", outside + "/secret", uid=1000, gid=100),
            link("s-again", "s"),  # a hard link to the symlink itself, not to what it points at
            entry("chr", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
            entry("blk", tarfile.BLKTYPE, mode=0o660, major=7, minor=200),
            entry("fifo", tarfile.FIFOTYPE, mode=0o620, uid=33, gid=33),
            reg(LATIN1, b"latin-1"),
            reg("t\u00e9l\u00e9", b"utf-8"),
            reg("old", b"o", pax={"mtime": "-1.5"}),  # before 1970
        ),
        dest,
    )
    st = os.stat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o750, 7, 8, DIR_NS)
    assert os.getxattr(dest, "user.root") == b"r"
    assert (dest / "abs/path").read_bytes() == b"inside" and not os.path.lexists("/abs/path")
    assert (dest / "dot/slashes/f").read_bytes() == b"n" and (dest / "lexical").read_bytes() == b"l"
    assert not (dest / "lex").exists()
    for d in ("p", "p/q"):
        st = os.stat(dest / d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    st = os.stat(dest / "ro")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o555, DIR_NS)  # times set after its content
    assert stat.S_IMODE(os.stat(dest / "ro/sub").st_mode) == 0o500
    st = os.stat(dest / "tool")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o4755, 1000, 1000, OLD_NS)
    assert os.getxattr(dest / "tool", "security.capability") == CAP_NET_RAW  # set after the owner
    assert stat.S_IMODE(os.stat(dest / "shared").st_mode) == 0o3775
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o1777
    st = os.lstat(dest / "s")
    assert (os.readlink(dest / "s"), st.st_uid, st.st_gid, st.st_mtime_ns) == (outside + "/secret", 1000, 100, OLD_NS)
    assert os.path.samestat(os.lstat(dest / "s"), os.lstat(dest / "s-again")) and os.path.islink(dest / "s-again")
    for name, kind, mode, rdev in (("chr", stat.S_IFCHR, 0o666, (1, 3)), ("blk", stat.S_IFBLK, 0o660, (7, 200))):
        st = os.lstat(dest / name)
        assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (kind, mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev
    st = os.lstat(dest / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o620, 33)
    assert (dest / LATIN1).read_bytes() == b"latin-1" and (dest / "t\u00e9l\u00e9").read_bytes() == b"utf-8"
    assert os.stat(dest / "old").st_mtime_ns == -1_500_000_000
    assert arena.outside_unchanged()


def test_a_tree_as_deep_as_path_max_allows(tmp_path):
    dest = fresh(tmp_path / "dest")
    name = "deep/" + "d/" * 1500 + "f"
    try:
        unpack(tar_of(dir_("deep/", mode=0o700, mtime_ns=DIR_NS), reg(name, b"deep"), reg("deep/x")), dest)
        assert (dest / name).read_bytes() == b"deep"
        assert os.stat(dest / "deep").st_mtime_ns == DIR_NS
    finally:
        subprocess.run(["rm", "-rf", str(dest)], check=True)  # shutil.rmtree (pytest's too) recurses: too deep


def test_diff_id_size_and_entries(image, tmp_path):
    upper, lower = image
    found = changes(str(upper), [str(lower)])
    plain, packed = io.BytesIO(), io.BytesIO()
    digests = write_layer(plain, str(upper), found)
    write_layer(packed, str(upper), found, compress=True)
    data = plain.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        count = len(tar.getmembers())
    whole = "sha256:" + hashlib.sha256(data).hexdigest()
    assert digests.diff_id == whole
    half = len(data) // 2
    two_members = gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\0" * 100  # concatenated, padded
    for i, layer in enumerate((data, packed.getvalue(), two_members, data + b"\0" * 10240)):
        result = unpack(layer, fresh(tmp_path / f"d{i}"))
        size = len(data) + (10240 if i == 3 else 0)
        expected = whole if i < 3 else "sha256:" + hashlib.sha256(layer).hexdigest()
        assert result[:3] == (expected, count, size), i


def test_progress_follows_the_bytes_read(tmp_path):
    big = os.urandom(3 << 20)
    data = tar_of(reg("big", big), reg("small", b"s"), compress=True)
    calls: list[tuple[int, int | None]] = []
    unpack(data, fresh(tmp_path / "a"), progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))
    assert len(calls) > 3 and all(a[0] <= b[0] for a, b in itertools.pairwise(calls))

    path = tmp_path / "layer.tar.gz"
    path.write_bytes(data)
    calls.clear()
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:  # a pipe: no total
        unpack_layer(cat.stdout, str(fresh(tmp_path / "b")), progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, None) and calls[-1] == (len(data), None)
    assert (tmp_path / "b/big").read_bytes() == big


# -- hostile and damaged layers -------------------------------------------------------------------------


def _state(root: Path) -> dict[str, tuple]:
    """Everything about every entry below ``root`` that an unpack could change, never following links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != str(root):
                continue
            st = os.lstat(path)
            content = (
                os.readlink(path)
                if stat.S_ISLNK(st.st_mode)
                else Path(path).read_bytes()
                if stat.S_ISREG(st.st_mode)
                else sorted(os.listdir(path))
                if stat.S_ISDIR(st.st_mode)
                else st.st_rdev
            )
            xattrs = {a: os.getxattr(path, a, follow_symlinks=False) for a in os.listxattr(path, follow_symlinks=False)}
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_size,
                st.st_mtime_ns,
                content,
                xattrs,
            )
    return out


class Arena:
    """A destination with metadata of its own, beside a sentinel directory that hostile symlinks and
    links point at; ``tmp_path`` holds nothing else."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.outside = base / "outside"
        write(self.outside / "secret", "SECRET\n")
        (self.outside / "dir").mkdir()
        self.dest = fresh(base / "dest")
        os.setxattr(self.dest, "user.mine", b"1")
        os.utime(self.dest, ns=(DIR_NS, DIR_NS))
        self.before = _state(base)

    def outside_unchanged(self) -> bool:
        now = _state(self.base)
        return {k: v for k, v in now.items() if not k.startswith("dest")} == {
            k: v for k, v in self.before.items() if not k.startswith("dest")
        }

    def refused(self, data: bytes, match: str) -> str:
        try:
            with pytest.raises(LayerfsError) as caught:
                unpack(data, self.dest)
            message = str(caught.value)
            assert "\n" not in message and re.search(match, message), message
            assert os.listdir(self.dest) == []
            assert _state(self.base) == self.before  # dest's own metadata back, and nothing else touched
            return message
        finally:
            # Whatever a failing unpack left, however deep: pytest's own cleanup could not remove a tree
            # deeper than Python's recursion limit, and would fail every later run.
            left = [str(self.dest / name) for name in os.listdir(self.dest)]
            if left:
                subprocess.run(["rm", "-rf", "--", *left], check=True)


@pytest.fixture
def arena(tmp_path) -> Arena:
    return Arena(tmp_path)


def benign(outside: str) -> list[Entry]:
    """Something of every kind first, so that the undoing has work to do, the root's metadata too."""
    return [
        dir_(".", mode=0o700, uid=3, xattrs={"user.root": b"1"}),
        reg(".wh..wh..opq"),
        dir_("ok/"),
        reg("ok/file", b"data\n"),
        reg("ok/sub/deep/file", b"deep\n"),
        reg(".wh.gone"),
        reg("ok/.wh..wh..opq"),
        link("ok/link", "ok/file"),
        sym("ok/sym", outside + "/secret"),
        dir_("ok/ro", mode=0o555),
        entry("ok/fifo", tarfile.FIFOTYPE),
        reg("ok/" + LATIN1, b"x"),
    ]


HOSTILE: list = [
    pytest.param(
        lambda o: [reg("../escape", b"x")], r"entry '\.\./escape': the name leads out of the layer", id="dotdot"
    ),
    pytest.param(lambda o: [reg("a/../../x", b"x")], r"entry 'a/\.\./\.\./x': the name leads out", id="dotdot-inside"),
    pytest.param(lambda o: [reg("/../escape", b"x")], r"entry '/\.\./escape': the name leads out", id="abs-dotdot"),
    pytest.param(
        lambda o: [sym("a", o), reg("a/file", b"x")],
        r"entry 'a/file': 'a' is a symlink, which a layer is never written or read through",
        id="symlink-absolute",
    ),
    pytest.param(
        lambda o: [dir_("d/"), sym("d/a", ".."), reg("d/a/x", b"x")],
        r"entry 'd/a/x': 'd/a' is a symlink",
        id="symlink-dotdot",
    ),
    pytest.param(lambda o: [sym("a", o), dir_("a/sub/")], r"entry 'a/sub': 'a' is a symlink", id="symlink-then-dir"),
    pytest.param(lambda o: [sym("a", o), reg("a/new/deep", b"x")], r"'a' is a symlink", id="symlink-implied-dir"),
    pytest.param(
        lambda o: [sym("a", o), reg("a/.wh.secret")], r"entry 'a/\.wh\.secret': 'a' is a symlink", id="symlink-whiteout"
    ),
    pytest.param(
        lambda o: [sym("a", o), reg("a/.wh..wh..opq")],
        r"entry 'a/\.wh\.\.wh\.\.opq': 'a' is a symlink",
        id="symlink-opaque",
    ),
    pytest.param(
        lambda o: [dir_("a/"), reg("a/f"), sym("a", o), reg("a/g", b"x")],
        r"entry 'a/g': 'a' is a symlink",
        id="symlink-replacing-dir",
    ),
    pytest.param(
        lambda o: [link("h", "../outside/secret")],
        r"entry 'h': its hard-link target '\.\./outside/secret' leads out of the layer",
        id="link-dotdot",
    ),
    pytest.param(
        lambda o: [link("h", o + "/secret")],
        r"entry 'h': its hard-link target '/.*/secret' cannot be "
        r"reached: '\w+' does not exist",
        id="link-absolute",
    ),
    pytest.param(
        lambda o: [sym("s", o), link("h", "s/secret")],
        r"entry 'h': its hard-link target 's/secret' cannot be reached: 's' is a symlink",
        id="link-through-symlink",
    ),
    pytest.param(
        lambda o: [link("h", "nope")], r"entry 'h': its hard-link target 'nope' is not in the layer", id="link-missing"
    ),
    pytest.param(lambda o: [reg(".wh.w"), link("h", "w")], r"target 'w' is not in the layer", id="link-to-whiteout"),
    pytest.param(lambda o: [dir_("d/"), link("h", "d")], r"target 'd' is a directory", id="link-to-dir"),
    pytest.param(
        lambda o: [reg("f", b"x"), link("f", "f")], r"entry 'f': it is a hard link to itself", id="link-to-itself"
    ),
    pytest.param(lambda o: [reg(".wh...")], r"entry '\.wh\.\.\.': it is neither a whiteout", id="whiteout-dotdot"),
    pytest.param(lambda o: [reg("d/.wh..")], r"entry 'd/\.wh\.\.': it is neither", id="whiteout-dot"),
    pytest.param(lambda o: [reg("../.wh.x")], r"entry '\.\./\.wh\.x': the name leads out", id="whiteout-outside"),
    pytest.param(lambda o: [reg("d/.wh.")], r"entry 'd/\.wh\.': it is neither", id="whiteout-bare"),
    pytest.param(lambda o: [dir_(".wh..wh.plnk/")], r"it is neither a whiteout", id="aufs-metadata"),
    pytest.param(lambda o: [reg(".wh.a/b", b"x")], r"entry '\.wh\.a/b': '\.wh\.a' is a whiteout name", id="marker-dir"),
    pytest.param(
        lambda o: [dir_("d/", xattrs={"trusted.overlay.opaque": b"y"})],
        r"entry 'd': it carries the xattr 'trusted\.overlay\.opaque', overlay's own",
        id="xattr-opaque",
    ),
    pytest.param(
        lambda o: [dir_("d/", xattrs={"trusted.overlay.redirect": o.encode()})],
        r"'trusted\.overlay\.redirect'",
        id="xattr-redirect",
    ),
    pytest.param(
        lambda o: [reg("f", b"x", xattrs={"trusted.overlay.metacopy": b""})],
        r"'trusted\.overlay\.metacopy'",
        id="xattr-metacopy",
    ),
    pytest.param(
        lambda o: [dir_("d/", xattrs={"user.overlay.opaque": b"y"})],
        r"'user\.overlay\.opaque'",
        id="xattr-user-overlay",
    ),
    pytest.param(
        lambda o: [reg("f", xattrs={"user.fuseoverlayfs.origin": b"x"})],
        r"'user\.fuseoverlayfs\.origin'",
        id="xattr-fuse-overlayfs",
    ),
    pytest.param(
        lambda o: [reg("x", b"x", pax={"path": "a\0b"})],
        r"entry 'a\\x00b': the name holds a NUL byte",
        id="nul-in-name",
    ),
    pytest.param(
        lambda o: [sym("x", "", pax={"linkpath": "a\0b"})],
        r"entry 'x': the symlink target holds a NUL",
        id="nul-in-target",
    ),
    pytest.param(
        lambda o: [reg("f", b"x"), reg("f/x", b"x")], r"entry 'f/x': 'f' is not a directory", id="file-as-parent"
    ),
    pytest.param(lambda o: [reg(".", b"x")], r"entry '\.': the layer's root can only be a directory", id="root-file"),
    pytest.param(lambda o: [entry("v", b"V", b"")], r"entry 'v': entry type b'V' is not one", id="volume-header"),
    pytest.param(
        lambda o: [reg("f", b"", pax={"uid": "4294967295"})],
        r"entry 'f': its owner 4294967295:0 is out",
        id="owner-minus-one",
    ),
    pytest.param(
        lambda o: [reg("f", b"", pax={"mtime": "soon"})], r"its PAX mtime record 'soon' is not a time", id="bad-time"
    ),
    pytest.param(
        lambda o: [reg("f", b"", xattrs={"user.big": b"x" * (1 << 20)})],
        r"after entry 'ok/.*': damaged tar header .*over the 1048576 allowed",
        id="huge-pax-record",
    ),
    pytest.param(
        lambda o: [reg("x" * 256, b"x")], r"entry 'x{120}…\[256 characters\]': File name too long", id="name-too-long"
    ),
    pytest.param(lambda o: [reg("a/" * 2100, b"x")], r"the name is longer than PATH_MAX", id="path-too-long"),
    pytest.param(
        lambda o: [reg("d/" * 2000 + "f", b"x"), reg("../x")],
        r"entry '\.\./x': the name leads out",
        id="deep-tree-then-escape",
    ),  # undone without recursion: deeper than Python's stack
]


@pytest.mark.parametrize("hostile, match", HOSTILE)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_a_hostile_layer_is_refused_and_leaves_nothing(
    hostile: Callable[[str], list[Entry]], match: str, compress: bool, arena
):
    outside = str(arena.outside)
    data = tar_of(*benign(outside), *hostile(outside), reg("never", b"reached"), compress=compress)
    assert arena.refused(data, match).startswith("cannot unpack ")


def _damaged_cases() -> list:
    good = tar_of(*benign("/nonexistent"), reg("big", bytes(range(256)) * 20), reg("after", b"a"))
    big, after = _members(good)["big"], _members(good)["after"]
    whited = tar_of(*benign("/nonexistent"), reg(".wh.x", b"w" * 1000))  # a whiteout's data is never read
    cut_whiteout = whited[: _members(whited)[".wh.x"].offset_data + 100]
    packed = gzip.compress(good)
    corrupt = bytearray(good)
    corrupt[after.offset + 3] ^= 0xFF  # the last entry's header, in its (PAX) name: bad checksum
    garbled = bytearray(packed)
    garbled[len(packed) // 2] ^= 0xFF
    return [
        pytest.param(
            good[: big.offset_data + 1000],
            r"entry 'big': the tar ends inside the entry's data \(truncated\)$",
            id="cut-in-data",
        ),
        pytest.param(
            cut_whiteout,
            r"entry '\.wh\.x': the tar ends inside the entry's data \(truncated\)$",
            id="cut-in-skipped-data",
        ),
        pytest.param(
            good[: after.offset + 100], r"after entry 'big': the tar ends inside a header", id="cut-in-header"
        ),
        pytest.param(
            good[: after.offset_data - 512],  # "after"'s PAX record whole, its own header missing
            r"after entry 'big': the tar ends after a header record, without the entry it is for \(truncated\)$",
            id="cut-after-pax-record",
        ),
        pytest.param(
            bytes(corrupt), r"after entry 'big': damaged tar header at byte \d+ \(bad checksum\)", id="bad-checksum"
        ),
        pytest.param(b"", r"^cannot unpack the layer: it is empty$", id="empty"),
        pytest.param(
            b"not a tar at all\n" * 40, r"^cannot unpack the layer: it is not a tar \(invalid header\)$", id="not-a-tar"
        ),
        pytest.param(bytes(garbled), r"the gzip data is damaged|damaged tar", id="gzip-garbled"),
        pytest.param(packed[: len(packed) - 30], r"the gzip data ends early \(truncated\)", id="gzip-cut"),
        pytest.param(packed[:-4] + b"\0\0\0\0", r"the gzip data is damaged \(Incorrect length", id="gzip-bad-length"),
        pytest.param(
            packed + b"garbage",
            r"after entry 'after': the gzip data is damaged \(Not a gzipped file",
            id="gzip-trailing-garbage",
        ),
        pytest.param(b"\x28\xb5\x2f\xfd" + b"\1" * 100, r"the zstd data is damaged|it is empty", id="zstd-garbled"),
        pytest.param(
            zstandard.ZstdCompressor().compress(b"not a tar at all\n" * 40), r"it is not a tar", id="zstd-not-a-tar"
        ),
    ]


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info for info in tar.getmembers()}


@pytest.mark.parametrize("data, match", _damaged_cases())
def test_a_damaged_layer_is_refused_and_leaves_nothing(data, match, arena):
    arena.refused(data, match)


@pytest.mark.parametrize("where", ["beside", "in-dev-shm"])
def test_a_plain_tar_in_a_file_unpacks_as_from_a_stream(where, tmp_path):
    """Its files' data is copied from the file by offset, counted from where the stream stands; from
    another filesystem (tmpfs), where the kernel refuses that copy, it is read from the stream."""
    data = tar_of(reg("small", b"x" * 5000), reg("empty"), reg("big", bytes(range(256)) * 5000), reg("last", b"abc"))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if where == "in-dev-shm" else tmp_path) as holder:
        path = Path(holder, "layer.tar")
        path.write_bytes(b"junk" * 300 + data)
        with open(path, "rb") as f:
            f.seek(1200)
            from_file = unpack_layer(f, str(fresh(tmp_path / "from-file")))
    from_stream = unpack(data, fresh(tmp_path / "from-stream"))
    assert from_file == from_stream
    assert_same(
        snapshot(tmp_path / "from-stream"),
        snapshot(tmp_path / "from-file"),
        what="the unpacked layers",
        names=("stream", "file"),
    )


def test_a_plain_tar_in_a_file_written_to_while_it_is_read_is_refused(tmp_path):
    """The files' data is copied from the file, the digest made of the stream: once the file changes, the
    two may differ."""
    data = tar_of(reg("big", bytes(range(256)) * 5000), reg("last", b"abc"))
    path = tmp_path / "layer.tar"
    path.write_bytes(data)

    class Written(io.FileIO):
        def read(self, n: int = -1) -> bytes:
            chunk = super().read(n)
            os.utime(self.fileno())  # (as a write would: its mtime and ctime move)
            return chunk

    dest = fresh(tmp_path / "dest")
    with Written(path) as f, pytest.raises(LayerfsError, match=r"the tar's file changed while it was read$"):
        unpack_layer(f, str(dest))
    assert os.listdir(dest) == []


def test_a_plain_tar_in_a_file_that_ends_inside_a_files_data_is_refused(tmp_path):
    good = tar_of(reg("big", bytes(range(256)) * 20), reg("after", b"a"))
    path = tmp_path / "layer.tar"
    path.write_bytes(good[: _members(good)["big"].offset_data + 1000])
    dest = fresh(tmp_path / "dest")
    with open(path, "rb") as f, pytest.raises(LayerfsError, match=r"entry 'big': the tar ends inside the entry's data"):
        unpack_layer(f, str(dest))
    assert os.listdir(dest) == []


@pytest.mark.parametrize("cut", ["after-data", "in-padding", "at-block"])
def test_a_tar_that_ends_after_an_entry_without_its_end_block_is_whole(cut, tmp_path):
    """As umoci insert writes a layer, and Go's archive/tar (docker, containerd, podman, umoci) reads it:
    the last entry's data whole, then neither the rest of its block nor the end-of-archive block."""
    good = tar_of(reg("big", bytes(range(256)) * 20), reg("last", b"abc"))
    last = _members(good)["last"]
    end = {"after-data": last.offset_data + 3, "in-padding": last.offset_data + 100, "at-block": last.offset_data + 512}
    data = good[: end[cut]]
    got = unpack(data, fresh(tmp_path / "dest"))
    assert got[:3] == ("sha256:" + hashlib.sha256(data).hexdigest(), 2, len(data))
    assert (tmp_path / "dest/last").read_bytes() == b"abc"
    assert (tmp_path / "dest/big").read_bytes() == bytes(range(256)) * 20


def test_a_full_disk_is_an_error_and_leaves_nothing(mounts, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounts.points.append(small)  # unmounted by the fixture whatever happens
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    dest = fresh(small / "dest")
    data = tar_of(*benign("/nonexistent"), reg("big", os.urandom(4 << 20)), reg("after", b"a"))
    with pytest.raises(LayerfsError, match=r"^cannot unpack layer entry 'big': No space left on device$"):
        unpack(data, dest)
    assert os.listdir(dest) == []
    assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks  # every block given back
    mounts.unmount(small)


def test_the_destination_must_be_an_empty_directory(tmp_path):
    data = tar_of(reg("f", b"x"))
    (tmp_path / "full").mkdir()
    write(tmp_path / "full/mine", "keep\n")
    with pytest.raises(LayerfsError, match=r"^cannot unpack into .*/full: it is not empty$"):
        unpack(data, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["mine"]
    with pytest.raises(LayerfsError, match=r"^cannot unpack into .*/missing: No such file or directory$"):
        unpack(data, tmp_path / "missing")
    with pytest.raises(LayerfsError, match=r"^cannot unpack into .*/mine: Not a directory$"):
        unpack(data, tmp_path / "full/mine")


# -- not root ---------------------------------------------------------------------------------------


@pytest.fixture
def user_dir() -> Path:
    """A directory owned by the ordinary user, where that user can reach it."""
    base = Path(tempfile.mkdtemp(prefix="layerfs-unpack-"))
    try:
        base.chmod(0o755)
        os.chown(base, USER, USER)
        yield base
    finally:
        shutil.rmtree(base)


def _unpack_as_user(data: bytes, dest: str) -> tuple[str | None, list[str]]:
    try:
        unpack_layer(io.BytesIO(data), dest)
        error = None
    except LayerfsError as e:
        error = str(e)
    return error, sorted(os.listdir(dest))


def test_without_root_owners_and_devices_are_errors_markers_fall_back(user_dir):
    """No rootless mapping: an owner or a device node the caller cannot make stops the unpack. Whiteouts
    need no privilege (the kernel lets anyone make a 0/0 device); the opaque mark falls back to the user
    namespace's xattr, as whiteout.mark_opaque does."""
    mine = {"uid": USER, "gid": USER}
    dest = str(user_dir)
    error, left = run_as(
        USER,
        USER,
        _unpack_as_user,
        tar_of(dir_("d/", **mine), reg("d/f", b"x", **mine), entry("null", tarfile.CHRTYPE, major=1, minor=3, **mine)),
        dest,
    )
    assert error == "cannot unpack layer entry 'null': making a device node needs root (CAP_MKNOD)" and left == []
    error, left = run_as(USER, USER, _unpack_as_user, tar_of(reg("f", b"x", **mine), reg("root-owned", b"x")), dest)
    assert error is not None and left == []
    assert re.fullmatch(
        r"cannot unpack layer entry 'root-owned': cannot give it the owner 0:0: Operation not "
        r"permitted \(that needs root\)",
        error,
    ), error
    error, left = run_as(
        USER,
        USER,
        _unpack_as_user,
        tar_of(dir_("d/", **mine), reg("d/.wh.x"), reg("d/.wh..wh..opq"), reg("d/f", b"x", **mine)),
        dest,
    )
    assert error is None and left == ["d"]
    assert kind_of(user_dir / "d/x") == "whiteout"
    assert os.getxattr(user_dir / "d", OPAQUE_XATTR_USER) == b"y"


def test_a_zstd_layer_unpacks_like_the_plain_one(tmp_path):
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hello")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
        whiteout_entry = tarfile.TarInfo("etc/.wh.gone")
        tar.addfile(whiteout_entry)
    data = plain.getvalue()
    compressed = zstandard.ZstdCompressor().compress(data[:700]) + zstandard.ZstdCompressor().compress(data[700:])
    results = []
    for name, blob in (("plain", data), ("zstd", compressed)):
        dest = tmp_path / name
        dest.mkdir()
        results.append(unpack_layer(io.BytesIO(blob), str(dest)))
        assert (dest / "etc/hello").read_text() == "hello\n" and whiteout.is_whiteout_stat(os.lstat(dest / "etc/gone"))
    assert results[0].diff_id == results[1].diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
