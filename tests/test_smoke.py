"""The first thing to work: mount two layers, see both, change something, unmount."""

import os


def test_mount_merges_layers_and_writes_to_upper(layers, mounts, tmp_path):
    low1, low2, up, wk = (layers.dir(n) for n in ("l1", "l2", "upper", "work"))
    (low2 / "base").write_text("base\n")
    (low1 / "top").write_text("top\n")
    mnt = mounts.layerfs(tmp_path / "mnt", [low1, low2], up, wk)
    assert sorted(os.listdir(mnt)) == ["base", "top"]
    (mnt / "base").write_text("changed\n")
    assert (mnt / "base").read_text() == "changed\n"
    assert (low2 / "base").read_text() == "base\n"
    mounts.unmount(mnt)
    assert (up / "base").read_text() == "changed\n"


def test_names_that_are_not_utf8_pass_through_unchanged(layers, mounts, tmp_path):
    low, up, wk = (layers.dir(n) for n in ("l", "upper", "work"))
    latin1 = "café".encode("latin-1") + b"\xff"
    (low / os.fsdecode(latin1)).write_text("old name")
    mnt = os.fsencode(mounts.layerfs(tmp_path / "mnt", [low], up, wk))
    assert os.listdir(mnt) == [latin1]
    os.rename(os.path.join(mnt, latin1), os.path.join(mnt, b"\xfe\xfd"))
    os.mkdir(os.path.join(mnt, b"dir\x80"))
    assert sorted(os.listdir(mnt)) == [b"dir\x80", b"\xfe\xfd"]
    with open(os.path.join(mnt, b"\xfe\xfd")) as f:
        assert f.read() == "old name"
    mounts.unmount(tmp_path / "mnt")
    assert sorted(os.listdir(os.fsencode(up))) == sorted([latin1, b"\xfe\xfd", b"dir\x80"])
