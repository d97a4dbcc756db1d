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
