"""layerfs.oci.layertar: a container's changes written as an OCI image layer.

Upper directories are built by hand the way kernel overlayfs leaves them (0/0 character-device
whiteouts, the opaque xattr, written by layerfs.core.whiteout), their changes computed by
layerfs.core.changes, and the layer checked three ways: read back with tarfile, entry by entry;
written twice and compressed, byte for byte; and applied by umoci, a real OCI tool, over a tar of the
lower layer: the rootfs umoci unpacks must equal the merged view kernel overlayfs mounts from the same
layers. umoci gets the layer both ways an image gets one: as a plain tar it compresses itself, and as the
gzip blob write_layer wrote, under the digest, size and diff_id it returned (umoci checks all three).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
from pair import copy_tree, to_oci_form, write
from snapshot import assert_same, snapshot

from layerfs.core.changes import changes
from layerfs.core.whiteout import make_whiteout, mark_opaque
from layerfs.errors import LayerfsError
from layerfs.oci.layertar import LayerDigests, write_layer

pytestmark = pytest.mark.root  # the uppers have owners and devices: chown, mknod, trusted.* xattrs
OLD_NS = 1_500_000_000_123_456_789  # 2017, with nanoseconds: kept exactly by every step
NAMES_DIR_NS = 1_400_000_000_000_000_001
LATIN1 = os.fsdecode(b"caf\xe9")  # not UTF-8: a str with a surrogate escape, as os gives it


def export(upper: Path, lowers: list[Path], **options) -> tuple[bytes, LayerDigests]:
    out = io.BytesIO()
    digests = write_layer(out, str(upper), changes(str(upper), [str(p) for p in lowers]), **options)
    return out.getvalue(), digests


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def by_name(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in members(data)}


def file_data(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.extractfile(name).read()


def pax_xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {
        k[len(prefix) :]: v.encode("utf-8", "surrogateescape")
        for k, v in info.pax_headers.items()
        if k.startswith(prefix)
    }


@pytest.fixture
def image(layers) -> tuple[Path, Path]:
    """(upper, lower): one of every kind of change, the upper as kernel overlayfs would leave it."""
    lower, upper = layers.dir("lower"), layers.dir("upper")
    write(lower / "etc/passwd", "root\n")
    write(lower / "etc/hosts", "localhost\n", mode=0o644)
    write(lower / "etc/motd", "hi\n")
    write(lower / "var/cache/app/one", "1\n")
    write(lower / "var/cache/app/two", "2\n")
    write(lower / "var/cache/keep", "k\n")
    write(lower / "opt/old/a", "a\n")
    write(lower / "opt/old/sub/b", "b\n")
    write(lower / "data/old-name", "payload\n")
    write(lower / "usr/bin/tool", "#!/bin/sh\n", mode=0o755)
    os.setxattr(write(lower / "usr/share/doc/notes", "notes\n"), "user.note", b"old")
    write(lower / "srv/thing", "a file that becomes a directory\n")
    write(lower / "lib/dir-to-file/x", "x\n")

    for d in ("etc", "var/cache", "opt", "data", "usr/bin", "usr/share/doc", "srv", "lib"):
        (upper / d).mkdir(parents=True)
    p = write(upper / "etc/passwd", "root\nuser\n")  # modified
    os.utime(p, ns=(OLD_NS, OLD_NS))
    shutil.copy2(lower / "etc/hosts", upper / "etc/hosts")
    (upper / "etc/hosts").chmod(0o600)  # chmod only
    make_whiteout(str(upper / "etc/motd"))  # a lower file deleted
    p = write(upper / "etc/new-file", "new\n", mode=0o640)  # added
    os.chown(p, 1000, 100)
    make_whiteout(str(upper / "var/cache/app"))  # a whole lower directory deleted
    (upper / "opt/old").mkdir()  # a lower directory replaced
    mark_opaque(str(upper / "opt/old"))
    write(upper / "opt/old/new", "n\n")
    shutil.copy2(lower / "data/old-name", upper / "data/new-name")  # renamed
    make_whiteout(str(upper / "data/old-name"))
    shutil.copy2(lower / "usr/bin/tool", upper / "usr/bin/tool")
    (upper / "usr/bin/tool").chmod(0o4755)  # setuid
    shutil.copy2(lower / "usr/share/doc/notes", upper / "usr/share/doc/notes")  # copy2 copies xattrs
    os.setxattr(upper / "usr/share/doc/notes", "user.note", b"new")
    os.setxattr(upper / "usr/share/doc/notes", "user.added", b"\xff\x00binary")
    write(upper / "srv/thing/inside", "i\n")  # a file replaced by a directory
    write(upper / "lib/dir-to-file", "now a file\n")  # a directory replaced by a file
    write(upper / "links/first", "shared\n")  # a hard-link pair, both names new
    os.link(upper / "links/first", upper / "links/second")
    os.symlink("../etc/passwd", upper / "links/sym")
    os.symlink("/etc/shadow", upper / "links/escape")  # out of the layer: a symlink, never followed
    os.symlink("../../../../../../../../outside", upper / "links/up")
    (upper / "dev").mkdir()
    os.mkfifo(upper / "dev/fifo", 0o620)
    os.mknod(upper / "dev/chr", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(upper / "dev/blk", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(upper / "dev/sock", stat.S_IFSOCK | 0o755)  # tar cannot hold a socket: left out
    for name, mode in (("fifo", 0o620), ("chr", 0o666), ("blk", 0o660)):
        (upper / "dev" / name).chmod(mode)  # past the umask
    (upper / "names").mkdir(mode=0o755)
    (upper / "names").chmod(0o1777)  # sticky
    write(upper / "names" / LATIN1, "latin-1 name\n")
    os.utime(upper / "names", ns=(NAMES_DIR_NS, NAMES_DIR_NS))
    return upper, lower


EXPECTED_ENTRIES = [
    ("data", tarfile.DIRTYPE),
    ("data/.wh.old-name", tarfile.REGTYPE),
    ("data/new-name", tarfile.REGTYPE),
    ("dev", tarfile.DIRTYPE),
    ("dev/blk", tarfile.BLKTYPE),
    ("dev/chr", tarfile.CHRTYPE),
    ("dev/fifo", tarfile.FIFOTYPE),
    ("etc", tarfile.DIRTYPE),
    ("etc/.wh.motd", tarfile.REGTYPE),
    ("etc/hosts", tarfile.REGTYPE),
    ("etc/new-file", tarfile.REGTYPE),
    ("etc/passwd", tarfile.REGTYPE),
    ("lib", tarfile.DIRTYPE),
    ("lib/dir-to-file", tarfile.REGTYPE),
    ("links", tarfile.DIRTYPE),
    ("links/escape", tarfile.SYMTYPE),
    ("links/first", tarfile.REGTYPE),
    ("links/second", tarfile.LNKTYPE),
    ("links/sym", tarfile.SYMTYPE),
    ("links/up", tarfile.SYMTYPE),
    ("names", tarfile.DIRTYPE),
    ("names/" + LATIN1, tarfile.REGTYPE),
    ("opt", tarfile.DIRTYPE),
    ("opt/old", tarfile.DIRTYPE),
    ("opt/old/.wh..wh..opq", tarfile.REGTYPE),
    ("opt/old/new", tarfile.REGTYPE),
    ("srv", tarfile.DIRTYPE),
    ("srv/thing", tarfile.DIRTYPE),
    ("srv/thing/inside", tarfile.REGTYPE),
    ("usr", tarfile.DIRTYPE),
    ("usr/bin", tarfile.DIRTYPE),
    ("usr/bin/tool", tarfile.REGTYPE),
    ("usr/share", tarfile.DIRTYPE),
    ("usr/share/doc", tarfile.DIRTYPE),
    ("usr/share/doc/notes", tarfile.REGTYPE),
    ("var", tarfile.DIRTYPE),
    ("var/cache", tarfile.DIRTYPE),
    ("var/cache/.wh.app", tarfile.REGTYPE),
]


def test_every_kind_of_change_becomes_the_right_entries(image):
    upper, lower = image
    data, digests = export(upper, [lower])
    found = members(data)
    assert [(m.name, m.type) for m in found] == EXPECTED_ENTRIES  # whiteouts before their siblings
    m = {info.name: info for info in found}

    # Whiteouts and the opaque marker: empty regular files, nothing else about them.
    for name in ("data/.wh.old-name", "etc/.wh.motd", "var/cache/.wh.app", "opt/old/.wh..wh..opq"):
        assert (m[name].size, m[name].mode, m[name].uid, m[name].mtime, m[name].pax_headers) == (0, 0, 0, 0, {})
    assert file_data(data, "etc/passwd") == b"root\nuser\n"
    assert m["etc/passwd"].pax_headers["mtime"] == "1500000000.123456789"  # ns precision
    assert m["etc/hosts"].mode == 0o600 and file_data(data, "etc/hosts") == b"localhost\n"
    new = m["etc/new-file"]
    assert (new.mode, new.uid, new.gid, new.uname, new.gname) == (0o640, 1000, 100, "", "")
    assert file_data(data, "data/new-name") == b"payload\n"
    assert m["usr/bin/tool"].mode == 0o4755
    assert m["names"].mode == 0o1777 and m["names"].pax_headers["mtime"] == "1400000000.000000001"
    assert file_data(data, "names/" + LATIN1) == b"latin-1 name\n"
    assert b"names/caf\xe9" in data  # the name's own bytes, not a re-encoding
    assert pax_xattrs(m["usr/share/doc/notes"]) == {"user.added": b"\xff\x00binary", "user.note": b"new"}
    assert pax_xattrs(m["opt/old"]) == {}  # the opaque xattr is the upper's bookkeeping
    assert file_data(data, "links/first") == b"shared\n"
    assert (m["links/second"].linkname, m["links/second"].size) == ("links/first", 0)
    assert {n: m[n].linkname for n in ("links/sym", "links/escape", "links/up")} == {
        "links/sym": "../etc/passwd",
        "links/escape": "/etc/shadow",
        "links/up": "../../../../../../../../outside",
    }
    assert (m["dev/chr"].devmajor, m["dev/chr"].devminor, m["dev/chr"].mode) == (1, 3, 0o666)
    assert (m["dev/blk"].devmajor, m["dev/blk"].devminor, m["dev/blk"].mode) == (7, 200, 0o660)
    assert m["dev/fifo"].mode == 0o620
    assert file_data(data, "lib/dir-to-file") == b"now a file\n"
    for info in found:
        assert not info.name.startswith(("/", "./"))
        assert not {"atime", "ctime"} & info.pax_headers.keys()

    assert digests.diff_id == digests.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert digests.size == len(data)


def test_a_symlink_pointing_outside_is_stored_not_followed(layers, tmp_path):
    outside = write(tmp_path / "outside/secret", "SECRET-OUTSIDE-THE-LAYER\n").parent
    upper = layers.dir("upper")
    os.symlink(outside / "secret", upper / "to-file")
    os.symlink(outside, upper / "to-dir")
    data, _ = export(upper, [layers.dir("lower")])
    m = by_name(data)
    assert (m["to-file"].type, m["to-file"].linkname) == (tarfile.SYMTYPE, str(outside / "secret"))
    assert (m["to-dir"].type, m["to-dir"].linkname) == (tarfile.SYMTYPE, str(outside))
    assert b"SECRET" not in data and len(m) == 2


def test_private_xattrs_and_upper_markers_never_travel(layers):
    """Nor do security labels (this host's policy), as with umoci; file capabilities do."""
    lower, upper = layers.dir("lower"), layers.dir("upper")
    write(lower / "d/old", "o\n")
    write(lower / "gone", "g\n")
    p = write(upper / "f", "f\n")
    capability = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service, revision 2
    for attr, value in (
        ("user.keep", b"1"),
        ("user.fuseoverlayfs.origin", b"x"),
        ("user.overlay.origin", b"y"),
        ("trusted.overlay.origin", b"z"),
        ("security.label", b"host's"),
        ("security.capability", capability),
    ):
        os.setxattr(p, attr, value)
    (upper / "d").mkdir()
    mark_opaque(str(upper / "d"))
    make_whiteout(str(upper / "gone"))
    make_whiteout(str(upper / "never-existed"))  # hides nothing: no change, no entry
    data, _ = export(upper, [lower])
    assert [m.name for m in members(data)] == [".wh.gone", "d", "d/.wh..wh..opq", "f"]
    assert pax_xattrs(by_name(data)["f"]) == {"user.keep": b"1", "security.capability": capability}


def test_oci_form_markers_in_the_upper_give_the_same_layer(image, tmp_path):
    upper, lower = image
    oci = tmp_path / "upper-oci"
    copy_tree(upper, oci)
    assert to_oci_form(oci) == 4  # three whiteout devices and one opaque xattr rewritten

    def essence(data: bytes) -> list[tuple]:
        # Rewriting markers changes the mtimes of the directories holding them, nothing else.
        return [(m.name, m.type, m.mode, m.uid, m.gid, m.size, m.linkname, pax_xattrs(m)) for m in members(data)]

    assert essence(export(oci, [lower])[0]) == essence(export(upper, [lower])[0])


def test_an_opaque_upper_root_hides_every_lower_entry(layers):
    lower, upper = layers.dir("lower"), layers.dir("upper")
    write(lower / "old", "o\n")
    write(upper / "new", "n\n")
    mark_opaque(str(upper))
    data, _ = export(upper, [lower])
    assert [m.name for m in members(data)] == [".wh..wh..opq", "new"]


def test_the_same_upper_gives_the_same_bytes(image):
    upper, lower = image
    first, d1 = export(upper, [lower])
    second, d2 = export(upper, [lower])  # the first export read every file: atimes changed since
    assert first == second and d1 == d2

    packed, dz = export(upper, [lower], compress=True)
    assert gzip.decompress(packed) == first
    assert dz.diff_id == d1.diff_id
    assert dz.digest == "sha256:" + hashlib.sha256(packed).hexdigest() != d1.digest
    assert dz.size == len(packed) < len(first)
    assert packed[:3] == b"\x1f\x8b\x08" and packed[3] & 0x08 == 0  # gzip, no file name
    assert packed[4:8] == b"\0\0\0\0"  # no time
    assert export(upper, [lower], compress=True) == (packed, dz)


def test_mtime_clamp_caps_every_time(image):
    upper, lower = image
    clamp = 1_450_000_000 * 10**9
    data, _ = export(upper, [lower], mtime_clamp_ns=clamp)
    m = by_name(data)
    assert all(info.mtime <= 1_450_000_000 for info in m.values())
    assert m["etc/new-file"].mtime == 1_450_000_000 and "mtime" not in m["etc/new-file"].pax_headers
    assert m["names"].pax_headers["mtime"] == "1400000000.000000001"  # older than the clamp: kept


def test_progress_follows_the_file_data(layers):
    upper = layers.dir("upper")
    write(upper / "big", os.urandom(3 << 20 | 123))
    write(upper / "small", "s\n")
    os.link(upper / "big", upper / "big-again")  # stored once
    calls = []
    export(upper, [], progress=lambda done, total: calls.append((done, total)))
    total = (3 << 20 | 123) + 2
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) > 3 and all(a[0] <= b[0] for a, b in itertools.pairwise(calls))


def test_a_vanished_path_is_a_clear_error(image):
    upper, lower = image
    found = changes(str(upper), [str(lower)])
    (upper / "etc/new-file").unlink()
    with pytest.raises(LayerfsError, match="cannot export /etc/new-file: it is no longer in the upper"):
        write_layer(io.BytesIO(), str(upper), found)
    os.unlink(upper / "etc/motd")  # a whiteout gone
    with pytest.raises(LayerfsError, match="/etc/motd"):
        write_layer(io.BytesIO(), str(upper), [c for c in found if c.path != "/etc/new-file"])


def test_a_directory_swapped_for_a_symlink_is_not_followed(image, tmp_path):
    upper, lower = image
    found = changes(str(upper), [str(lower)])
    outside = write(tmp_path / "outside/passwd", "SECRET\n").parent
    (upper / "etc").rename(upper / "etc.moved")
    os.symlink(outside, upper / "etc")
    out = io.BytesIO()
    with pytest.raises(LayerfsError, match="cannot export /etc/hosts: it is no longer in the upper"):
        write_layer(out, str(upper), found)
    assert b"SECRET" not in out.getvalue()


# -- applied by a real OCI tool -----------------------------------------------------------------------

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def umoci(*args: str) -> None:
    assert shutil.which("umoci"), "umoci is missing: tools/setup installs it"
    result = subprocess.run(["umoci", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"umoci {' '.join(args)} failed:\n{result.stderr}"


class Layout:
    """An OCI image layout on disk, read and extended by hand where umoci has no command for it."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root, self.tag = root, tag

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs/sha256" / digest.split(":", 1)[1]

    def _json(self, digest: str) -> dict:
        return json.loads(self._blob(digest).read_text())

    def _put(self, data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._blob(digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def _index(self) -> tuple[dict, dict]:
        index = json.loads((self.root / "index.json").read_text())
        entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == self.tag)
        return index, entry

    def diff_ids(self) -> list[str]:
        _, entry = self._index()
        return self._json(self._json(entry["digest"])["config"]["digest"])["rootfs"]["diff_ids"]

    def append_blob(self, blob: bytes, digests: LayerDigests) -> None:
        """Add ``blob`` as the top layer under the digest, size and diff_id write_layer gave for it:
        what an image builder does with them. umoci checks blobs against their digests as it reads."""
        index, entry = self._index()
        manifest = self._json(entry["digest"])
        config = self._json(manifest["config"]["digest"])
        self._blob(digests.digest).write_bytes(blob)
        manifest["layers"].append({"mediaType": LAYER_GZIP, "digest": digests.digest, "size": digests.size})
        config["rootfs"]["diff_ids"].append(digests.diff_id)
        manifest["config"] = self._put(json.dumps(config).encode(), manifest["config"]["mediaType"])
        entry.update(self._put(json.dumps(manifest).encode(), entry["mediaType"]))
        (self.root / "index.json").write_text(json.dumps(index))


def assert_umoci_gives(merged: Path, work: Path, lowers: list[Path], upper: Path, found: list) -> None:
    """The OCI layer of ``found`` (the changes of ``upper``), applied by umoci over an image of ``lowers``
    (top first, each tarred as it is), unpacks to the tree ``merged`` shows; ``work`` holds the image."""
    layout = Layout(work / "oci", "t")
    ref = f"{layout.root}:{layout.tag}"
    umoci("init", "--layout", str(layout.root))
    umoci("new", "--image", ref)
    for i, lower in enumerate(reversed(lowers)):
        tar = work / f"lower{i}.tar"
        subprocess.run(
            [
                "tar",
                "-C",
                str(lower),
                "-c",
                "-f",
                str(tar),
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--format=posix",
                ".",
            ],
            check=True,
        )
        umoci("raw", "add-layer", "--image", ref, str(tar))
    layer = work / "layer.tar"
    with open(layer, "wb") as out:
        write_layer(out, str(upper), found)
    umoci("raw", "add-layer", "--image", ref, str(layer))
    umoci("unpack", "--image", ref, str(work / "bundle"))
    unpacked, expected = snapshot(work / "bundle/rootfs"), snapshot(merged)
    for snap in (expected, unpacked):  # the root's own metadata is not in a layer made of changes
        del snap.entries["."], snap.inodes["."]
    assert_same(expected, unpacked, what="the merged tree and umoci's rootfs", names=("overlay", "umoci"))


@pytest.mark.parametrize("route", ["raw add-layer", "gzip blob as written"])
def test_umoci_applies_the_layer_to_the_merged_tree(route, image, mounts, tmp_path):
    upper, lower = image
    lower_tar = tmp_path / "lower.tar"
    subprocess.run(
        [
            "tar",
            "-C",
            str(lower),
            "-c",
            "-f",
            str(lower_tar),
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--format=posix",
            ".",
        ],
        check=True,
    )
    layout = Layout(tmp_path / "oci", "t")
    image_ref = f"{layout.root}:{layout.tag}"
    umoci("init", "--layout", str(layout.root))
    umoci("new", "--image", image_ref)
    umoci("raw", "add-layer", "--image", image_ref, str(lower_tar))

    found = changes(str(upper), [str(lower)])
    if route == "raw add-layer":  # umoci takes an uncompressed tar, compresses it and records its diff_id
        layer_tar = tmp_path / "layer.tar"
        with open(layer_tar, "wb") as out:
            digests = write_layer(out, str(upper), found)
        umoci("raw", "add-layer", "--image", image_ref, str(layer_tar))
    else:
        out = io.BytesIO()
        digests = write_layer(out, str(upper), found, compress=True)
        layout.append_blob(out.getvalue(), digests)
    assert layout.diff_ids()[-1] == digests.diff_id
    umoci("unpack", "--image", image_ref, str(tmp_path / "bundle"))

    merged = mounts.overlay(tmp_path / "merged", [upper, lower])  # read-only: the upper as the top lower
    expected = snapshot(merged)
    mounts.unmount(merged)
    got = snapshot(tmp_path / "bundle/rootfs")
    for snap in (expected, got):  # the root's own metadata is not in a layer made of changes
        del snap.entries["."], snap.inodes["."]
    sockets = [p for p, e in expected.entries.items() if e.kind == "sock"]
    assert sockets == ["dev/sock"]
    for p in sockets:  # tar cannot carry a socket
        del expected.entries[p], expected.inodes[p]
    assert "names/" + LATIN1 in got.entries
    assert "opt/old/a" not in got.entries and "var/cache/app" not in got.entries
    assert got.link_groups() == {frozenset({"links/first", "links/second"})}
    assert_same(
        expected, got, what="kernel overlayfs's merged view and umoci's unpacked rootfs", names=("overlay", "umoci")
    )
