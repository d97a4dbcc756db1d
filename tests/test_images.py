"""Images in the store: OCI image layouts made at test time by umoci (from a busybox rootfs, no network)
are imported, and the image mounted from the store's layers equals what umoci unpacks for the same image.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX, umoci
from conftest import LAYERFS, layerfs
from snapshot import assert_same, snapshot

pytestmark = pytest.mark.root  # umoci unpacks as root; the store's layers have owners
HUB = "docker.io/library/"  # where a short name is, as docker reads it


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path)


def make_layout(tmp_path: Path) -> Path:
    """An OCI image layout with ``base`` (a busybox rootfs) and ``v2`` (a second layer over it that adds,
    deletes, replaces a directory and changes a file), both written by umoci."""
    oci = tmp_path / "oci"
    umoci("init", "--layout", oci)
    umoci("new", "--image", f"{oci}:base")
    bundle = tmp_path / "bundle"
    umoci("unpack", "--image", f"{oci}:base", bundle)
    root = bundle / "rootfs"
    for d in ("bin", "etc/app", "var/cache/app", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    (root / "etc/app/conf").write_text("color=green\n")
    (root / "var/cache/app/one").write_text("1\n")
    (root / "var/cache/app/two").write_text("2\n")
    (root / "etc/motd").write_text("hello\n")
    umoci("repack", "--image", f"{oci}:base", bundle)
    bundle = tmp_path / "bundle2"  # the second layer is made over base as it is now
    umoci("unpack", "--image", f"{oci}:base", bundle)
    root = bundle / "rootfs"
    (root / "etc/app/conf").write_text("color=red\n")
    (root / "etc/motd").unlink()
    shutil.rmtree(root / "var/cache/app")
    (root / "var/cache/app").mkdir()
    (root / "var/cache/app/fresh").write_text("3\n")
    (root / "etc/new").write_text("new\n")
    umoci("repack", "--image", f"{oci}:v2", bundle)
    return oci


def test_an_imported_image_mounts_as_umoci_unpacks_it(layout, mounts, tmp_path):
    store = tmp_path / "store"
    result = layerfs("import", "--root", store, f"oci:{layout}:v2", "demo:v2")
    assert result.stdout.splitlines()[0] == f"{HUB}demo:v2"  # names as docker reads them
    layerfs("import", "--root", store, f"oci:{layout}:base", "demo:base")
    images = json.loads((store / "images.json").read_text())
    assert images[f"{HUB}demo:v2"]["layers"][0] == images[f"{HUB}demo:base"]["layers"][0]  # shared, stored once
    assert len(os.listdir(store / "layers")) == 2
    lowers = layerfs("images", "--root", store, "--lowerdir", "demo:v2").stdout.strip().split(":")

    unpacked = tmp_path / "unpacked"
    umoci("unpack", "--image", f"{layout}:v2", unpacked)
    mounted = mounts.layerfs(tmp_path / "mnt", [Path(p) for p in lowers])
    assert_same(
        snapshot(unpacked / "rootfs"),
        snapshot(mounted),
        what="umoci's rootfs vs the store's layers",
        names=("umoci", "layerfs"),
    )
    assert (mounted / "etc/app/conf").read_text() == "color=red\n" and not (mounted / "etc/motd").exists()
    assert sorted(os.listdir(mounted / "var/cache/app")) == ["fresh"]
    assert (
        subprocess.run(["chroot", mounted, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True).stdout == "ok\n"
    )


def test_an_image_umoci_insert_made_imports(mounts, tmp_path):
    """umoci insert writes its layer without the last block's padding and without the end-of-archive
    block, which Go's archive/tar (docker, podman, umoci itself) reads as a whole tar: so does import."""
    oci = tmp_path / "oci"
    umoci("init", "--layout", oci)
    umoci("new", "--image", f"{oci}:base")
    (tmp_path / "add").mkdir()
    shutil.copy2(BUSYBOX, tmp_path / "add/busybox")
    umoci("insert", "--image", f"{oci}:base", tmp_path / "add", "/bin")
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    with gzip.open(oci / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]) as layer:
        tar = layer.read()
    assert len(tar) % 512 != 0, "umoci now ends its layer with the end block: this test no longer tests that"

    store = tmp_path / "store"
    layerfs("import", "--root", store, f"oci:{oci}:base", "inserted")
    lowers = layerfs("images", "--root", store, "--lowerdir", "inserted").stdout.strip().split(":")
    mounted = mounts.layerfs(tmp_path / "mnt", [Path(p) for p in lowers])
    assert (mounted / "bin/busybox").read_bytes() == Path(BUSYBOX).read_bytes()
    result = subprocess.run(["chroot", mounted, "/bin/busybox", "echo", "ok"], capture_output=True, text=True)
    assert result.stdout == "ok\n", result.stderr


def test_a_blob_that_does_not_match_its_digest_is_refused(layout, tmp_path):
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = next(
        m["digest"] for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "v2"
    )
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    blob = layout / "blobs/sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    store = tmp_path / "store"
    result = layerfs("import", "--root", store, f"oci:{layout}:v2", "broken", check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert not (store / "images.json").exists() or f"{HUB}broken:latest" not in json.loads(
        (store / "images.json").read_text()
    )
    assert os.listdir(store / "blobs/sha256") == []
    assert os.listdir(store / "tmp") == []


def test_errors_name_the_problem(tmp_path):
    for source, message in (
        (f"oci:{tmp_path}", "not an OCI image layout"),
        (str(tmp_path), "not an OCI image layout"),
        (str(tmp_path / "nothing"), "no such file or directory"),
    ):
        result = layerfs("import", "--root", tmp_path / "store", source, check=False)
        assert result.returncode != 0 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_archives_from_skopeo_import_to_the_same_layers(layout, mounts, tmp_path):
    store = tmp_path / "store"
    docker, oci = tmp_path / "image-docker.tar", tmp_path / "image-oci.tar"
    for destination in (f"docker-archive:{docker}:demo:v2", f"oci-archive:{oci}:v2"):
        subprocess.run(
            ["skopeo", "copy", f"oci:{layout}:v2", destination], check=True, capture_output=True, timeout=120
        )
    layerfs("import", "--root", store, f"oci:{layout}:v2", "from-layout")
    layerfs("import", "--root", store, f"docker-archive:{docker}", "from-docker")
    layerfs("import", "--root", store, f"oci-archive:{oci}:v2", "from-oci-archive")
    images = json.loads((store / "images.json").read_text())
    assert (
        images[f"{HUB}from-docker:latest"]["layers"]
        == images[f"{HUB}from-oci-archive:latest"]["layers"]
        == images[f"{HUB}from-layout:latest"]["layers"]
    )
    assert len(os.listdir(store / "layers")) == 2 and os.listdir(store / "tmp") == []
    lowers = layerfs("images", "--root", store, "--lowerdir", "from-docker").stdout.strip().split(":")
    mounted = mounts.layerfs(tmp_path / "mnt", [Path(p) for p in lowers])
    assert (mounted / "etc/app/conf").read_text() == "color=red\n"


def test_a_container_by_name_round_trip(layout, tmp_path):
    root = tmp_path / "store"
    layerfs("import", "--root", root, f"oci:{layout}:v2", "demo:v2")
    assert layerfs("create", "--root", root, "--name", "c1", "demo:v2").stdout.strip() == "c1"
    assert "exists already" in layerfs("create", "--root", root, "--name", "c1", "demo:v2", check=False).stderr
    merged = root / "containers/c1/merged"
    layerfs("mount", "--root", root, "c1")
    try:
        (merged / "etc/app/conf").write_text("color=blue\n")
        (merged / "srv").mkdir(exist_ok=True)
        (merged / "srv/data").write_text("kept\n")
        assert layerfs("diff", "--root", root, "c1", "/etc").stdout.splitlines() == [
            "C /etc",
            "C /etc/app",
            "C /etc/app/conf",
        ]
        assert "is mounted" in layerfs("rm", "--root", root, "c1", check=False).stderr
    finally:
        layerfs("umount", merged)
    assert "image docker.io/library/demo:changed" in layerfs("commit", "--root", root, "c1", "demo:changed").stdout
    images = json.loads((root / "images.json").read_text())
    assert images[f"{HUB}demo:changed"]["layers"][:-1] == images[f"{HUB}demo:v2"]["layers"]
    assert images[f"{HUB}demo:changed"]["config"]["rootfs"]["diff_ids"] == images[f"{HUB}demo:changed"]["layers"]

    layerfs("create", "--root", root, "--name", "c2", "demo:changed")
    elsewhere = tmp_path / "c2-rootfs"
    elsewhere.mkdir()
    layerfs("mount", "--root", root, "c2", elsewhere)
    try:
        assert (elsewhere / "etc/app/conf").read_text() == "color=blue\n"
        assert (elsewhere / "srv/data").read_text() == "kept\n"
        assert layerfs("diff", "--root", root, "c2").stdout == ""
    finally:
        layerfs("umount", elsewhere)
    layerfs("rm", "--root", root, "c1")
    assert sorted(os.listdir(root / "containers")) == ["c2"] and os.listdir(root / "tmp") == []


def test_rmi_layers_gc_and_inspect(layout, tmp_path):
    root = tmp_path / "store"
    layerfs("import", "--root", root, f"oci:{layout}:base", "demo:base")
    layerfs("import", "--root", root, f"oci:{layout}:v2", "demo:v2")
    layerfs("create", "--root", root, "--name", "c", "demo:base")
    assert "used by container c" in layerfs("rmi", "--root", root, "demo:base", check=False).stderr
    inspected = json.loads(layerfs("inspect", "--root", root, "c").stdout)
    assert inspected["image"] == f"{HUB}demo:base" and len(inspected["lowers"]) == 1
    layerfs("rmi", "--root", root, "demo:v2")
    top = json.loads(layerfs("inspect", "--root", root, "demo:base").stdout)["layers"][0]
    listed = dict(line.split("  ", 1) for line in layerfs("layers", "--root", root).stdout.splitlines())
    assert listed[top] == f"{HUB}demo:base, container c" and list(listed.values()).count("(unused)") == 1
    removed = layerfs("gc", "--root", root).stdout.splitlines()
    layers = [line.split()[1] for line in removed if not line.startswith("removed blob ")]
    assert len(layers) == 1 and layers[0] != top and os.listdir(root / "layers") == [top.split(":")[1]]
    assert len(removed) == 1 + 3  # and v2's manifest, config and top layer's blob
    layerfs("rm", "--root", root, "c")
    layerfs("rmi", "--root", root, "demo:base")
    layerfs("gc", "--root", root)
    assert os.listdir(root / "layers") == [] and json.loads((root / "images.json").read_text()) == {}
    assert os.listdir(root / "blobs/sha256") == []


def test_a_committed_image_saved_as_a_layout_unpacks_with_umoci_to_the_changed_tree(layout, mounts, tmp_path):
    root = tmp_path / "store"
    layerfs("import", "--root", root, f"oci:{layout}:v2", "demo:v2")
    layerfs("create", "--root", root, "--name", "c", "demo:v2")
    merged = root / "containers/c/merged"
    layerfs("mount", "--root", root, "c")
    try:
        (merged / "etc/app/conf").write_text("color=blue\n")
        (merged / "bin/sh").unlink()
        os.symlink("/bin/busybox", merged / "bin/sh")
        shutil.rmtree(merged / "var/cache/app")
        (merged / "srv").mkdir(exist_ok=True)
        (merged / "srv/data").write_text("kept\n")
    finally:
        layerfs("umount", merged)
    layerfs("commit", "--root", root, "c", "demo:changed")
    saved = tmp_path / "saved"
    layerfs("save", "--root", root, "demo:changed", f"oci:{saved}:changed")
    bundle = tmp_path / "saved-bundle"
    umoci("unpack", "--image", f"{saved}:changed", bundle)
    lowers = layerfs("images", "--root", root, "--lowerdir", "demo:changed").stdout.strip().split(":")
    mounted = mounts.layerfs(tmp_path / "mnt", [Path(p) for p in lowers])
    # The root directory's own times are not carried by the layers (no "./" entry, as docker's layers).
    unpacked, ours = snapshot(bundle / "rootfs"), snapshot(mounted)
    for snap in (unpacked, ours):
        del snap.entries["."], snap.inodes["."]
    assert_same(unpacked, ours, what="umoci's unpack of the saved image vs the store", names=("umoci", "layerfs"))
    assert (bundle / "rootfs/etc/app/conf").read_text() == "color=blue\n"
    assert not (bundle / "rootfs/var/cache/app").exists() and (bundle / "rootfs/srv/data").exists()


def test_a_rootfs_tar_imports_as_a_one_layer_image(layout, mounts, tmp_path):
    rootfs = tmp_path / "bundle2/rootfs"  # the fixture's last bundle: v2's tree
    tar_file = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", rootfs, "--xattrs", "--numeric-owner", "-cf", tar_file, "."], check=True)
    root = tmp_path / "store"
    layerfs("import", "--root", root, f"rootfs:{tar_file}", "flat:1")
    image = json.loads(layerfs("inspect", "--root", root, "flat:1").stdout)
    assert len(image["layers"]) == 1 and image["config"]["rootfs"]["diff_ids"] == image["layers"]
    lowers = layerfs("images", "--root", root, "--lowerdir", "flat:1").stdout.strip().split(":")
    mounted = mounts.layerfs(tmp_path / "mnt", [Path(p) for p in lowers])
    assert_same(snapshot(rootfs), snapshot(mounted), what="the tarred rootfs vs its image", names=("rootfs", "layerfs"))
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        tar.addfile(tarfile.TarInfo("ok"))
        escape = tarfile.TarInfo("../escape")
        tar.addfile(escape)
    result = layerfs("import", "--root", root, f"rootfs:{hostile}", "bad", check=False)
    assert result.returncode != 0 and "escape" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert f"{HUB}bad:latest" not in json.loads((root / "images.json").read_text())
    assert os.listdir(root / "tmp") == [] and len(os.listdir(root / "layers")) == 1
    assert not (tmp_path / "escape").exists() and not (root / "escape").exists()


def test_an_image_archive_that_reaches_out_of_its_directory_is_refused(tmp_path):
    """An archive is unpacked whole before it is read: tarfile's data filter keeps it inside."""
    root = tmp_path / "store"
    link = tarfile.TarInfo("blobs/sha256")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
    for name, members in (("dotdot", [tarfile.TarInfo("blobs/../../../out")]), ("absolute", [link])):
        archive = tmp_path / f"{name}.tar"
        with tarfile.open(archive, "w") as tar:
            for member in [tarfile.TarInfo("oci-layout"), *members]:
                tar.addfile(member)
        result = layerfs("import", "--root", root, str(archive), name, check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"layerfs: {archive}: not a readable image archive ("), result.stderr
        assert f"'{members[0].name}'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and os.listdir(root / "tmp") == []


def test_a_rootfs_tar_is_kept_as_its_framing_and_saved_byte_for_byte(layout, tmp_path):
    """An imported root filesystem tar is not written a second time as its blob: the store keeps its headers
    (a split), and save gives back the very same bytes from the unpacked layer. A tar whose data the layer
    does not hold whole (an entry replaced by a later one) is kept as it came; a layer changed on disk is
    an error at save, never a wrong blob."""
    rootfs = tmp_path / "bundle2/rootfs"
    (rootfs / ("long-" * 30)).write_bytes(os.urandom(70_000))  # (a PAX name, data not on a block boundary)
    plain, replaced = tmp_path / "rootfs.tar", tmp_path / "replaced.tar"
    subprocess.run(["tar", "-C", rootfs, "--xattrs", "--numeric-owner", "-cf", plain, "."], check=True)
    shutil.copy(plain, replaced)
    subprocess.run(["tar", "-C", rootfs, "--numeric-owner", "-rf", replaced, "./bin/busybox"], check=True)
    root = tmp_path / "store"
    for tar_file, name in ((plain, "plain:1"), (replaced, "replaced:1")):
        layerfs("import", "--root", root, f"rootfs:{tar_file}", name)
    digest = {
        name: json.loads(layerfs("inspect", "--root", root, name).stdout)["layers"][0]
        for name in ("plain:1", "replaced:1")
    }
    split, kept = root / "blobs/split", root / "blobs/sha256"
    assert os.listdir(split) == [digest["plain:1"].removeprefix("sha256:")]
    assert not (kept / digest["plain:1"].removeprefix("sha256:")).exists()
    assert (kept / digest["replaced:1"].removeprefix("sha256:")).read_bytes() == replaced.read_bytes()
    assert os.path.getsize(split / os.listdir(split)[0]) < plain.stat().st_size // 10
    for tar_file, name in ((plain, "plain:1"), (replaced, "replaced:1")):
        saved = tmp_path / f"saved-{name}"
        layerfs("save", "--root", root, "--format", "oci", name, saved)
        assert (saved / "blobs/sha256" / digest[name].removeprefix("sha256:")).read_bytes() == tar_file.read_bytes()

    layer = root / "layers" / digest["plain:1"].removeprefix("sha256:")
    (layer / "bin/busybox").chmod(0o755)
    with open(layer / "bin/busybox", "r+b") as f:
        f.write(b"X")
    result = layerfs("save", "--root", root, "--format", "oci", "plain:1", tmp_path / "bad", check=False)
    assert result.returncode == 1 and "its layer changed on disk" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_concurrent_imports_leave_a_consistent_store(layout, tmp_path):
    root = tmp_path / "store"
    runs = [
        subprocess.Popen(
            LAYERFS + ["import", "--root", str(root), f"oci:{layout}:{tag}", f"img{n}:{tag}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(3)
        for tag in ("base", "v2")
    ]
    assert [run.wait(timeout=120) for run in runs] == [0] * len(runs), [run.stderr.read() for run in runs]
    images = json.loads((root / "images.json").read_text())
    assert len(images) == 6 and len(os.listdir(root / "layers")) == 2 and os.listdir(root / "tmp") == []
