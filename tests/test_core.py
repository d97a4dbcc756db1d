"""The core used directly, without FUSE: lookup rules, both whiteout forms, what lands in the upper layer."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from layerfs.core.union import Union


def whiteout(path):
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def make(root, files: dict[str, str | None]):
    """files: relative path -> content; a path ending in / is a directory."""
    for rel, content in files.items():
        p = os.path.join(root, rel)
        if rel.endswith("/"):
            os.makedirs(p, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(content or "")


@pytest.fixture
def stack(tmp_path):
    """Three lowers (top first), an upper and a work dir."""
    dirs = {n: tmp_path / n for n in ("top", "mid", "bottom", "upper", "work")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def union(stack, upper=True, **options):
    lowers = [str(stack[n]) for n in ("top", "mid", "bottom")]
    if upper:
        return Union(lowers, str(stack["upper"]), str(stack["work"]), **options)
    return Union(lowers)


@pytest.mark.parametrize("form", ["overlay", "oci"])
def test_whiteout_in_a_middle_layer_hides_only_what_is_below(stack, form):
    make(stack["bottom"], {"gone": "x", "dir/a": "a", "kept": "k"})
    make(stack["top"], {"gone": "back on top"})
    if form == "overlay":
        whiteout(stack["mid"] / "gone")
        whiteout(stack["mid"] / "kept2")
    else:
        make(stack["mid"], {".wh.gone": "", ".wh.kept2": ""})
    u = union(stack)
    assert sorted(u.listdir("/")) == ["dir", "gone", "kept"]
    gone = u.lookup("/gone")
    assert gone.layer.root == str(stack["top"])


@pytest.mark.parametrize("form", [pytest.param("xattr-trusted", marks=pytest.mark.root), "xattr-user", "oci-marker"])
def test_opaque_directory_hides_lower_content(stack, form):
    make(stack["bottom"], {"d/old": "", "d/sub/deep": ""})
    make(stack["mid"], {"d/new": ""})
    if form == "oci-marker":
        make(stack["mid"], {"d/.wh..wh..opq": ""})
    else:
        os.setxattr(stack["mid"] / "d", f"{form.split('-')[1]}.overlay.opaque", b"y")
    u = union(stack)
    assert sorted(u.listdir("/d")) == ["new"]
    assert u.lookup("/d/old") is None
    with pytest.raises(FileNotFoundError):
        u.lookup("/d/sub/deep")


def test_non_directory_stops_the_merge_of_a_directory(stack):
    make(stack["bottom"], {"x/below": ""})
    make(stack["mid"], {"x": "a file"})
    make(stack["top"], {"x/above": ""})
    u = union(stack)
    assert sorted(u.listdir("/x")) == ["above"]
    assert not u.lookup("/x").merged


def test_markers_never_show_in_listings(stack):
    make(stack["bottom"], {"d/a": ""})
    make(stack["mid"], {"d/.wh..wh..opq": "", "d/.wh.zzz": "", "d/b": ""})
    whiteout(stack["top"] / ".wh..opq")  # fuse-overlayfs's extra marker
    u = union(stack)
    assert sorted(u.listdir("/")) == ["d"]
    assert sorted(u.listdir("/d")) == ["b"]


@pytest.mark.root  # makes files owned by root, or trusted.overlay.* xattrs (opaque, redirect)
def test_unlink_leaves_a_whiteout_only_where_a_lower_layer_has_the_name(stack):
    make(stack["bottom"], {"lower": ""})
    u = union(stack)
    os.close(u.create("/fresh", os.O_WRONLY, 0o644, 0, 0))
    u.unlink("/fresh")
    u.unlink("/lower")
    assert sorted(os.listdir(stack["upper"])) == ["lower"]
    assert stat.S_ISCHR(os.lstat(stack["upper"] / "lower").st_mode)
    assert u.listdir("/") == {}


@pytest.mark.root
def test_mkdir_where_a_lower_dir_was_deleted_is_opaque(stack):
    make(stack["bottom"], {"d/old": ""})
    u = union(stack)
    u.unlink("/d/old")
    u.rmdir("/d")
    u.mkdir("/d", 0o755, 0, 0)
    assert os.getxattr(stack["upper"] / "d", "trusted.overlay.opaque") == b"y"
    assert u.listdir("/d") == {}
    u.mkdir("/e", 0o755, 0, 0)
    with pytest.raises(OSError) as e:
        os.getxattr(stack["upper"] / "e", "trusted.overlay.opaque")
    assert e.value.errno == errno.ENODATA


@pytest.mark.root
def test_copy_up_keeps_metadata_and_the_parents_timestamps(stack):
    make(stack["bottom"], {"etc/conf": "v1"})
    conf, etc = stack["bottom"] / "etc/conf", stack["bottom"] / "etc"
    os.chown(conf, 1234, 5678)
    os.chmod(conf, 0o4751)
    os.setxattr(conf, "user.tag", b"t")
    os.utime(conf, ns=(1_000_000_123, 2_000_000_456))
    os.utime(etc, ns=(3_000_000_000, 4_000_000_789))
    u = union(stack)
    before = u.getattr("/etc/conf")
    os.close(u.open("/etc/conf", os.O_RDWR))
    up = os.lstat(stack["upper"] / "etc/conf")
    assert (up.st_uid, up.st_gid, stat.S_IMODE(up.st_mode)) == (1234, 5678, 0o4751)
    assert (up.st_atime_ns, up.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert os.getxattr(stack["upper"] / "etc/conf", "user.tag") == b"t"
    assert os.lstat(stack["upper"] / "etc").st_mtime_ns == 4_000_000_789
    assert u.getattr("/etc/conf").ino == before.ino
    assert (stack["bottom"] / "etc/conf").read_text() == "v1"


def test_open_with_truncate_copies_no_data(stack):
    make(stack["bottom"], {"big": "x" * 100_000})
    u = union(stack)
    fd = u.open("/big", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.lstat(stack["upper"] / "big").st_size == 0


@pytest.mark.root
def test_directory_rename_by_redirect_leaves_the_content_where_it_is(stack):
    make(stack["bottom"], {"src/a": "a", "src/sub/b": "b", "src/gone": ""})
    make(stack["top"], {"src/sub/c": "c"})
    u = union(stack)
    u.unlink("/src/gone")
    u.rename("/src", "/dst")
    assert u.lookup("/src") is None
    assert sorted(u.listdir("/dst")) == ["a", "sub"]
    assert sorted(u.listdir("/dst/sub")) == ["b", "c"]
    names = sorted(
        os.path.relpath(os.path.join(d, n), stack["upper"])
        for d, dirs, files in os.walk(stack["upper"])
        for n in dirs + files
    )
    assert names == ["dst", "dst/gone", "src"]  # the whiteout inside stays: it hides the lower "gone"
    assert os.getxattr(stack["upper"] / "dst", "trusted.overlay.redirect") == b"src"


def test_directory_rename_without_redirects_moves_the_merged_tree_and_cleans_markers(stack):
    make(stack["bottom"], {"src/a": "a", "src/sub/b": "b", "src/gone": ""})
    make(stack["top"], {"src/sub/c": "c"})
    u = union(stack, redirect_dir=False)
    u.unlink("/src/gone")
    u.rename("/src", "/dst")
    assert u.lookup("/src") is None
    assert sorted(u.listdir("/dst")) == ["a", "sub"]
    assert sorted(u.listdir("/dst/sub")) == ["b", "c"]
    names = sorted(
        os.path.relpath(os.path.join(d, n), stack["upper"])
        for d, dirs, files in os.walk(stack["upper"])
        for n in dirs + files
    )
    assert names == ["dst", "dst/a", "dst/sub", "dst/sub/b", "dst/sub/c", "src"]
    assert stat.S_ISCHR(os.lstat(stack["upper"] / "src").st_mode)


def test_directory_rename_moves_symlinks_to_directories_as_symlinks(stack):
    make(stack["bottom"], {"src/sub/f": "f", "src/gone": ""})
    os.symlink("sub", stack["bottom"] / "src" / "link-to-dir")
    u = union(stack, redirect_dir=False)
    u.unlink("/src/gone")  # a whiteout inside, so the moved tree has markers to clean
    u.rename("/src", "/dst")
    assert sorted(u.listdir("/dst")) == ["link-to-dir", "sub"]
    assert os.readlink(stack["upper"] / "dst" / "link-to-dir") == "sub"


@pytest.mark.root
def test_rename_dir_over_a_merged_empty_dir_hides_its_lower_parts(stack):
    make(stack["bottom"], {"target/x": "", "src/y": ""})
    u = union(stack)
    u.unlink("/target/x")
    u.rename("/src", "/target")
    assert sorted(u.listdir("/target")) == ["y"]  # the redirect sends the lookups to /src alone
    assert os.getxattr(stack["upper"] / "target", "trusted.overlay.redirect") == b"src"


@pytest.mark.root
def test_rename_dir_over_a_merged_empty_dir_without_redirects_is_opaque(stack):
    make(stack["bottom"], {"target/x": "", "src/y": ""})
    u = union(stack, redirect_dir=False)
    u.unlink("/target/x")
    u.rename("/src", "/target")
    assert sorted(u.listdir("/target")) == ["y"]
    assert os.getxattr(stack["upper"] / "target", "trusted.overlay.opaque") == b"y"


def test_rename_onto_a_non_empty_dir_is_refused(stack):
    make(stack["bottom"], {"a/x": "", "b/y": ""})
    u = union(stack)
    with pytest.raises(OSError) as e:
        u.rename("/a", "/b")
    assert e.value.errno == errno.ENOTEMPTY


@pytest.mark.root
def test_create_over_an_oci_whiteout_in_upper_removes_it(stack):
    make(stack["bottom"], {"f": "old"})
    make(stack["upper"], {".wh.f": ""})
    u = union(stack)
    assert u.lookup("/f") is None
    os.close(u.create("/f", os.O_WRONLY, 0o600, 0, 0))
    assert sorted(os.listdir(stack["upper"])) == ["f"]
    assert os.lstat(stack["upper"] / "f").st_size == 0


def test_without_upper_everything_that_writes_is_erofs(stack):
    make(stack["bottom"], {"f": ""})
    u = union(stack, upper=False)
    for call in (
        lambda: u.unlink("/f"),
        lambda: u.mkdir("/d", 0o755, 0, 0),
        lambda: u.open("/f", os.O_WRONLY),
        lambda: u.change("/f", mode=0o600),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EROFS


def test_work_dir_leftovers_are_removed_at_start(stack):
    os.makedirs(stack["work"] / "work" / "#7" / "half")
    union(stack)
    assert os.listdir(stack["work"] / "work") == []


def test_private_xattrs_are_invisible(stack):
    make(stack["bottom"], {"d/": None})
    os.setxattr(stack["bottom"] / "d", "user.overlay.opaque", b"n")
    os.setxattr(stack["bottom"] / "d", "user.visible", b"v")
    u = union(stack)
    assert u.listxattr("/d") == ["user.visible"]
    with pytest.raises(OSError) as e:
        u.setxattr("/d", "trusted.overlay.opaque", b"y", 0)
    assert e.value.errno == errno.EOPNOTSUPP


def test_a_symlinked_parent_in_a_lower_layer_is_not_followed(stack, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    make(stack["top"], {"etc/": None})
    os.symlink(str(outside), stack["mid"] / "etc")
    u = union(stack)
    # /etc is a directory on top; the symlink below is hidden and never traversed.
    assert u.lookup("/etc/secret") is None
    assert u.listdir("/etc") == {}
