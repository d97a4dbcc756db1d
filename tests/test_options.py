"""Option parsing: fuse-overlayfs's language, and one clear error for each mistake (no mount needed)."""

from __future__ import annotations

import os

import pytest

from layerfs.errors import UsageError
from layerfs.fs.options import for_dirs, parse, split_escaped


@pytest.fixture
def dirs(tmp_path):
    for n in ("l1", "l2", "up", "wk", "mnt"):
        (tmp_path / n).mkdir()
    return tmp_path


def test_full_form_with_relative_lowers_resolved_from_cwd(dirs, monkeypatch):
    monkeypatch.chdir(dirs)
    c = parse(["lowerdir=l1:l2,upperdir=up,workdir=wk"], "mnt")
    assert c.lowers == [str(dirs / "l1"), str(dirs / "l2")]
    assert (c.upper, c.work, c.mountpoint) == (str(dirs / "up"), str(dirs / "wk"), str(dirs / "mnt"))
    assert not c.readonly and c.sync and c.warnings == []


def test_options_may_come_in_several_o_arguments(dirs):
    c = parse([f"lowerdir={dirs}/l1", f"upperdir={dirs}/up,workdir={dirs}/wk,volatile"], str(dirs / "mnt"))
    assert c.upper == str(dirs / "up") and not c.sync


def test_escaped_colon_and_comma_in_paths(dirs):
    odd = dirs / "a:b,c"
    odd.mkdir()
    c = parse([f"lowerdir={dirs}/a\\:b\\,c:{dirs}/l1"], str(dirs / "mnt"))
    assert c.lowers == [str(odd), str(dirs / "l1")]
    assert split_escaped("x\\:y:z", ":") == ["x:y", "z"]


def test_for_dirs_writes_what_parse_reads_back(dirs):
    odd = [dirs / "a:b,c", dirs / "back\\slash", dirs / "up,per", dirs / "wo:rk"]
    for d in odd:
        d.mkdir()
    command = ["/bin/sh", "-c", "echo a:b,c\\d", ""]
    text = for_dirs(
        [str(odd[0]), str(odd[1])], str(odd[2]), str(odd[3]), x_layerfs_owner=42, x_layerfs_exit_command=command
    )
    c = parse([text], str(dirs / "mnt"))
    assert (c.lowers, c.upper, c.work, c.owner) == ([str(odd[0]), str(odd[1])], str(odd[2]), str(odd[3]), 42)
    assert c.exit_command == command
    assert c.warnings == []


def test_without_upper_the_mount_is_read_only(dirs):
    c = parse([f"lowerdir={dirs}/l1"], str(dirs / "mnt"))
    assert c.readonly and c.upper is None


def test_unknown_options_warn_and_known_tuning_options_are_quiet(dirs):
    c = parse([f"lowerdir={dirs}/l1,frobnicate,speed=11,noatime,fsync=0"], str(dirs / "mnt"))
    assert c.warnings == ["unknown option speed=11 ignored", "unknown option frobnicate ignored"]
    assert not c.sync


@pytest.mark.parametrize(
    "opts, mnt, message",
    [
        ("upperdir={d}/up,workdir={d}/wk", "mnt", "no lowerdir given"),
        ("lowerdir={d}/nope", "mnt", "lowerdir {d}/nope: no such directory"),
        ("lowerdir={d}/l1::{d}/l2", "mnt", "lowerdir: empty path in the list"),
        ("lowerdir={d}/l1,upperdir={d}/up", "mnt", "upperdir needs a workdir"),
        ("lowerdir={d}/l1,upperdir={d}/up,workdir={d}/up/w", "mnt", "must be separate directories"),
        ("lowerdir={d}/l1", "nomnt", "mount point {d}/nomnt: no such directory"),
        ("lowerdir={d}/l1,log={d}/nodir/log", "mnt", "log {d}/nodir/log: not writable"),
    ],
)
def test_mistakes_are_one_clear_line(dirs, opts, mnt, message):
    if "up/w" in opts:
        (dirs / "up" / "w").mkdir()
    with pytest.raises(UsageError) as e:
        parse([opts.format(d=dirs)], str(dirs / mnt))
    text = str(e.value)
    assert message.format(d=dirs) in text and "\n" not in text


def test_lowerdir_that_is_a_file(dirs):
    (dirs / "f").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        parse([f"lowerdir={dirs}/f"], str(dirs / "mnt"))


def test_workdir_on_another_filesystem(dirs):
    shm = "/dev/shm"
    if os.stat(shm).st_dev == os.stat(dirs).st_dev:
        pytest.skip("/dev/shm is not a separate filesystem here")
    with pytest.raises(UsageError, match="not on the same filesystem"):
        parse([f"lowerdir={dirs}/l1,upperdir={dirs}/up,workdir={shm}"], str(dirs / "mnt"))
